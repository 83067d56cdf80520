"""Real servers for the shared-store tests, started by the tests on loopback only (127.0.0.1):
an S3-compatible server (moto in server mode, as s3fs' own test suite uses) and a static HTTP
server (``http.server``). Both stop when the fixture ends."""

from __future__ import annotations

import functools
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextmanager
def s3_server(bucket: str = "team") -> Iterator[dict]:
    """Start moto's S3 server on a free loopback port, create ``bucket``; yield the storage options."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address=HOST, port=port, verbose=False)
    server.start()
    opts = {"endpoint_url": f"http://{HOST}:{port}"}
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(**opts)
        if not fs.exists(bucket):  # moto keeps its buckets per process, across server instances
            fs.mkdir(bucket)
        yield opts
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


@contextmanager
def http_server(root: Path) -> Iterator[str]:
    """Serve ``root`` read-only over HTTP on a free loopback port; yield its base URL."""
    handler = functools.partial(_Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer((HOST, free_port()), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
