"""Re-encode a store with another precision/codec (no model rerun): ``sae store convert``."""

from __future__ import annotations

from pathlib import Path

from .codecs import CodecSpec
from .format import RESUME_KEYS
from .reader import ActivationStore
from .writer import StoreWriter


def convert_store(src: str | Path, dst: str | Path, codec: str, dtype: str | None = None, n_tokens: int | None = None,
                  overwrite: bool = False) -> Path:
    """Copy the first ``n_tokens`` rows (default all, whole chunks) of ``src`` to ``dst`` re-encoded
    with ``codec``/``dtype`` (default: the source dtype). Statistics are recomputed from the new
    stored values; identity attributes (model, dataset, ...) are kept.

    Raises ``StoreError`` for a missing/incomplete source or an existing ``dst`` without ``overwrite``.
    """
    s = ActivationStore(src)
    spec = CodecSpec.parse(codec, dtype or s.attrs["dtype"])
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
    w = StoreWriter(dst, keep, s.hook_names, s.d_model, s.context_size, n, spec, s.chunk_tokens,
                    mode="overwrite" if overwrite else "create")
    tokens = s.tokens
    for start in range(0, n, s.chunk_tokens):
        stop = min(start + s.chunk_tokens, n)
        tok = tokens[start:stop]
        w.append(tok, {h: s.read_rows(h, start, stop) for h in s.hook_names}, s.valid_mask(tok))
    w.finalize()
    return Path(dst)
