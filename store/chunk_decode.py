"""Whole-chunk reads of a store array without Zarr's asynchronous pipeline, into reused buffers.

Why: reading one chunk through ``zarr.Array.__getitem__`` goes through Zarr's event-loop thread
and ``asyncio.to_thread`` for every codec, about 3 ms of Python per chunk holding the GIL, and
every decoded chunk is a fresh buffer (a fresh ``mmap`` above glibc's threshold, page-faulted in
again). Measured on this 2-core machine at d_model 2304, bf16 Blosc-zstd, 8 192-token chunks and
glibc's default thresholds: 149 k tokens/s with 1 thread and 105 k with 2 through ``zarr``; the
same chunks decoded here: see ``benchmarks/read.py``. The shuffled loader decodes every chunk of
the stream this way, in its own threads (numcodecs' Blosc releases the GIL; the crc32c, ~10 GB/s, does not).

What: for an array whose codec chain is one we write (``bytes`` little-endian, optionally
``blosc``, optionally ``crc32c``; regular chunks over the row axis only; zarr v3's default chunk
keys), :meth:`DirectChunks.read` fetches the chunk object (a file read locally, one ``cat_file``
through the store's fsspec filesystem otherwise, the chunk cache included), checks the crc32c
exactly as Zarr's ``Crc32cCodec`` does (``google_crc32c.value`` of the bytes before the last 4,
stored little-endian), and decompresses with numcodecs' Blosc (the library Zarr's ``BloscCodec``
calls) into a caller-owned :class:`ChunkScratch`. Any other chain (e.g. the ``bitround`` filter)
is ``None`` from :meth:`DirectChunks.for_array`, and the reader falls back to Zarr. The values are
Zarr's, byte for byte (tested for every codec, partial last chunks and remote stores).

Raises ``ValueError`` on a checksum mismatch or a wrong size, numcodecs' ``RuntimeError`` on a
corrupt Blosc frame and ``FileNotFoundError`` for a missing chunk object; the reader turns each
into its ``corrupt chunk`` error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .format import chunk_key
from .location import StoreLocation


class CommitMismatch(ValueError):
    """A chunk object's checksum is not the one recorded in its commit object."""


