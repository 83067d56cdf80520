"""The local chunk cache (``--cache``) under concurrent readers: a miss is never seen half-written.

fsspec's ``simplecache`` writes a download straight to its final cache name (fsspec issue #639), so
a second reader of the same object during the download reads a truncated file. CI caught it: two
decode threads reading one chunk (the second epoch's window overlapping the first's) failed with
"corrupt chunk". The remote here is an in-memory filesystem whose downloads are slow and arrive in
two halves, so the race is deterministic, not a matter of luck.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fsspec.implementations.cached import SimpleCacheFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from sae.store.cache import AtomicSimpleCache

DATA = bytes(range(256)) * 4096  # 1 MiB


class SlowRemote(MemoryFileSystem):
    """Downloads write half the object, pause, then the rest (like a slow network read)."""

    cachable = False  # a fresh instance (and store) per test
    downloads = 0

    def get_file(self, rpath, lpath, **kwargs):
        type(self).downloads += 1
        data = self.cat_file(rpath)
        with open(lpath, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(0.3)
            f.write(data[len(data) // 2:])


def _remote() -> SlowRemote:
    fs = SlowRemote()
    fs.store = {}
    fs.pseudo_dirs = [""]
    fs.pipe_file("/bucket/c/0", DATA)
    return fs


def _race(cache, read) -> list[bytes]:
    """Eight readers of one uncached object, started 20 ms apart (all inside the first download)."""
    def go(i):
        time.sleep(0.02 * i)
        return read(cache)
    with ThreadPoolExecutor(8) as ex:
        return list(ex.map(go, range(8)))


READS = {
    "cat_file": lambda c: c.cat_file("/bucket/c/0"),
    "cat_file_range": lambda c: DATA[:1000] + c.cat_file("/bucket/c/0", 1000, None),
    "open": lambda c: c.open("/bucket/c/0", "rb").read(),
    "cat": lambda c: c.cat("/bucket/c/0"),
    "cat_ranges": lambda c: c.cat_ranges(["/bucket/c/0"], [0], [None])[0],
}


@pytest.mark.parametrize("how", sorted(READS))
def test_concurrent_misses_of_one_object_all_read_it_whole(tmp_path, how):
    cache = AtomicSimpleCache(fs=_remote(), cache_storage=str(tmp_path), same_names=False)
    assert all(r == DATA for r in _race(cache, READS[how]))
    files = [p.name for p in tmp_path.iterdir()]
    assert len(files) == 1 and ".part" not in files[0]  # one complete cache file, no temporaries left
    SlowRemote.downloads = 0
    assert cache.cat_file("/bucket/c/0", 10, 20) == DATA[10:20] and SlowRemote.downloads == 0  # a hit


def test_the_race_is_real_in_plain_simplecache(tmp_path):
    """The harness detects the bug it guards against: plain ``simplecache`` returns truncated bytes.
    If this starts failing, fsspec has released its fix (PR #2075) and AtomicSimpleCache can go."""
    cache = SimpleCacheFileSystem(fs=_remote(), cache_storage=str(tmp_path), same_names=False)
    got = _race(cache, READS["cat_file"])
    assert any(len(r) < len(DATA) for r in got)


def test_a_failed_download_leaves_no_cache_file(tmp_path):
    class Broken(SlowRemote):
        def get_file(self, rpath, lpath, **kwargs):
            with open(lpath, "wb") as f:
                f.write(b"partial")
            raise OSError("connection reset")

    fs = Broken()
    fs.store, fs.pseudo_dirs = {}, [""]
    fs.pipe_file("/bucket/c/0", DATA)
    cache = AtomicSimpleCache(fs=fs, cache_storage=str(tmp_path), same_names=False)
    with pytest.raises(OSError, match="connection reset"):
        cache.cat_file("/bucket/c/0")
    assert list(tmp_path.iterdir()) == []
    good = AtomicSimpleCache(fs=_remote(), cache_storage=str(tmp_path), same_names=False)
    with pytest.raises(FileNotFoundError):
        good.cat_file("/bucket/c/missing")
    assert list(tmp_path.iterdir()) == []
