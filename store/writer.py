"""Writer of an activation store (format 2): chunk-addressed, checksummed, one writer at a time.

A harvest first writes the complete ``tokens`` array and commits it (``commits/tokens.json``). It
then computes activation chunks, in any order: each chunk of each hook is written (a chunk is one
object; locally a temporary file renamed into place by zarr, on object stores one PUT) and only
then committed by its own small object ``commits/<hook>/<chunk>.json`` holding its row range, its
``crc32c`` and its float64 partial statistics. A store's state is the set of commit objects:
there is no shared cursor, so a kill at any moment loses at most the chunks in flight, and
``--resume`` computes exactly the missing ones. :meth:`StoreWriter.finalize` reduces the partial
statistics in chunk-index order (exact, independent of the order chunks were computed in),
computes the content digest and marks the store ``complete``.

A chunk containing NaN or ±inf is never committed (:class:`~sae.errors.NonFiniteError`).
"""

from __future__ import annotations

import hashlib
import struct
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import zarr

from .. import __version__
from ..errors import NonFiniteError
from .codecs import CodecSpec
from .format import (
    COMMIT_INDEX,
    COMMITS,
    FORMAT_VERSION,
    RESUME_KEYS,
    STATUS_COMPLETE,
    STATUS_IN_PROGRESS,
    TOKENS,
    StoreError,
    array_names,
    canonical_hooks,
    chunk_key,
    chunk_rows,
    committed_chunks,
    scale_array_name,
)
from .lease import Lease
from .location import StoreLocation, as_location

TOKENS_COMMIT = "tokens.json"


def chunk_crc(loc: StoreLocation, array: str, i: int, ndim: int) -> int:
    """The ``crc32c`` stored in the last 4 bytes of chunk ``i`` of ``array`` (little-endian)."""
    return struct.unpack("<I", loc.tail_bytes(4, *chunk_key(array, i, ndim)))[0]


def content_digest(crcs: list[int]) -> str:
    """sha256 over the per-chunk crc32c values, in digest order (:func:`~sae.store.format.array_names`,
    chunk index within each array), each as 4 little-endian bytes."""
    return hashlib.sha256(b"".join(struct.pack("<I", c) for c in crcs)).hexdigest()


