"""Where a store lives: a local path or an fsspec URL, kept as a string end to end.

Schemes: a plain path or ``file://`` (local), ``s3://`` (``pip install 'sae[s3]'``), ``gs://``
(``sae[gcs]``), ``http(s)://`` (read-only, ``sae[http]``), ``hf://datasets/...`` (``sae[hf]``) and
``memory://`` (tests). Credentials and endpoints come the usual way (``AWS_*`` environment
variables, ``~/.aws``, fsspec configuration) or from ``storage_options`` (the CLI's repeatable
``--storage-option KEY=VALUE``, e.g. ``endpoint_url=http://127.0.0.1:9000``). ``cache`` puts an
fsspec ``simplecache`` (made safe for concurrent readers: :mod:`sae.store.cache`) in front of a
remote store: each chunk object is downloaded once into that directory and read locally afterwards
(a second epoch, a second run).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UnavailableError

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http", "hf": "hf"}
READ_ONLY_SCHEMES = ("http", "https")


def scheme_of(url: str) -> str:
    """``"s3"`` for ``s3://b/x``; ``"file"`` for a plain path or ``file://``."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else "file"



def local_path(url: str) -> Path:
    """The filesystem path of a local URL (``file://`` stripped)."""
    return Path(url[len("file://"):] if url.startswith("file://") else url)


