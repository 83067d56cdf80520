"""Read-only access to an activation store: metadata, decoded chunks, statistics."""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import zarr

from .codecs import CodecSpec
from .format import FORMAT_VERSION, REQUIRED_ATTRS, STATUS_COMPLETE, TOKENS, StoreError, scale_array_name


class ActivationStore:
    """An opened store. Arrays are read lazily, chunk by chunk; nothing is loaded whole.

    Raises:
        StoreError: missing path, not a store, unknown format version, incomplete store
            (when ``require_complete``), or a corrupt chunk when it is read.
    """

    def __init__(self, path: str | Path, require_complete: bool = True) -> None:
        self.path = str(path)
        if "://" not in self.path and not Path(self.path).exists():
            raise StoreError(f"no store at {self.path}: run `sae harvest --out {self.path}` first")
        if "://" not in self.path and not Path(self.path).is_dir():
            raise StoreError(f"{self.path} is a file, not a store directory: pass a store written by `sae harvest`")
        try:
            self.group = zarr.open_group(self.path, mode="r")
        except Exception as e:  # zarr raises several types for "not a group"
            raise StoreError(f"{self.path} is not a Zarr activation store ({e})") from e
        self.attrs: dict = dict(self.group.attrs)
        version = self.attrs.get("format_version")
        if version is None:
            raise StoreError(f"{self.path} is a Zarr group but not an sae activation store (it has no "
                             "format_version attribute): pass a store written by `sae harvest`")
        if version != FORMAT_VERSION:
            raise StoreError(f"{self.path}: store format {version!r} is not {FORMAT_VERSION}; "
                             "re-harvest it with this version of sae")
        missing = [k for k in REQUIRED_ATTRS if k not in self.attrs]
        if missing:
            raise StoreError(f"{self.path} lacks the store attribute {missing[0]!r}: it is damaged or was not "
                             "written by `sae harvest`; re-harvest it")
        if require_complete and self.attrs.get("status") != STATUS_COMPLETE:
            raise StoreError(f"{self.path} is incomplete ({self.attrs.get('n_tokens_written', 0)} tokens written): "
                             "finish it with `sae harvest ... --resume`")
        try:
            self.codec = CodecSpec.parse(self.attrs["codec"], self.attrs["dtype"])
        except ValueError as e:
            raise StoreError(f"{self.path}: {e}") from None
        missing_arrays = [h for h in [TOKENS, *self.hook_names] if h not in self.group]
        if missing_arrays:
            raise StoreError(f"{self.path} has no array {missing_arrays[0]!r}: the store is damaged; re-harvest it")

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
        return int(self.attrs["n_tokens_written"])

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

    def mean(self, hook_name: str) -> torch.Tensor:
        """Per-dimension mean ``[d_model]`` over non-special tokens (raw activation units)."""
        return torch.tensor(self.attrs["stats"][hook_name]["mean"], dtype=torch.float32)

    def mean_sq_norm(self, hook_name: str) -> float:
        """E‖x‖² over non-special tokens (raw units²)."""
        return float(self.attrs["stats"][hook_name]["mean_sq_norm"])

    def norm_scale(self, hook_name: str) -> float:
        """Scalar ``s`` with E‖s·x‖² = d_model (SAELens ``expected_average_only_in`` normalisation)."""
        return math.sqrt(self.d_model / self.mean_sq_norm(hook_name))

    # -- data ---------------------------------------------------------------------------------
    @cached_property
    def tokens(self) -> np.ndarray:
        """All token ids ``[n_tokens]`` (int32; 4 bytes per row, read once)."""
        return np.asarray(self.group[TOKENS][: self.n_tokens])

    def valid_mask(self, tokens: np.ndarray) -> np.ndarray:
        """Bool mask of rows whose token is not special (BOS/EOS/PAD are excluded)."""
        return ~np.isin(tokens, np.asarray(self.special_token_ids, dtype=np.int64))

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        start = i * self.chunk_tokens
        return start, min(start + self.chunk_tokens, self.n_tokens)

    def read_rows(self, hook_name: str, start: int, stop: int) -> torch.Tensor:
        """Decode rows ``[start, stop)`` → float32 ``[stop - start, d_model]`` (raw units)."""
        try:
            stored = np.asarray(self.group[hook_name][start:stop])
            scale = (np.asarray(self.group[scale_array_name(hook_name)][start:stop])
                     if self.codec.has_scale else None)
        except KeyError:
            raise
        except Exception as e:
            raise StoreError(f"corrupt chunk in {self.path}/{hook_name} rows {start}:{stop} ({e}): "
                             "delete the store and re-harvest (or restore it from a teammate's copy)") from e
        return self.codec.decode(stored, scale)

    def read_chunk(self, hook_name: str, i: int) -> torch.Tensor:
        """Decoded chunk ``i`` → float32 ``[rows, d_model]``."""
        return self.read_rows(hook_name, *self.chunk_bounds(i))

    def nbytes_stored(self) -> int:
        """Bytes on disk of all arrays."""
        return int(sum(self.group[name].nbytes_stored() for name in self.group.array_keys()))

    def nbytes_logical(self) -> int:
        """Bytes of the activations as float32 plus tokens: the SAELens-style raw reference."""
        return self.n_tokens * (4 + 4 * self.d_model * len(self.hook_names))
