"""Test helpers: synthetic stores with planted sparse features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sae.store import CodecSpec, StoreWriter

BOS = 2


def planted_features(n_tokens: int, d_in: int = 32, n_features: int = 64, active: int = 3, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [n_tokens, d_in]`` = sum of ``active`` random unit features per token with magnitudes U(1, 2);
    returns ``(x, features [n_features, d_in])``."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_features, d_in, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_features, generator=g)[:active] for _ in range(n_tokens)])
    mags = 1 + torch.rand(n_tokens, active, generator=g)
    x = (mags[..., None] * feats[idx]).sum(1)
    return x, feats


def write_store(path: Path, x: torch.Tensor, context_size: int = 64, chunk_tokens: int = 1024,
                codec: str = "zstd", dtype: str = "float32", hook: str = "blocks.0.hook_resid_post") -> Path:
    """Write activations ``x [n, d]`` as a complete store; every ``context_size``-th row is a BOS row
    (its activation replaced by a huge vector, as in Gemma)."""
    n, d = x.shape
    tokens = np.arange(n, dtype=np.int32) % 97 + 10
    tokens[::context_size] = BOS
    x = x.clone()
    x[::context_size] = 1000.0
    meta = {"model_id": "synthetic", "model_fingerprint": "0", "tokenizer": "", "dataset": "synthetic",
            "split": "train", "seed": 0, "special_token_ids": [0, 1, BOS], "bos_token_id": BOS}
    w = StoreWriter(path, meta, [hook], d, context_size, n, CodecSpec.parse(codec, dtype), chunk_tokens)
    for s in range(0, n, chunk_tokens):
        tok = tokens[s:s + chunk_tokens]
        w.append(tok, {hook: x[s:s + chunk_tokens]}, tok != BOS)
    w.finalize()
    return path
