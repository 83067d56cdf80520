"""A local read-through cache of a remote store's objects that concurrent readers can share.

fsspec's ``simplecache`` downloads a missing object straight into its final cache file name, and a
reader takes "the file exists" for "the file is complete". Two decode threads (or two processes
sharing ``--cache``) that miss the same object at the same time can therefore read a half-written
file: a chunk then fails to decompress, or — worse for a store without checksums — decodes to the
wrong bytes. This is fsspec issue #639 (fixed upstream by PR #2075, not in a release as of fsspec
2026.9.0). :class:`AtomicSimpleCache` is ``simplecache`` with every whole-object download written
to a unique temporary file in the cache directory and moved into place with ``os.replace``, so the
final name only ever holds a complete object. Two simultaneous misses both download; the second
rename replaces a complete file with an identical complete file.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from fsspec.implementations.cached import SimpleCacheFileSystem


def _fill(cache: SimpleCacheFileSystem, path: str) -> str:
    """Local cache file of remote ``path``, downloading it atomically if absent."""
    fn = cache._check_file(path)
    if fn:
        return fn
    fn = os.path.join(cache.storage[-1], cache._mapper(path))
    part = f"{fn}.part-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        cache.fs.get_file(path, part)
        os.replace(part, fn)
    finally:  # only our own uniquely named temporary, left when the download or rename failed
        if os.path.exists(part):
            os.remove(part)
    return fn


class AtomicSimpleCache(SimpleCacheFileSystem):
    """fsspec ``simplecache`` whose cache files appear atomically (see the module docstring).

    Only reads are changed; every read path (``open``, ``cat_file``, ``cat``, ``cat_ranges``) goes
    through one atomic download. Writes behave as in ``simplecache``. Raises what the remote
    filesystem raises (e.g. ``FileNotFoundError``); a failed download leaves no cache file.
    """

    protocol = "atomicsimplecache"

    # fsspec's CachingFileSystem routes only a fixed list of method names to the cache class (the
    # rest go to the remote filesystem); every method overridden here is on that list, and helpers
    # are module functions for that reason.
    def _get_cached_file_before_open(self, path: str, **kwargs: Any) -> None:
        _fill(self, path)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        fn = _fill(self, self._strip_protocol(path))
        with open(fn, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            lo = 0 if start is None else (start if start >= 0 else max(0, size + start))
            hi = size if end is None else (end if end >= 0 else max(0, size + end))
            f.seek(lo)
            return f.read(max(0, hi - lo))

    def cat(self, path: Any, recursive: bool = False, on_error: str = "raise", **kwargs: Any) -> Any:
        paths = self.expand_path(path, recursive=recursive, maxdepth=kwargs.get("maxdepth"))
        out: dict[str, Any] = {}
        for p in paths:
            try:
                out[p] = self.cat_file(p)
            except Exception as e:
                if on_error == "raise":
                    raise
                if on_error == "return":
                    out[p] = e
        if len(paths) > 1 or isinstance(path, list) or paths[0] != self._strip_protocol(path):
            return out
        return out[paths[0]]

    def cat_ranges(self, paths: list[str], starts: Any, ends: Any, max_gap: Any = None,
                   on_error: str = "return", **kwargs: Any) -> list[Any]:
        n = len(paths)
        starts = starts if isinstance(starts, list) else [starts] * n
        ends = ends if isinstance(ends, list) else [ends] * n
        out: list[Any] = []
        for p, s, e in zip(paths, starts, ends, strict=True):
            try:
                out.append(self.cat_file(p, s, e))
            except Exception as err:
                if on_error == "raise":
                    raise
                out.append(err)
        return out
