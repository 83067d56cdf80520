"""The dask side shared by distributed harvests and sweeps: how many workers (``--workers``), a client on
a local cluster or an existing scheduler (``--scheduler``), an up-front reachability check, and which
GPU a worker process uses.

We use dask.distributed as it is: its scheduler reschedules the tasks of a worker that dies, its
nanny restarts the worker, and ``Worker.log_event`` / ``Client.subscribe_topic`` carry progress
back to the coordinating process. Nothing here is a scheduler of our own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from .errors import ConfigError

_SPAWN_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")


def resolve_workers(workers: int | str | None) -> int | None:
    """``--workers``: a positive int, ``auto`` (one per visible GPU; 1 without CUDA), or None (no dask).

    Raises:
        ConfigError: anything else.
    """
    if workers is None:
        return None
    if isinstance(workers, str) and workers.strip().lower() == "auto":
        import torch

        return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1
    try:
        n = int(workers)
    except (TypeError, ValueError):
        n = 0
    if isinstance(workers, bool) or n < 1:
        raise ConfigError(f"--workers {workers!r}: give a positive number of worker processes, or auto")
    return n


def worker_device(device: str) -> str:
    """The device of this dask worker process for a configured ``device``: with ``auto``/``cuda`` and
    several visible GPUs, worker ``i`` of a ``LocalCluster`` (named ``0 … n−1``) uses ``cuda:i mod count``,
    so ``--workers auto`` puts one worker on each GPU. Outside a worker, or with one GPU, ``device`` as is
    (a ``dask worker`` started per GPU with ``CUDA_VISIBLE_DEVICES`` sees its own GPU as ``cuda``)."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        with contextlib.suppress(ImportError, ValueError):
            from distributed import get_worker

            name = get_worker().name
            index = int(name) if str(name).isdigit() else abs(hash(name))
            return f"cuda:{index % torch.cuda.device_count()}"
    return device


def check_scheduler(address: str | None, timeout_s: float = 10.0) -> None:
    """Refuse an unreachable ``--scheduler`` in one line within ``timeout_s``, before anything loads.

    Raises:
        ConfigError: nothing answers at ``address`` (a refused port answers at once).
    """
    if address is None:
        return
    import asyncio
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme in ("tcp", "tls") and parts.hostname and parts.port:
        try:  # a refused port answers at once; dask's connect would retry until its timeout
            socket.create_connection((parts.hostname, parts.port), timeout=timeout_s).close()
        except OSError as e:
            raise ConfigError(f"--scheduler {address}: no dask scheduler answers there ({e.__class__.__name__}"
                              f"); start one (`dask scheduler`) or use --workers N") from None

    from distributed.comm import connect

    async def probe() -> None:
        comm = await connect(address, timeout=timeout_s)
        await comm.close()

    try:
        asyncio.run(asyncio.wait_for(probe(), timeout_s + 1))
    except (OSError, TimeoutError, ValueError) as e:
        raise ConfigError(f"--scheduler {address}: no dask scheduler answers there within {timeout_s:.0f} s "
                          f"({e.__class__.__name__}); start one (`dask scheduler`) or use --workers N") from None


@contextlib.contextmanager
def dask_client(workers: int | None, scheduler: str | None) -> Iterator[Any]:
    """A ``distributed.Client`` on ``scheduler`` (an existing cluster), or on a new
    ``LocalCluster`` of ``workers`` single-threaded processes on 127.0.0.1 (closed afterwards).

    Raises:
        ConfigError: the scheduler cannot be reached.
    """
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=30)
        except OSError as e:
            raise ConfigError(f"--scheduler {scheduler}: cannot connect ({e.__class__.__name__}: {e}); start "
                              "`dask scheduler` there, or use --workers N for a local cluster") from None
        try:
            yield client
        finally:
            client.close()
        return
    saved = {k: os.environ.get(k) for k in _SPAWN_ENV}
    try:
        cluster = LocalCluster(n_workers=workers or 1, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None)
    finally:  # distributed writes its worker settings (OMP_NUM_THREADS=1...) into this process's environment
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


__all__ = ["check_scheduler", "dask_client", "resolve_workers", "worker_device"]
