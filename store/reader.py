"""Read-only access to an activation store: metadata, decoded chunks, statistics."""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import zarr

from ..errors import SaeError
from .chunk_decode import ChunkScratch, CommitMismatch, DirectChunks, ends_with_crc32c, stored_crc32c
from .codecs import CodecSpec
from .format import (
    COMMIT_INDEX,
    COMMITS,
    READABLE_VERSIONS,
    REQUIRED_ATTRS,
    SCALE_SUFFIX,
    STATUS_COMPLETE,
    TOKENS,
    StoreError,
    chunk_key,
    chunk_rows,
    committed_chunks,
    scale_array_name,
)
from .location import StoreLocation, as_location


class ActivationStore:
    """An opened store (a local path or an fsspec URL, see :mod:`.location`). Arrays are read
    lazily, chunk by chunk; nothing is loaded whole. Format 1 and 2 stores are readable.

    Args:
        path: store path or URL. require_complete: refuse an unfinished store.
        storage_options: fsspec options (e.g. ``endpoint_url``). cache: a local directory caching
            remote chunk objects (fsspec ``simplecache``).

    Raises:
        StoreError: missing path, not a store, unknown format version, incomplete store
            (when ``require_complete``), or a corrupt chunk when it is read.
        UnavailableError: the URL scheme's backend is not installed (names the extra).
    """

    def __init__(self, path: str | Path | StoreLocation, require_complete: bool = True,
                 storage_options: dict | None = None, cache: str | None = None) -> None:
        self.loc = as_location(path, storage_options, cache)
        self.path = self.loc.url
        if self.loc.local and not self.loc.path.exists():
            raise StoreError(f"no store at {self.path}: run `sae harvest --out {self.path}` first")
        if self.loc.local and not self.loc.path.is_dir():
            raise StoreError(f"{self.path} is a file, not a store directory: pass a store written by `sae harvest`")
        try:
            self.group = zarr.open_group(store=self.loc.zarr_store(read_only=True), mode="r", zarr_format=3)
        except (SaeError, ImportError):
            raise
        except Exception as e:  # noqa: BLE001 - zarr/fsspec raise several types for "not a group" / "not there"
            raise StoreError(f"{self.path} is not a Zarr activation store ({e.__class__.__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); check the path or URL") from None
        self.attrs: dict = dict(self.group.attrs)
        self._identity_tag: tuple | None = None  # zarr.json's version tag when store_id last matched
        version = self.attrs.get("format_version")
        if version is None:
            raise StoreError(f"{self.path} is a Zarr group but not an sae activation store (it has no "
                             "format_version attribute): pass a store written by `sae harvest`")
        if version not in READABLE_VERSIONS:
            raise StoreError(f"{self.path}: store format {version!r} is not one of {READABLE_VERSIONS}; "
                             "upgrade sae to read it")
        missing = [k for k in REQUIRED_ATTRS if k not in self.attrs]
        if missing:
            raise StoreError(f"{self.path} lacks the store attribute {missing[0]!r}: it is damaged or was not "
                             "written by `sae harvest`; re-harvest it")
        if require_complete and self.attrs.get("status") != STATUS_COMPLETE:
            raise StoreError(f"{self.path} is incomplete ({self.n_tokens} tokens committed): "
                             "finish it with `sae harvest ... --resume`")
        try:
            self.codec = CodecSpec.parse(self.attrs["codec"], self.attrs["dtype"])
        except ValueError as e:
            raise StoreError(f"{self.path}: {e}") from None
        missing_arrays = [h for h in [TOKENS, *self.hook_names] if h not in self.group]
        if missing_arrays:
            raise StoreError(f"{self.path} has no array {missing_arrays[0]!r}: the store is damaged; re-harvest it")

    @property
    def format_version(self) -> int:
        return int(self.attrs["format_version"])

    def hook_digest(self, hook_name: str) -> str | None:
        """sha256 over the crc32c of ``tokens`` and ``hook_name``'s chunks: what a run trained on that hook
        depends on (unchanged when ``--into`` adds other hooks); None for stores written before it existed."""
        return (self.attrs.get("hook_digests") or {}).get(hook_name)

    def accepts_digest(self, digest: str | None, hook_name: str | None = None, hook_digest: str | None = None
                       ) -> bool:
        """Whether a run that recorded ``digest`` (and ``hook_digest`` for ``hook_name``) was trained on this
        store's data: the current digest, one in ``digest_history`` (before ``--into``/``--extend``
        grew the store), or the same per-hook digest."""
        if hook_digest and hook_name and self.hook_digest(hook_name):
            return hook_digest == self.hook_digest(hook_name) or digest in self.known_digests()
        return digest is None or digest in self.known_digests()

    def known_digests(self) -> set[str]:
        """The current content digest and every earlier one this store recorded as it grew."""
        out = {d.get("content_digest") for d in self.attrs.get("digest_history") or [] if isinstance(d, dict)}
        out.add(self.content_digest)
        return {d for d in out if d}

    @property
    def content_digest(self) -> str | None:
        """sha256 over every chunk's crc32c (format 2; None for format 1)."""
        return self.attrs.get("content_digest")

    def check_unchanged(self) -> None:
        """Raise ``StoreError`` if the store at this location was replaced since it was opened
        (another process's ``--overwrite``): its ``store_id`` differs or it is gone.

        The loader calls this twice per window, so the common case is one ``stat`` (or, on an object
        store, one metadata request) of ``zarr.json``: its :meth:`~StoreLocation.version_tag` is
        compared with the one last seen with the right ``store_id``, and only a changed tag (or a
        backend without tags) reads and parses ``zarr.json``. That object holds per-hook statistics
        (~94 KB per hook at d_model 2304), so parsing it costs ~0.8 ms per hook, holding the GIL."""
        try:
            tag = self.loc.version_tag("zarr.json")
        except Exception:  # noqa: BLE001 - gone or unreadable: decided by the read below
            tag = None
        if tag is not None and tag == self._identity_tag:
            return
        try:
            now = (self.loc.read_json("zarr.json", fresh=True).get("attributes") or {}).get("store_id")
        except Exception:  # noqa: BLE001 - gone or unreadable: both mean "not what we opened"
            now = None
        if now != self.attrs.get("store_id"):
            raise StoreError(f"{self.path} was replaced or removed while being read (store_id "
                             f"{self.attrs.get('store_id')} → {now}); nothing was trained on the new data: rerun "
                             "(with --resume to continue from the last checkpoint)")
        self._identity_tag = tag

    # -- metadata -----------------------------------------------------------------------------
    @property
    def hook_names(self) -> list[str]:
        return list(self.attrs["hook_names"])

    @property
    def d_model(self) -> int:
        return int(self.attrs["d_model"])

    @property
    def context_size(self) -> int:
        return int(self.attrs["context_size"])

    @property
    def n_tokens(self) -> int:
        """Rows committed (for a complete store: all rows)."""
        if "n_tokens_written" in self.attrs:
            return int(self.attrs["n_tokens_written"])
        return self._committed_rows()

    def _committed_rows(self) -> int:
        """Format 2 in progress: rows of chunks committed for every hook (needs a listable store)."""
        try:
            done = committed_chunks(self.loc.list_names, self.hook_names)
            return chunk_rows(int(self.group[TOKENS].shape[0]), int(self.attrs["chunk_tokens"]), done)
        except Exception:  # noqa: BLE001 - e.g. HTTP cannot list
            return 0

    @property
    def chunk_tokens(self) -> int:
        return int(self.attrs["chunk_tokens"])

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_tokens / self.chunk_tokens)

    @property
    def special_token_ids(self) -> list[int]:
        return [int(i) for i in self.attrs.get("special_token_ids", [])]

    @property
    def fingerprint(self) -> str:
        """Identity of this store's contents: store id and rows committed."""
        return f"{self.attrs['store_id']}:{self.n_tokens}"

    def check_hook(self, hook_name: str) -> None:
        """Raise ``StoreError`` if the store has no array for ``hook_name``."""
        if hook_name not in self.hook_names:
            raise StoreError(f"hook {hook_name!r} is not in {self.path} (it has {', '.join(self.hook_names)}): "
                             "pass --hook with one of those, or harvest that layer")

    def default_hook(self, hook_name: str | None) -> str:
        """``hook_name`` if given (checked), else the store's only hook."""
        if hook_name is not None:
            self.check_hook(hook_name)
            return hook_name
        if len(self.hook_names) != 1:
            raise StoreError(f"{self.path} has several hooks ({', '.join(self.hook_names)}): pass --hook")
        return self.hook_names[0]

    def _stats(self, hook_name: str) -> dict:
        try:
            return self.attrs["stats"][hook_name]
        except (KeyError, TypeError):
            raise StoreError(f"{self.path} has no statistics for {hook_name} (an unfinished store?): finish it "
                             "with `sae harvest ... --resume`") from None

    def mean(self, hook_name: str) -> torch.Tensor:
        """Per-dimension mean ``[d_model]`` over non-special tokens (raw activation units)."""
        return torch.tensor(self._stats(hook_name)["mean"], dtype=torch.float32)

    def mean_sq_norm(self, hook_name: str) -> float:
        """E‖x‖² over non-special tokens (raw units²)."""
        return float(self._stats(hook_name)["mean_sq_norm"])

    def norm_scale(self, hook_name: str) -> float:
        """Scalar ``s`` with E‖s·x‖² = d_model (SAELens ``expected_average_only_in`` normalisation)."""
        return math.sqrt(self.d_model / self.mean_sq_norm(hook_name))

    # -- data ---------------------------------------------------------------------------------
    @cached_property
    def tokens(self) -> np.ndarray:
        """All token ids ``[n_tokens]`` (int32; 4 bytes per row, read once)."""
        n = self.n_tokens
        parts = []
        for i in range(-(-n // self.chunk_tokens)):
            try:
                parts.append(self._read_direct(TOKENS, *self.chunk_bounds(i), None))
            except FileNotFoundError:
                raise StoreError(f"chunk {i} of {self.path}/tokens is missing: run `sae store verify {self.path}`, "
                                 "then restore or re-harvest the store") from None
            except (CommitMismatch, ValueError, RuntimeError) as e:
                raise StoreError(f"chunk {i} of {self.path}/tokens is corrupt or replaced ({e}): run "
                                 f"`sae store verify {self.path}`") from None
        try:
            if any(p is None for p in parts):
                tokens = np.asarray(self.array(TOKENS)[:n])
            else:
                tokens = np.concatenate(parts)[:n] if parts else np.zeros(0, dtype=np.int32)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt, missing or replaced token chunk
            raise StoreError(f"corrupt token array in {self.path} ({e.__class__.__name__}: {e}): run "
                             f"`sae store verify {self.path}`") from None
        if len(tokens) and int(tokens.min()) < 0:  # Zarr's fill value: a token chunk is missing
            i = int(np.flatnonzero(tokens < 0)[0]) // self.chunk_tokens
            raise StoreError(f"chunk {i} of {self.path}/tokens is missing (its ids read as the fill value -1): "
                             f"run `sae store verify {self.path}`, then restore or re-harvest the store")
        return tokens

    def valid_mask(self, tokens: np.ndarray) -> np.ndarray:
        """Bool mask of rows whose token is not special (BOS/EOS/PAD are excluded)."""
        return ~np.isin(tokens, np.asarray(self.special_token_ids, dtype=np.int64))

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        start = i * self.chunk_tokens
        return start, min(start + self.chunk_tokens, self.n_tokens)

    def array(self, name: str) -> zarr.Array:
        """The zarr array ``name``, opened once (its metadata is one remote read on object stores)."""
        cache = self.__dict__.setdefault("_arrays", {})
        if name not in cache:
            cache[name] = self.group[name]
        return cache[name]

    def read_rows(self, hook_name: str, start: int, stop: int) -> torch.Tensor:
        """Decode rows ``[start, stop)`` → float32 ``[stop - start, d_model]`` (raw units)."""
        return self.codec.dequantize(*self.read_rows_stored(hook_name, start, stop))

    def read_rows_stored(self, hook_name: str, start: int, stop: int, scratch: ChunkScratch | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows ``[start, stop)`` decompressed but not converted: ``(raw, scale)`` of
        :meth:`CodecSpec.as_tensors` (finish with ``self.codec.dequantize``, on any device).

        Whole chunks (the loader's reads) are decoded directly (:mod:`.chunk_decode`: no Zarr event
        loop, the same bytes); with ``scratch`` into its reused buffers, so the result is then only
        valid until the next read with that scratch. Anything else goes through Zarr.

        Raises:
            StoreError: a corrupt chunk (checksum, compression or size), naming ``sae store verify``.
        """
        try:
            stored = self._read_direct(hook_name, start, stop, scratch)
            if stored is None:
                self._check_commits(hook_name, start, stop)
                stored = np.asarray(self.array(hook_name)[start:stop])
            scale = None
            if self.codec.has_scale:
                name = scale_array_name(hook_name)
                scale = self._read_direct(name, start, stop, scratch)
                if scale is None:
                    self._check_commits(name, start, stop)
                    scale = np.asarray(self.array(name)[start:stop])
        except KeyError:
            raise
        except (StoreError, CommitMismatch) as e:
            raise StoreError(f"{self.path}: {e}; run `sae store verify {self.path}`, then restore or re-harvest "
                             "the store") from None
        except Exception as e:  # noqa: BLE001 - FileNotFoundError included: every chunk of ours is stored
            chunk = start // self.chunk_tokens
            raise StoreError(f"corrupt chunk {chunk} of {self.path}/{hook_name} (rows {start}:{stop}; "
                             f"{e.__class__.__name__}): run `sae store verify {self.path}`, then restore or "
                             "re-harvest the store") from None
        return self.codec.as_tensors(stored, scale)

    def _direct(self, name: str) -> DirectChunks | None:
        cache = self.__dict__.setdefault("_direct_chunks", {})
        if name not in cache:
            cache[name] = DirectChunks.for_array(name, self.array(name))
        return cache[name]

    def committed_crc(self, name: str, i: int) -> int | None:
        """The crc32c that chunk ``i`` of array ``name`` was committed with (format 2): from
        ``commits/index.json`` (one read per store), else from the chunk's own commit object.
        None for format 1 or a chunk not committed yet (in-progress stores).

        Raises:
            StoreError: a complete store lacks the commit of a chunk it holds.
        """
        if self.format_version < 2:
            return None
        cache = self.__dict__.setdefault("_committed", {})
        if "index" not in cache:
            try:
                cache["index"] = self.loc.read_json(COMMITS, COMMIT_INDEX).get("crc32c") or {}
            except (OSError, ValueError, AttributeError):
                cache["index"] = {}
        crcs = cache["index"].get(name)
        if crcs is not None and i < len(crcs):
            return int(crcs[i])
        key = (name, i)
        if key not in cache:
            try:
                if name == TOKENS:
                    cache[key] = int(self.loc.read_json(COMMITS, "tokens.json")["crc32c"][i])
                else:
                    hook, pos = (name[:-len(SCALE_SUFFIX)], 1) if name.endswith(SCALE_SUFFIX) else (name, 0)
                    cache[key] = int(self.loc.read_json(COMMITS, hook, f"{i}.json")["crc32c"][pos])
            except (FileNotFoundError, KeyError, IndexError):
                if self.attrs.get("status") == STATUS_COMPLETE:
                    raise StoreError(f"{self.path}: chunk {i} of {name} has no commit record: the store is damaged; "
                                     f"run `sae store verify {self.path}`") from None
                cache[key] = None
        return cache[key]

    def _check_commits(self, name: str, start: int, stop: int) -> None:
        """Before rows ``[start, stop)`` of array ``name`` are read through Zarr (codec chains or row
        ranges :mod:`.chunk_decode` does not decode, e.g. ``bitround``): check that each chunk they touch
        exists and carries the crc32c its commit records (its last 4 bytes; once per chunk and reader).

        Raises:
            FileNotFoundError: a missing chunk object (Zarr would return its fill value).
            CommitMismatch: a chunk object that is not the one committed.
        """
        if self.format_version < 2 or stop <= start:
            return
        checked = self.__dict__.setdefault("_commit_checked", set())
        array = self.array(name)
        if not ends_with_crc32c(array):
            return
        rows = int(array.chunks[0])
        for i in range(start // rows, (stop - 1) // rows + 1):
            if (name, i) in checked:
                continue
            want = self.committed_crc(name, i)
            if want is not None:
                got = stored_crc32c(self.loc, chunk_key(name, i, array.ndim))
                if got != want:
                    raise CommitMismatch(f"chunk {i} of {name}: its crc32c {got:#010x} is not the one committed "
                                         f"({want:#010x}): the chunk object was replaced after its commit")
            checked.add((name, i))

    def _read_direct(self, name: str, start: int, stop: int, scratch: ChunkScratch | None) -> np.ndarray | None:
        """Rows ``[start, stop)`` of array ``name`` when they are exactly one chunk of an array
        :class:`DirectChunks` decodes; else None (read through Zarr). A missing chunk object raises."""
        direct = self._direct(name)
        if direct is None or direct.chunk_rows != self.chunk_tokens:
            return None
        i, rem = divmod(start, direct.chunk_rows)
        if rem or stop != min(start + direct.chunk_rows, direct.shape[0]):
            return None
        return direct.read(self.loc, i, scratch, committed_crc=self.committed_crc(name, i))

    def read_chunk(self, hook_name: str, i: int) -> torch.Tensor:
        """Decoded chunk ``i`` → float32 ``[rows, d_model]``."""
        return self.read_rows(hook_name, *self.chunk_bounds(i))

    def nbytes_stored(self) -> int:
        """Bytes stored of all arrays (may list the store: a remote listing for URLs)."""
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "commits is not a component of a Zarr hierarchy"
                return int(sum(self.group[name].nbytes_stored() for name in self.group.array_keys()))
        except Exception:  # noqa: BLE001 - stores that cannot list (HTTP)
            return 0

    def nbytes_logical(self) -> int:
        """Bytes of the activations as float32 plus tokens: the SAELens-style raw reference."""
        return self.n_tokens * (4 + 4 * self.d_model * len(self.hook_names))
