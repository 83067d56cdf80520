"""Resumable, chunk-at-a-time writer of an activation store.

A harvest appends whole chunks (``chunk_tokens`` rows, a multiple of ``context_size``). After the
arrays of a chunk are written, the group attributes are replaced by ONE write of ``zarr.json``
holding the new ``n_tokens_written`` together with the running statistics (zarr's local store
writes it to a temporary file and renames it): that write is the commit point. A kill at any
moment leaves the cursor and the statistics of the same chunk, so ``--resume`` continues at the
last committed chunk and ends with a store identical to an uninterrupted harvest (tested by
killing real processes before, during and right after a commit).

A chunk containing NaN or ±inf is never committed (:class:`~sae.errors.NonFiniteError`).
"""

from __future__ import annotations

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
    FORMAT_VERSION,
    RESUME_KEYS,
    STATUS_COMPLETE,
    STATUS_IN_PROGRESS,
    TOKENS,
    StoreError,
    scale_array_name,
)


class StoreWriter:
    """Create (or reopen for ``resume``) a store and append committed chunks.

    Args:
        path: store directory (``*.zarr``).
        meta: identity attributes (``model_id``, ``model_fingerprint``, ``tokenizer``,
            ``dataset``, ``split``, ``seed``, ``special_token_ids``, ``bos_token_id``...).
        hook_names: one activation array per hook, each ``[n_tokens, d_model]``.
        d_model, context_size, n_tokens_target: shapes; ``n_tokens_target`` is rounded up to
            whole sequences.
        codec: storage precision/compressor.
        chunk_tokens: rows per chunk; must be a multiple of ``context_size``.
        mode: ``"create"`` (error if ``path`` exists and is not empty) or ``"resume"``. Replacing a
            store is the caller's job (:func:`sae.outputs.build_output` builds beside and swaps).

    Raises:
        StoreError: existing path without resume/overwrite; resume of a store harvested with
            different settings; bad chunk size.
    """

    def __init__(self, path: str | Path, meta: dict, hook_names: list[str], d_model: int, context_size: int,
                 n_tokens_target: int, codec: CodecSpec, chunk_tokens: int, mode: str = "create") -> None:
        if chunk_tokens % context_size:
            raise StoreError(f"chunk_tokens {chunk_tokens} must be a multiple of context_size {context_size}")
        self.path = Path(path)
        self.codec = codec
        self.hook_names = list(hook_names)
        self.chunk_tokens = chunk_tokens
        n_target = -(-n_tokens_target // context_size) * context_size
        attrs = dict(meta)
        attrs.update(format_version=FORMAT_VERSION, hook_names=self.hook_names, d_model=d_model,
                     context_size=context_size, n_tokens_target=n_target, dtype=codec.dtype,
                     storage_dtype=codec.storage_dtype, codec=str(codec), chunk_tokens=chunk_tokens)
        if mode not in ("create", "resume"):
            raise StoreError(f"unknown store writer mode {mode!r}: use 'create' or 'resume'")
        exists = self.path.exists() and not (self.path.is_dir() and not any(self.path.iterdir()))
        if exists and mode == "create":
            raise StoreError(f"{self.path} already exists: pass --resume to continue it or --overwrite to replace it")
        if mode == "resume" and exists:
            self.group = zarr.open_group(str(self.path), mode="r+")
            old = dict(self.group.attrs)
            diff = [k for k in RESUME_KEYS if k in attrs and old.get(k) != attrs[k]]
            if diff:
                k = diff[0]
                raise StoreError(f"cannot resume {self.path}: {k} was {old.get(k)!r}, now {attrs[k]!r} "
                                 "(use the original settings, or --overwrite)")
            self.n_written = int(old["n_tokens_written"])
            self._sums = {h: np.asarray(old["stats"][h]["sum"], dtype=np.float64) for h in self.hook_names}
            self._sq = {h: float(old["stats"][h]["sum_sq_norm"]) for h in self.hook_names}
            self._count = int(old["stats_count"])
            return
        self.group = zarr.open_group(str(self.path), mode="w")
        self.group.create_array(TOKENS, shape=(n_target,), chunks=(chunk_tokens,), dtype="int32",
                                fill_value=-1)
        for h in self.hook_names:
            self.group.create_array(h, shape=(n_target, d_model), chunks=(chunk_tokens, d_model),
                                    dtype=codec.storage_dtype, **codec.zarr_kwargs())
            if codec.has_scale:
                self.group.create_array(scale_array_name(h), shape=(n_target,), chunks=(chunk_tokens,),
                                        dtype="float32")
        self.n_written = 0
        self._sums = {h: np.zeros(d_model, dtype=np.float64) for h in self.hook_names}
        self._sq = dict.fromkeys(self.hook_names, 0.0)
        self._count = 0
        attrs.update(store_id=uuid.uuid4().hex[:16], package_version=__version__,
                     created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self._commit(status=STATUS_IN_PROGRESS, extra=attrs)

    @property
    def n_target(self) -> int:
        return int(self.group.attrs["n_tokens_target"])

    def _commit(self, status: str, extra: dict | None = None) -> None:
        """Write cursor, statistics and status in ONE ``zarr.json`` write (the commit point).

        (``group.attrs.update(...)`` would write ``zarr.json`` once per key: a kill between those
        writes left the cursor a chunk ahead of the statistics.)"""
        count = max(self._count, 1)
        stats = {h: {"sum": self._sums[h].tolist(), "sum_sq_norm": self._sq[h],
                     "mean": (self._sums[h] / count).tolist(), "mean_sq_norm": self._sq[h] / count}
                 for h in self.hook_names}
        attrs = dict(self.group.attrs)
        attrs.update(extra or {})
        attrs.update(n_tokens_written=self.n_written, stats=stats, stats_count=self._count, status=status)
        self.group.update_attributes(attrs)

    def append(self, tokens: np.ndarray, acts: dict[str, torch.Tensor], valid: np.ndarray) -> None:
        """Write one chunk at the cursor and commit it.

        ``tokens``: int ``[rows]``; ``acts[hook]``: ``[rows, d_model]``; ``valid``: bool ``[rows]``
        marking rows (non-special tokens) that enter the running mean / mean-squared-norm.
        ``rows`` must be ``chunk_tokens``, except for the final chunk.
        """
        rows = len(tokens)
        start = self.n_written
        if start % self.chunk_tokens or start + rows > self.n_target:
            raise StoreError(f"chunk of {rows} rows at row {start} does not fit the store's chunk grid")
        for h in self.hook_names:
            finite = torch.isfinite(acts[h]).all(dim=-1) if acts[h].ndim == 2 else torch.isfinite(acts[h])
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten()
                raise NonFiniteError(
                    f"{h}: {len(bad)} rows of the chunk at rows {start}:{start + rows} contain NaN or inf "
                    f"(first: row {start + int(bad[0])}); refusing to commit it. Harvest in float32 "
                    "(--dtype float32, or a float32 model) or check the model; the store keeps its "
                    f"{start} committed rows")
        self.group[TOKENS][start:start + rows] = tokens.astype(np.int32)
        vmask = torch.from_numpy(valid)
        for h in self.hook_names:
            stored, scale = self.codec.encode(acts[h])
            self.group[h][start:start + rows] = stored
            if scale is not None:
                self.group[scale_array_name(h)][start:start + rows] = scale
            # statistics of exactly what readers will see (read back: lossy filters such as BitRound
            # run inside zarr)
            back = np.asarray(self.group[h][start:start + rows])
            x = self.codec.decode(back, scale)[vmask].double()
            self._sums[h] += x.sum(0).numpy()
            self._sq[h] += float(x.pow(2).sum())
        self._count += int(valid.sum())
        self.n_written = start + rows
        self._commit(status=STATUS_IN_PROGRESS)

    def finalize(self) -> None:
        """Shrink arrays to the rows written and mark the store complete."""
        n = self.n_written
        for name in [TOKENS, *self.hook_names] + ([scale_array_name(h) for h in self.hook_names]
                                                   if self.codec.has_scale else []):
            arr = self.group[name]
            arr.resize((n, *arr.shape[1:]))
        self._commit(status=STATUS_COMPLETE)