class ChunkScratch:
    """Reused buffers for one thread's chunk reads: a compressed-bytes buffer and one decode buffer
    per array. An array returned by :meth:`DirectChunks.read` with a scratch is a view of it, valid
    until the next read with the same scratch for the same array."""

    def __init__(self) -> None:
        self._src = bytearray()
        self._dst: dict[str, np.ndarray] = {}

    def src(self, n: int) -> memoryview:
        if len(self._src) < n:
            self._src = bytearray(n + n // 8)  # headroom: compressed sizes vary from chunk to chunk
        return memoryview(self._src)[:n]

    def dst(self, name: str, nbytes: int) -> np.ndarray:
        buf = self._dst.get(name)
        if buf is None or buf.nbytes != nbytes:
            buf = self._dst[name] = np.empty(nbytes, dtype=np.uint8)
        return buf


@dataclass(frozen=True)
class DirectChunks:
    """How to decode whole chunks of one row-chunked array (see the module doc).

    Attributes: ``name`` (array path in the store), ``shape`` (array shape), ``chunk_rows``,
    ``dtype`` (the stored numpy dtype), ``blosc`` / ``crc`` (codecs present in the chain)."""

    name: str
    shape: tuple[int, ...]
    chunk_rows: int
    dtype: np.dtype
    blosc: bool
    crc: bool

    @classmethod
    def for_array(cls, name: str, array: Any) -> DirectChunks | None:
        """The decoder for ``array`` (a ``zarr.Array``), or None when its layout or codec chain is not
        one this module decodes (then read it through Zarr)."""
        try:
            md = array.metadata.to_dict()
        except AttributeError:
            return None
        if md.get("zarr_format") != 3 or md.get("storage_transformers"):
            return None
        grid, keys = md.get("chunk_grid") or {}, md.get("chunk_key_encoding") or {}
        chunks = tuple((grid.get("configuration") or {}).get("chunk_shape") or ())
        shape = tuple(md.get("shape") or ())
        if grid.get("name") != "regular" or len(chunks) != len(shape) or not shape or chunks[1:] != shape[1:]:
            return None
        if keys.get("name") != "default" or (keys.get("configuration") or {}).get("separator", "/") != "/":
            return None
        try:
            dtype = np.dtype(md.get("data_type"))
        except TypeError:
            return None
        names = [c.get("name") if isinstance(c, dict) else c for c in md.get("codecs") or []]
        if not names or names[0] != "bytes":
            return None
        endian = ((md["codecs"][0].get("configuration") or {}) if isinstance(md["codecs"][0], dict) else {}).get(
            "endian", "little")
        if dtype.itemsize > 1 and (endian != "little" or np.little_endian is False):
            return None
        rest = names[1:]
        blosc = bool(rest) and rest[0] == "blosc"
        rest = rest[1:] if blosc else rest
        crc = rest == ["crc32c"]
        if rest and not crc:
            return None
        return cls(name, shape, int(chunks[0]), dtype, blosc, crc)

    @property
    def chunk_nbytes(self) -> int:
        """Decoded bytes of one (full, padded) chunk."""
        return int(self.chunk_rows * int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize)

    def n_chunks(self) -> int:
        return -(-self.shape[0] // self.chunk_rows)

    def read(self, loc: StoreLocation, i: int, scratch: ChunkScratch | None = None,
             committed_crc: int | None = None) -> np.ndarray:
        """Chunk ``i`` decoded → ``[rows, *shape[1:]]`` of :attr:`dtype` (the last chunk cropped to the
        array's length). With ``scratch`` the result is a view of its buffer.

        ``committed_crc``: the crc32c its commit object records; a chunk object holding another
        (a valid copy of another chunk, a stale rewrite) raises :class:`CommitMismatch`.

        Raises ``FileNotFoundError`` when the chunk object does not exist. (Zarr would return the
        fill value, zeros; our writer stores every chunk, ``write_empty_chunks``, so a missing one is
        damage, never data.)"""
        if not 0 <= i < self.n_chunks():
            raise IndexError(f"chunk {i} of {self.name} (of {self.n_chunks()})")
        data = self._fetch(loc, chunk_key(self.name, i, len(self.shape)), scratch)
        if self.crc:
            view = memoryview(data)
            stored = int.from_bytes(view[-4:], "little") if len(view) >= 4 else None
            data = _check_crc32c(data)  # corrupt bytes first; then: is it the chunk its commit names?
            if committed_crc is not None and stored != committed_crc:
                raise CommitMismatch(f"chunk {i} of {self.name}: its crc32c {stored:#010x} is not the one committed "
                                     f"({committed_crc:#010x}): the chunk object was replaced after its commit")
        n = self.chunk_nbytes
        out = scratch.dst(self.name, n) if scratch is not None else np.empty(n, dtype=np.uint8)
        if self.blosc:
            from numcodecs import blosc

            blosc.decompress(data, out)
        else:
            if len(data) != n:
                raise ValueError(f"chunk {i} of {self.name}: {len(data)} bytes, expected {n}")
            out[:] = np.frombuffer(data, dtype=np.uint8)
        rows = min(self.chunk_rows, self.shape[0] - i * self.chunk_rows)
        return out.view(self.dtype).reshape(self.chunk_rows, *self.shape[1:])[:rows]

    @staticmethod
    def _fetch(loc: StoreLocation, key: tuple[str, ...], scratch: ChunkScratch | None) -> memoryview | bytes:
        if loc.local:
            with open(loc.path.joinpath(*key), "rb") as fh:
                n = os.fstat(fh.fileno()).st_size
                buf = scratch.src(n) if scratch is not None else memoryview(bytearray(n))
                got = fh.readinto(buf)
                if got != n:
                    raise ValueError(f"{'/'.join(key)}: short read ({got} of {n} bytes)")
                return buf
        return loc.fs.cat_file(loc.key(*key))


def ends_with_crc32c(array: Any) -> bool:
    """Whether the codec chain of ``array`` (a ``zarr.Array``) ends in Zarr v3's ``crc32c`` codec, so
    that the last 4 bytes of each chunk object are the crc32c of the rest (any other codecs before it)."""
    try:
        codecs = array.metadata.to_dict().get("codecs") or []
    except AttributeError:
        return False
    last = codecs[-1] if codecs else None
    return (last.get("name") if isinstance(last, dict) else last) == "crc32c"


def stored_crc32c(loc: StoreLocation, key: tuple[str, ...]) -> int:
    """The crc32c a chunk object carries (its last 4 bytes, little-endian), read without the rest.

    Raises ``FileNotFoundError`` when the chunk object does not exist."""
    if loc.local:
        with open(loc.path.joinpath(*key), "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            if size < 4:
                raise ValueError(f"{'/'.join(key)}: shorter than its 4-byte crc32c")
            fh.seek(size - 4)
            tail = fh.read(4)
    else:
        tail = loc.fs.cat_file(loc.key(*key), start=-4)
    return int.from_bytes(tail, "little")


def _check_crc32c(data: memoryview | bytes) -> memoryview:
    """The payload of a chunk ending in Zarr v3's ``crc32c`` codec, after checking its checksum
    (crc32c of everything before the last 4 bytes, stored as little-endian uint32)."""
    import google_crc32c

    view = memoryview(data)
    if len(view) < 4:
        raise ValueError("chunk shorter than its 4-byte crc32c")
    payload, stored = view[:-4], int.from_bytes(view[-4:], "little")
    computed = google_crc32c.value(np.frombuffer(payload, dtype=np.uint8))  # (it takes arrays, not memoryviews)
    if computed != stored:
        raise ValueError(f"Stored and computed checksum do not match. Stored: {stored:#010x}. "
                         f"Computed: {computed:#010x}.")
    return payload