def parse_storage_options(items: list[str] | None) -> dict[str, Any]:
    """``["endpoint_url=http://h:9", "anon=true"]`` → ``{"endpoint_url": "http://h:9", "anon": True}``.

    Values ``true``/``false``/integers are converted; raises ``ConfigError`` for an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--storage-option {item!r} must look like KEY=VALUE (e.g. endpoint_url=http://...)")
        v: Any = value.strip()
        if v.lower() in ("true", "false"):
            v = v.lower() == "true"
        elif v.lstrip("-").isdigit():
            v = int(v)
        out[key.strip()] = v
    return out


@dataclass(frozen=True)
class StoreLocation:
    """A store URL with its storage options (and an optional local chunk cache directory)."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    cache: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", str(self.url).rstrip("/") or str(self.url))

    @property
    def scheme(self) -> str:
        return scheme_of(self.url)

    @property
    def local(self) -> bool:
        return self.scheme == "file"

    @property
    def read_only(self) -> bool:
        return self.scheme in READ_ONLY_SCHEMES

    @property
    def path(self) -> Path:
        """Local filesystem path (only for local stores)."""
        return local_path(self.url)

    def __str__(self) -> str:
        return self.url

    @cached_property
    def fs_root(self) -> tuple[Any, str]:
        """``(fsspec filesystem, root path inside it)`` (synchronous; with :attr:`cache`, an fsspec
        ``simplecache`` over the remote one, :class:`~sae.store.cache.AtomicSimpleCache`). Raises
        ``UnavailableError`` naming the extra to install when the scheme's backend is missing."""
        fs, root = self.base_fs_root
        if self.cache:
            from .cache import AtomicSimpleCache

            fs = AtomicSimpleCache(fs=fs, cache_storage=str(self.cache), same_names=False)
        return fs, root

    @cached_property
    def base_fs_root(self) -> tuple[Any, str]:
        """Like :attr:`fs_root` but never through the local cache."""
        import fsspec

        try:
            if self.local:
                return fsspec.core.url_to_fs(str(self.path))
            return fsspec.core.url_to_fs(self.url, **self.storage_options)
        except ImportError as e:
            extra = EXTRAS.get(self.scheme, self.scheme)
            raise UnavailableError(f"{self.url}: the {self.scheme}:// backend is not installed; "
                                   f"pip install 'sae[{extra}]'") from e
        except ValueError as e:
            if "Protocol not known" in str(e):
                raise ConfigError(f"{self.url}: unknown URL scheme {self.scheme!r}; use a path, file://, s3://, "
                                  "gs://, http(s)://, hf:// or memory://") from None
            raise

    @property
    def fs(self) -> Any:
        return self.fs_root[0]

    def key(self, *parts: str) -> str:
        """Path inside :attr:`fs` of ``parts`` below the store root."""
        root = self.fs_root[1].rstrip("/")
        return "/".join([root, *parts])

    def zarr_store(self, read_only: bool = True) -> Any:
        """A zarr v3 store object: ``LocalStore`` for local paths, ``FsspecStore`` otherwise."""
        from zarr.storage import FsspecStore, LocalStore

        if self.local:
            return LocalStore(str(self.path), read_only=read_only)
        if not read_only and self.read_only:
            raise ConfigError(f"{self.url}: {self.scheme}:// stores are read-only; write to a path, s3:// or gs://")
        if self.cache:
            # zarr needs an async filesystem: wrap the synchronous cache chain (its calls run in
            # threads; the remote filesystem keeps its own event loop)
            from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

            fs, root = self.fs_root
            return FsspecStore(fs=AsyncFileSystemWrapper(fs, asynchronous=True), path=root, read_only=read_only)
        self.fs_root  # noqa: B018 - raise the install hint before zarr does
        return FsspecStore.from_url(self.url, storage_options=dict(self.storage_options), read_only=read_only)

    # -- small objects (commits, lease) -------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        if self.local:
            return self.path.joinpath(*parts).exists()
        try:
            return bool(self.fs.exists(self.key(*parts)))
        except (OSError, ValueError):
            return False

    def version_tag(self, *parts: str) -> tuple | None:
        """A cheap token that changes whenever the object at ``parts`` is rewritten, or None when this
        backend offers none (then the caller must read the object). Local: ``(device, inode, mtime
        in ns, size)`` from one ``stat`` (our writers replace files by rename, so a rewrite is a new
        inode). Object stores: the ``ETag`` from one metadata request (S3's is the MD5 of the object
        for a plain PUT). Raises ``FileNotFoundError``/``OSError`` if the object is gone."""
        if self.local:
            st = self.path.joinpath(*parts).stat()
            return ("stat", st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        fs, root = self.base_fs_root
        info = fs.info("/".join([root.rstrip("/"), *parts]))
        etag = info.get("ETag") or info.get("etag")
        return ("etag", str(etag), info.get("size")) if etag else None

    def read_json(self, *parts: str, fresh: bool = False) -> Any:
        """Parsed JSON object at ``parts``; raises ``FileNotFoundError`` if absent. ``fresh``: bypass
        the local cache (for objects that change: ``zarr.json``, the lease)."""
        if self.local:
            return json.loads(self.path.joinpath(*parts).read_text())
        fs, root = self.base_fs_root if fresh else self.fs_root
        return json.loads(fs.cat_file("/".join([root.rstrip("/"), *parts])))

    def write_json(self, obj: Any, *parts: str, exclusive: bool = False) -> None:
        """Write one small JSON object in one operation: locally a temporary file renamed into place
        (``exclusive``: ``O_EXCL`` create, ``FileExistsError`` if present); on object stores one PUT
        (``exclusive``: a conditional create where the backend supports it)."""
        data = json.dumps(obj, sort_keys=True).encode()
        if self.local:
            import os
            import tempfile

            p = self.path.joinpath(*parts)
            p.parent.mkdir(parents=True, exist_ok=True)
            if exclusive:
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                return
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, p)
            return
        key = self.key(*parts)
        if exclusive:
            try:
                self.fs.pipe_file(key, data, mode="create")
                return
            except TypeError:  # a backend without conditional writes: check, then put (racy, documented)
                if self.fs.exists(key):
                    raise FileExistsError(key) from None
        self.fs.pipe_file(key, data)

    def remove(self, *parts: str) -> None:
        if self.local:
            self.path.joinpath(*parts).unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.key(*parts))

    def list_names(self, *parts: str) -> list[str]:
        """Names directly under ``parts`` (empty when absent). Writers only: HTTP cannot list."""
        if self.local:
            d = self.path.joinpath(*parts)
            return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.key(*parts), detail=False))
        except FileNotFoundError:
            return []

    def tail_bytes(self, n: int, *parts: str) -> bytes:
        """The last ``n`` bytes of the object at ``parts`` (a ranged read on object stores)."""
        if self.local:
            with self.path.joinpath(*parts).open("rb") as fh:
                fh.seek(-n, 2)
                return fh.read()
        key = self.key(*parts)
        try:
            size = self.fs.size(key)
            out = self.fs.cat_file(key, start=max(0, size - n), end=size)
            if len(out) == min(n, size):
                return out
        except FileNotFoundError:
            raise
        except Exception:  # noqa: BLE001 - servers without range requests (e.g. python -m http.server)
            pass
        return self.fs.cat_file(key)[-n:]


def as_location(store: str | Path | StoreLocation, storage_options: dict[str, Any] | None = None,
                cache: str | None = None) -> StoreLocation:
    if isinstance(store, StoreLocation):
        return store
    return StoreLocation(str(store), dict(storage_options or {}), cache)
