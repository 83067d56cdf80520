"""Re-encode a store with another precision/codec (no model rerun): ``sae store convert``."""

from __future__ import annotations

from pathlib import Path

from ..outputs import check_output_location
from .codecs import CodecSpec
from .format import RESUME_KEYS, StoreError
from .lease import building, check_not_leased
from .location import StoreLocation, as_location
from .reader import ActivationStore
from .writer import StoreWriter


def convert_store(src: str | Path, dst: str | Path, codec: str, dtype: str | None = None, n_tokens: int | None = None,
                  overwrite: bool = False, storage_options: dict | None = None) -> str:
    """Copy the first ``n_tokens`` rows (default all, whole chunks) of ``src`` to ``dst`` re-encoded
    with ``codec``/``dtype`` (default: the source dtype). Statistics are recomputed from the new
    stored values; identity attributes (model, dataset, ...) are kept.

    ``overwrite`` replaces only a store of ours, atomically (built beside, swapped at the end).

    Raises ``StoreError`` for a missing/incomplete source, ``SaeError`` for an existing ``dst``
    without ``overwrite``, a ``dst`` that is not a store of ours, or an unwritable ``dst``.
    """
    spec = CodecSpec.parse(codec, dtype or "float32")
    s = ActivationStore(src, storage_options=storage_options)
    spec = CodecSpec.parse(codec, dtype or s.attrs["dtype"])
    if n_tokens is not None and n_tokens < s.context_size:
        raise StoreError(f"--tokens {n_tokens} is less than one sequence ({s.context_size} tokens)")
    dst_loc = as_location(str(dst), storage_options)
    if (dst_loc.local and s.loc.local and dst_loc.path.resolve() == s.loc.path.resolve()) or dst_loc.url == s.loc.url:
        raise StoreError(f"destination {dst} is the source store: pick another destination")
    if dst_loc.read_only:
        raise StoreError(f"destination {dst}: {dst_loc.scheme}:// is read-only; convert to a path, s3:// or gs://")
    if dst_loc.local:
        check_output_location(dst_loc.path, "destination")
        if overwrite:
            check_not_leased(dst_loc, "--overwrite")
    n = min(n_tokens or s.n_tokens, s.n_tokens)
    n -= n % s.context_size
    keep = {k: v for k, v in s.attrs.items() if k not in RESUME_KEYS or k in ("model_id", "model_fingerprint",
                                                                               "dataset", "split", "seed")}
    for k in ("stats", "stats_count", "n_tokens_written", "status", "store_id", "created", "package_version",
              "format_version", "hook_names", "d_model", "n_tokens_target", "storage_dtype", "codec", "dtype",
              "chunk_tokens", "context_size"):
        keep.pop(k, None)
    keep["converted_from"] = {"path": str(src), "store_id": s.attrs.get("store_id"), "codec": s.attrs["codec"],
                              "dtype": s.attrs["dtype"]}
    def copy(target: Path | StoreLocation) -> None:
        w = StoreWriter(target, keep, s.hook_names, s.d_model, s.context_size, n, spec, s.chunk_tokens,
                        storage_options=storage_options)
        try:
            tokens = s.tokens
            for start in range(0, n, s.chunk_tokens):
                stop = min(start + s.chunk_tokens, n)
                tok = tokens[start:stop]
                w.append(tok, {h: s.read_rows(h, start, stop) for h in s.hook_names}, s.valid_mask(tok))
            w.finalize()
        finally:
            w.close()

    if not dst_loc.local and dst_loc.exists("zarr.json"):
        raise StoreError(f"{dst} already exists (remote stores cannot be replaced atomically): pick a new URL")
    with building(dst_loc, overwrite=overwrite) as target:
        copy(target)
    return str(dst)