class StoreWriter:
    """Create (or reopen for ``resume``) a format-2 store and write committed chunks into it.

    Args:
        path: store path or URL (local, ``s3://``, ``gs://``, ``memory://``).
        meta: identity attributes (``model_id``, ``model_fingerprint``, ``tokenizer``, ``dataset``,
            ``split``, ``seed``, ``special_token_ids``, ``bos_token_id``...).
        hook_names: one activation array per hook, each ``[n_tokens, d_model]``.
        d_model, context_size, n_tokens_target: shapes; ``n_tokens_target`` is rounded up to whole
            sequences (the arrays shrink to the rows actually written, see :meth:`write_tokens`).
        codec: storage precision/compressor. chunk_tokens: rows per chunk (multiple of context_size).
        mode: ``"create"`` (a store must not exist there) or ``"resume"``. Replacing a store is the
            caller's job (:func:`sae.outputs.build_output` builds beside and swaps).
        storage_options: fsspec options for remote URLs.

    The writer holds the store's lease (:mod:`.lease`) until :meth:`finalize` or :meth:`close`.

    Raises:
        StoreError: existing store for ``create``; resume of a store harvested with different
            settings or of a format-1 store; bad chunk size. LeaseHeldError: another writer.
    """

    def __init__(self, path: str | Path | StoreLocation, meta: dict, hook_names: list[str], d_model: int,
                 context_size: int, n_tokens_target: int, codec: CodecSpec, chunk_tokens: int, mode: str = "create",
                 storage_options: dict | None = None) -> None:
        if chunk_tokens % context_size:
            raise StoreError(f"chunk_tokens {chunk_tokens} must be a multiple of context_size {context_size}")
        if mode not in ("create", "resume"):
            raise StoreError(f"unknown store writer mode {mode!r}: use 'create' or 'resume'")
        self.loc = as_location(path, storage_options)
        if self.loc.read_only:
            raise StoreError(f"{self.loc}: {self.loc.scheme}:// is read-only; harvest to a path, s3:// or gs://")
        self.codec, self.hook_names, self.chunk_tokens = codec, list(hook_names), chunk_tokens
        self.d_model, self.context_size = d_model, context_size
        n_target = -(-n_tokens_target // context_size) * context_size
        attrs = dict(meta)
        attrs.update(format_version=FORMAT_VERSION, hook_names=self.hook_names, d_model=d_model,
                     context_size=context_size, n_tokens_target=n_target, dtype=codec.dtype,
                     storage_dtype=codec.storage_dtype, codec=str(codec), chunk_tokens=chunk_tokens)
        self.lease = Lease(self.loc).acquire(takeover_stale=mode == "resume")
        try:
            exists = self.loc.exists("zarr.json")
            if exists and mode == "create":
                raise StoreError(f"{self.loc} already exists: pass --resume to continue it or --overwrite to "
                                 "replace it")
            if exists:
                self.group = zarr.open_group(store=self.loc.zarr_store(read_only=False), mode="r+",
                                             zarr_format=3)
                old = dict(self.group.attrs)
                if old.get("format_version") != FORMAT_VERSION:
                    raise StoreError(f"cannot resume {self.loc}: it is a format-{old.get('format_version')} store; "
                                     "`sae store convert` it or re-harvest with --overwrite")
                same_weights = old.get("model_fingerprint") == attrs.get("model_fingerprint")
                diff = [k for k in RESUME_KEYS if k in attrs and old.get(k) != attrs[k]
                        and not (k == "model_id" and same_weights)]  # a renamed id of the same weights
                if diff:
                    k = diff[0]
                    raise StoreError(f"cannot resume {self.loc}: {k} was {old.get(k)!r}, now {attrs[k]!r} "
                                     "(use the original settings, or --overwrite)")
            else:
                self.group = zarr.open_group(store=self.loc.zarr_store(read_only=False), mode="a", zarr_format=3)
                attrs.update(store_id=uuid.uuid4().hex[:16], package_version=__version__, status=STATUS_IN_PROGRESS,
                             created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                self._create_arrays(n_target)
                self.group.update_attributes(attrs)
        except BaseException:
            self.lease.release()
            raise
        self._next = 0  # sequential chunk index for :meth:`append`
        self._appended = 0  # rows written by :meth:`append`
        self.final_hooks = list(self.hook_names)  # the store's hooks once finalized (more with add_hooks)
        self.history: dict | None = None  # a digest_history entry to record at finalize (growing a store)

    @classmethod
    def _reopen_complete(cls, path: str | Path | StoreLocation, storage_options: dict | None, option: str,
                         allow_pending: str | None = None) -> tuple[StoreWriter, dict]:
        """Take the lease of a *complete* format-2 store and open it for growing (``--into``/``--extend``):
        the writer (codec, chunking and shapes from the store) and its attributes. Raises ``StoreError``."""
        self = cls.__new__(cls)
        self.loc = as_location(path, storage_options)
        self.lease = Lease(self.loc).acquire(takeover_stale=True)
        try:
            self.group = zarr.open_group(store=self.loc.zarr_store(read_only=False), mode="r+", zarr_format=3)
            a = dict(self.group.attrs)
            continuing = allow_pending is not None and (a.get("pending_growth") or {}).get("reason") == allow_pending
            if a.get("format_version") != FORMAT_VERSION or (a.get("status") != STATUS_COMPLETE and not continuing):
                raise StoreError(f"{option} {self.loc}: only a complete format-{FORMAT_VERSION} store can grow "
                                 f"(it is format {a.get('format_version')}, status {a.get('status')}); finish it "
                                 "with --resume or convert it first")
            self.codec = CodecSpec.parse(a["codec"], a["dtype"])
            self.hook_names = self.final_hooks = list(a["hook_names"])
            self.chunk_tokens, self.d_model = int(a["chunk_tokens"]), int(a["d_model"])
            self.context_size = int(a["context_size"])
            self._next = self._appended = 0
            self.history = None
        except BaseException:
            self.lease.release()
            raise
        return self, a

    @classmethod
    def add_hooks(cls, path: str | Path | StoreLocation, hooks: list[str], storage_options: dict | None = None
                  ) -> StoreWriter:
        """Reopen a *complete* store to add activation arrays for ``hooks`` over its own tokens
        (``sae harvest --into``); rerunning it continues an interrupted addition.

        The existing hooks are untouched and stay readable throughout: the new arrays are listed in
        ``pending_hooks`` and join ``hook_names`` only at :meth:`finalize`, which also records the
        old content digest in ``digest_history`` (runs trained before stay verifiable).

        Raises:
            StoreError: not a complete format-2 store, a hook it already has. LeaseHeldError.
        """
        self, a = cls._reopen_complete(path, storage_options, "--into")
        try:
            old, pending = list(a["hook_names"]), list(a.get("pending_hooks") or [])
            have = [h for h in hooks if h in old]
            if have:
                raise StoreError(f"--into {self.loc} already has {', '.join(have)}: --into adds new layers only")
            if pending and sorted(pending) != sorted(hooks):
                raise StoreError(f"--into {self.loc}: an interrupted --into of {', '.join(pending)} is pending; "
                                 "rerun it with those layers to finish it first")
            self.hook_names, self.final_hooks = list(hooks), old + list(hooks)
            self.history = {"content_digest": a.get("content_digest"), "hook_names": old,
                            "n_tokens": int(a.get("n_tokens_written", self.n_tokens)), "reason": "into"}
            n = self.n_tokens
            for h in hooks:
                if h not in self.group.array_keys():
                    self._create_hook_arrays(h, n)
            self.group.update_attributes({**a, "pending_hooks": list(hooks)})
        except BaseException:
            self.lease.release()
            raise
        return self

    @classmethod
    def extend(cls, path: str | Path | StoreLocation, new_tokens: np.ndarray, storage_options: dict | None = None
               ) -> StoreWriter:
        """Reopen a *complete* store to append ``new_tokens`` (whole sequences) after its rows
        (``sae harvest --extend``); its hooks' new chunks are then missing, to be computed.

        Rows ``[0, N1)`` stay byte-identical: whole chunks are not rewritten, and the chunk holding
        row ``N1`` (if partial) is recomputed with its first rows forced to the old stored bytes
        (:attr:`prefix`). The old content digest goes to ``digest_history`` with what
        :func:`~sae.store.verify.verify_store` needs to re-verify the prefix: the old chunks'
        crc32c and a sha256 of the boundary chunk's old rows.

        Raises:
            StoreError: not a complete format-2 store; ``new_tokens`` not whole sequences. LeaseHeldError.
        """
        self, a = cls._reopen_complete(path, storage_options, "--extend", allow_pending="extend")
        try:
            n1, ct = self.n_tokens, self.chunk_tokens
            if len(new_tokens) == 0 or len(new_tokens) % self.context_size:
                raise StoreError(f"--extend: {len(new_tokens)} new tokens are not whole sequences of "
                                 f"{self.context_size}")
            pending = a.get("pending_growth")
            if pending:  # an interrupted --extend: continue it with the record it wrote first
                self._continue_extend(pending, n1 := int(pending["n_tokens"]), n1 + len(new_tokens))
                if self.loc.read_json(COMMITS, TOKENS_COMMIT).get("rows") != self.n_target or self.n_tokens != \
                        self.n_target:
                    self._write_extension(n1, new_tokens)
                return self
            arrays = array_names(self.hook_names, self.codec.has_scale)
            old_crcs = {TOKENS: self.loc.read_json(COMMITS, TOKENS_COMMIT)["crc32c"]}
            for h in self.hook_names:
                recs = [self.loc.read_json(COMMITS, h, f"{i}.json") for i in range(self.n_chunks)]
                old_crcs[h] = [int(r["crc32c"][0]) for r in recs]
                if self.codec.has_scale:
                    old_crcs[scale_array_name(h)] = [int(r["crc32c"][1]) for r in recs]
            j, start = n1 // ct, (n1 // ct) * ct
            boundary = None
            if n1 % ct:  # the partial last chunk: keep its stored rows, byte for byte
                rows = {name: np.asarray(self.group[name][start:n1]) for name in arrays}
                boundary = {"chunk": j, "rows": [start, n1],
                            "sha256": {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
                                       for k, v in rows.items()}}
            self.history = {"content_digest": a.get("content_digest"), "hook_names": list(self.hook_names),
                            "n_tokens": n1, "reason": "extend", "crc32c": {k: old_crcs[k] for k in arrays},
                            "boundary": boundary}
            record = {**(a.get("harvest_config") or {}), "tokens": n1 + len(new_tokens)}
            # the growth record is written first: a killed --extend is continued from it (same history);
            # the crc index goes before anything changes (readers fall back to the commit objects)
            self.loc.remove(COMMITS, COMMIT_INDEX)
            self.group.update_attributes({**a, "status": STATUS_IN_PROGRESS, "n_tokens_target": n1 + len(new_tokens),
                                          "harvest_config": record, "pending_growth": self.history})
            self._continue_extend(self.history, n1, n1 + len(new_tokens))
            self._write_extension(n1, new_tokens)
        except BaseException:
            self.lease.release()
            raise
        return self

    def _continue_extend(self, record: dict, n1: int, n2: int) -> None:
        """Set :attr:`history` and :attr:`prefix` (the boundary chunk's old rows, checked against the
        sha256 the growth record holds) of an ``--extend`` from ``n1`` to ``n2`` rows."""
        if int(self.group.attrs.get("n_tokens_target", n2)) != n2:
            have = int(self.group.attrs["n_tokens_target"])
            raise StoreError(f"--extend {self.loc}: an interrupted --extend to {have} tokens is pending; rerun it with "
                             f"--tokens {have} (or --resume) to finish it first")
        self.history = {k: v for k, v in record.items() if k != "replaced"}
        self.prefix: dict[int, dict[str, np.ndarray]] = {}
        b = record.get("boundary")
        if b:
            start, stop = b["rows"]
            rows = {name: np.asarray(self.group[name][start:stop]) for name in b["sha256"]}
            for name, v in rows.items():
                if hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() != b["sha256"][name]:
                    raise StoreError(f"--extend {self.loc}: rows {start}:{stop} of {name} changed since the "
                                     "--extend began; the store is damaged (`sae store verify` it)")
            self.prefix[int(b["chunk"])] = {k: v for k, v in rows.items() if k != TOKENS}

    def _write_extension(self, n1: int, new_tokens: np.ndarray) -> None:
        """Resize to ``n1 + len(new_tokens)`` rows, write the new token ids, uncommit the boundary chunk,
        then commit the token array (in that order: a kill anywhere is continued by rerunning)."""
        self._resize(n1 + len(new_tokens))
        self.group[TOKENS][n1:] = new_tokens.astype(np.int32)
        for j in self.prefix:  # recompute the boundary chunk: uncommit it before the tokens commit
            for h in self.hook_names:
                self.loc.remove(COMMITS, h, f"{j}.json")
        crcs = [chunk_crc(self.loc, TOKENS, i, 1) for i in range(self.n_chunks)]
        self.loc.write_json({"rows": self.n_tokens, "crc32c": crcs}, COMMITS, TOKENS_COMMIT)

    @property
    def growing(self) -> bool:
        """True while adding hooks to a complete store (:meth:`add_hooks`)."""
        return self.final_hooks != self.hook_names

    def _create_arrays(self, n: int) -> None:
        kw = {"config": {"write_empty_chunks": True}}
        checked = CodecSpec("none", "float32").zarr_kwargs()  # crc32c only, for tokens / scales
        # dimension_names: xarray.open_zarr needs them for Zarr v3 arrays (one shared "token" axis)
        self.group.create_array(TOKENS, shape=(n,), chunks=(self.chunk_tokens,), dtype="int32", fill_value=-1,
                                dimension_names=("token",), **checked, **kw)
        for h in self.hook_names:
            self._create_hook_arrays(h, n)

    def _create_hook_arrays(self, h: str, n: int) -> None:
        kw = {"config": {"write_empty_chunks": True}}
        checked = CodecSpec("none", "float32").zarr_kwargs()
        self.group.create_array(h, shape=(n, self.d_model), chunks=(self.chunk_tokens, self.d_model),
                                dtype=self.codec.storage_dtype, dimension_names=("token", "d_model"),
                                **self.codec.zarr_kwargs(), **kw)
        if self.codec.has_scale:
            self.group.create_array(scale_array_name(h), shape=(n,), chunks=(self.chunk_tokens,),
                                    dtype="float32", dimension_names=("token",), **checked, **kw)

    # -- state ------------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.loc.url

    @property
    def n_target(self) -> int:
        return int(self.group.attrs["n_tokens_target"])

    @property
    def n_tokens(self) -> int:
        """Rows of the store (the token array's length)."""
        return int(self.group[TOKENS].shape[0])

    @property
    def n_chunks(self) -> int:
        return -(-self.n_tokens // self.chunk_tokens)

    def tokens_committed(self) -> bool:
        return self.loc.exists(COMMITS, TOKENS_COMMIT)

    def missing_chunks(self) -> list[int]:
        """Chunk indices not yet committed for every hook, ascending."""
        done = committed_chunks(self.loc.list_names, self.hook_names)
        return [i for i in range(self.n_chunks) if i not in done]

    @property
    def n_written(self) -> int:
        """Rows of the committed chunks (all hooks)."""
        if not self.tokens_committed() and self._next == 0:
            return 0
        return chunk_rows(self.n_tokens, self.chunk_tokens, committed_chunks(self.loc.list_names, self.hook_names))

    def read_tokens(self) -> np.ndarray:
        return np.asarray(self.group[TOKENS][:])

    # -- writing ----------------------------------------------------------------------------------
    def write_tokens(self, tokens: np.ndarray) -> None:
        """Write the complete token array ``[n]`` (n ≤ the target, a multiple of context_size; the
        arrays shrink to it) and commit it."""
        n = len(tokens)
        if n == 0 or n % self.context_size or n > self.n_target:
            raise StoreError(f"token array of {n} rows does not fit the store (target {self.n_target}, "
                             f"context {self.context_size})")
        self._resize(n)
        self.group[TOKENS][:] = tokens.astype(np.int32)
        crcs = [chunk_crc(self.loc, TOKENS, i, 1) for i in range(self.n_chunks)]
        self.loc.write_json({"rows": n, "crc32c": crcs}, COMMITS, TOKENS_COMMIT)

    def _resize(self, n: int) -> None:
        names = [TOKENS, *self.hook_names] + ([scale_array_name(h) for h in self.hook_names]
                                               if self.codec.has_scale else [])
        for name in names:
            arr = self.group[name]
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))

    def write_chunk(self, i: int, acts: dict[str, torch.Tensor], valid: np.ndarray,
                    tokens: np.ndarray | None = None) -> None:
        """Write and commit chunk ``i`` of every hook: ``acts[hook]`` ``[rows, d_model]``, ``valid``
        bool ``[rows]`` (non-special rows, which enter the statistics). ``tokens``: also write these
        token rows (sequential writers that have no complete token array up front)."""
        if tokens is not None:
            start = i * self.chunk_tokens
            self.group[TOKENS][start:start + len(valid)] = tokens.astype(np.int32)
        ChunkWriter(self.loc, self.group, self.codec, self.hook_names, self.chunk_tokens).write_chunk(
            i, acts, valid, prefix=getattr(self, "prefix", {}).get(i))

    def append(self, tokens: np.ndarray, acts: dict[str, torch.Tensor], valid: np.ndarray) -> None:
        """Sequential writing (``sae store convert``, tests): the next chunk with its token rows."""
        self.write_chunk(self._next, acts, valid, tokens)
        self._next += 1
        self._appended = self._next * self.chunk_tokens - self.chunk_tokens + len(valid)

    def finalize(self) -> None:
        """Reduce the committed chunks' statistics in chunk order, compute the content digest and
        mark the store complete; release the lease. Raises ``StoreError`` if a chunk is missing or the
        store was replaced by another process."""
        ChunkWriter(self.loc, self.group, self.codec, self.hook_names, self.chunk_tokens).check_same_store()
        if self._next:  # sequential writer: shrink to what was written, then commit the tokens
            n = self._appended
            self._resize(n)
            crcs = [chunk_crc(self.loc, TOKENS, i, 1) for i in range(self.n_chunks)]
            self.loc.write_json({"rows": n, "crc32c": crcs}, COMMITS, TOKENS_COMMIT)
        if self.n_tokens == 0 or not self.tokens_committed():
            self.group.update_attributes({**dict(self.group.attrs), "n_tokens_written": 0, "status": STATUS_COMPLETE,
                                          "stats": {}, "stats_count": 0, "content_digest": content_digest([])})
            self.close()
            return
        missing = self.missing_chunks()
        if missing:
            raise StoreError(f"{self.loc}: chunks {missing[:5]} are not committed; continue with --resume")
        crcs: dict[str, list[int]] = {TOKENS: self.loc.read_json(COMMITS, TOKENS_COMMIT)["crc32c"]}
        stats, count = {}, 0
        hooks = canonical_hooks(self.final_hooks)
        for h in hooks:
            total, sq, cnt = np.zeros(self.d_model, dtype=np.float64), 0.0, 0
            crcs[h], crcs[scale_array_name(h)] = [], []
            for i in range(self.n_chunks):
                rec = self.loc.read_json(COMMITS, h, f"{i}.json")
                total += np.asarray(rec["sum"], dtype=np.float64)
                sq += float(rec["sum_sq_norm"])
                cnt += int(rec["count"])
                crcs[h].append(int(rec["crc32c"][0]))
                if self.codec.has_scale:
                    crcs[scale_array_name(h)].append(int(rec["crc32c"][1]))
            c = max(cnt, 1)
            stats[h] = {"sum": total.tolist(), "sum_sq_norm": sq, "mean": (total / c).tolist(), "mean_sq_norm": sq / c}
            count = cnt
        order = array_names(hooks, self.codec.has_scale)
        digest = content_digest([c for name in order for c in crcs[name]])
        per_hook = {h: content_digest([c for name in array_names([h], self.codec.has_scale) for c in crcs[name]])
                    for h in hooks}
        # every chunk's committed crc32c in one object: readers check chunks against it cheaply
        self.loc.write_json({"crc32c": {name: crcs[name] for name in order}}, COMMITS, COMMIT_INDEX)
        attrs = {**dict(self.group.attrs), "n_tokens_written": self.n_tokens, "stats": stats, "stats_count": count,
                 "status": STATUS_COMPLETE, "content_digest": digest, "hook_digests": per_hook, "hook_names": hooks}
        for key in ("pending_hooks", "pending_growth"):
            if key in attrs:
                attrs.pop(key)
                del self.group.attrs[key]  # update_attributes merges: drop the key itself
        if self.growing:  # hooks are blocks.<L>.hook_resid_post
            attrs["layers"] = sorted({*attrs.get("layers", []),
                                      *(int(h.split(".")[1]) for h in hooks if h.split(".")[1].isdigit())})
        if self.history is not None and self.history.get("content_digest") not in (None, digest):
            attrs["digest_history"] = [*attrs.get("digest_history", []),
                                       {**self.history, "replaced": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
        self.group.update_attributes(attrs)
        self.close()

    def close(self) -> None:
        """Release the lease (idempotent)."""
        self.lease.release()


class ChunkWriter:
    """Writes and commits activation chunks into an *existing* store, without its lease.

    The unit of work of a distributed harvest: the coordinating :class:`StoreWriter` holds the
    lease, creates the arrays and writes the tokens; each worker process opens a ``ChunkWriter``
    on the same URL (:meth:`open`) and commits the chunks it is given. Chunks are disjoint objects
    and a chunk counts only once its commit object exists, so a worker killed mid-chunk leaves at
    most an uncommitted chunk that a retry overwrites.
    """

    def __init__(self, loc: StoreLocation, group: zarr.Group, codec: CodecSpec, hook_names: list[str],
                 chunk_tokens: int) -> None:
        self.loc, self.group, self.codec = loc, group, codec
        self.hook_names, self.chunk_tokens = list(hook_names), chunk_tokens
        self.store_id = group.attrs.get("store_id")

    def check_same_store(self) -> None:
        """Raise ``StoreError`` when the store at :attr:`loc` is no longer the one this writer opened
        (another process replaced or removed it): nothing more may be written into it."""
        try:
            now = (self.loc.read_json("zarr.json", fresh=True).get("attributes") or {}).get("store_id")
        except (OSError, ValueError, AttributeError):
            now = None
        if now != self.store_id:
            raise StoreError(f"{self.loc} was replaced or removed by another process while this harvest wrote it "
                             f"(store_id {self.store_id} → {now}); nothing more was written. Check who replaced "
                             "it, then harvest again")

    @classmethod
    def open(cls, path: str | Path | StoreLocation, hook_names: list[str] | None = None,
             storage_options: dict | None = None) -> ChunkWriter:
        """Open the store at ``path`` to write chunks of ``hook_names`` (default: all its hooks)."""
        loc = as_location(path, storage_options)
        group = zarr.open_group(store=loc.zarr_store(read_only=False), mode="r+", zarr_format=3)
        a = dict(group.attrs)
        hooks = list(hook_names) if hook_names is not None else list(a["hook_names"])
        return cls(loc, group, CodecSpec.parse(a["codec"], a["dtype"]), hooks, int(a["chunk_tokens"]))

    def tokens(self, i: int) -> np.ndarray:
        """The token ids of chunk ``i`` (int32)."""
        return np.asarray(self.group[TOKENS][i * self.chunk_tokens:(i + 1) * self.chunk_tokens])

    def write_chunk(self, i: int, acts: dict[str, torch.Tensor], valid: np.ndarray,
                    prefix: dict[str, np.ndarray] | None = None) -> None:
        """Write and commit chunk ``i`` of each of :attr:`hook_names` (see :meth:`StoreWriter.write_chunk`).
        ``prefix``: stored values (per array name) that the chunk's first rows must keep, byte for byte
        (the old rows of a chunk that ``--extend`` recomputes).

        Raises:
            NonFiniteError: a row holds NaN or inf (nothing of the chunk is committed).
        """
        start = i * self.chunk_tokens
        rows = len(valid)
        self.check_same_store()
        for h in self.hook_names:
            finite = torch.isfinite(acts[h]).all(dim=-1)
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten()
                raise NonFiniteError(
                    f"{h}: {len(bad)} rows of the chunk at rows {start}:{start + rows} contain NaN or inf "
                    f"(first: row {start + int(bad[0])}); refusing to commit it. Harvest in float32 "
                    "(--dtype float32, or a float32 model) or check the model; committed chunks are kept")
        vmask = torch.from_numpy(valid)
        for h in self.hook_names:
            stored, scale = self.codec.encode(acts[h])
            if prefix is not None:
                keep = prefix[h]
                stored = np.concatenate([keep, stored[len(keep):]]).astype(stored.dtype)
                if scale is not None:
                    scale = np.concatenate([prefix[scale_array_name(h)], scale[len(keep):]]).astype(scale.dtype)
            self.group[h][start:start + rows] = stored
            crcs = [chunk_crc(self.loc, h, i, 2)]
            if scale is not None:
                self.group[scale_array_name(h)][start:start + rows] = scale
                crcs.append(chunk_crc(self.loc, scale_array_name(h), i, 1))
            # statistics of exactly what readers will see (read back: lossy filters run inside zarr)
            back = np.asarray(self.group[h][start:start + rows])
            # numpy reductions: the same bits whatever torch's thread count (workers run single-threaded)
            x = self.codec.decode(back, scale)[vmask].double().numpy()
            record = {"chunk": i, "rows": [start, start + rows], "crc32c": crcs, "count": int(valid.sum()),
                      "sum": x.sum(0).tolist(), "sum_sq_norm": float((x * x).sum())}
            self.check_same_store()
            self.loc.write_json(record, COMMITS, h, f"{i}.json")  # the commit point of (h, i)
