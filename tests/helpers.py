"""Test helpers: synthetic stores with planted sparse features."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
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


REPO = Path(__file__).resolve().parents[1]

KILL_PROLOGUE = textwrap.dedent('''
    import json, os, signal, sys
    import zarr
    from sae.store.location import StoreLocation
    point, n = sys.argv[1], int(sys.argv[2])
    calls = {"commit": 0, "set": 0}
    real_write, real_set = StoreLocation.write_json, zarr.Array.__setitem__

    def write_json(self, obj, *parts, exclusive=False):
        is_commit = parts[0] == "commits"
        calls["commit"] += is_commit
        if is_commit and point == "before_commit" and calls["commit"] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(self, obj, *parts, exclusive=exclusive)
        if is_commit and point == "after_commit" and calls["commit"] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    def setitem(self, key, value):
        calls["set"] += 1
        if point == "mid_chunk" and calls["set"] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        real_set(self, key, value)

    StoreLocation.write_json = write_json
    zarr.Array.__setitem__ = setitem
''')
"""Prologue of a child script that SIGKILLs itself at a chosen store write: ``argv[1]`` is the point
(``before_commit``/``after_commit``: the n-th commit object; ``mid_chunk``: the n-th array write),
``argv[2]`` is n; the script's own arguments follow from ``argv[3]``."""


def run_killed(body: str, point: str, n: int, *args: object, env: dict[str, str] | None = None) -> None:
    """Run :data:`KILL_PROLOGUE` + ``body`` in a child Python and assert that it died by SIGKILL."""
    r = subprocess.run([sys.executable, "-c", KILL_PROLOGUE + textwrap.dedent(body), point, str(n),
                        *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=180,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    assert r.returncode == -signal.SIGKILL, r.stderr


def tree_hash(root: Path) -> str:
    """sha256 over every path below ``root`` (relative name, kind, and file bytes)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        h.update(f"d:{rel}\n".encode())
        for f in sorted(filenames):
            q = Path(dirpath) / f
            h.update(f"f:{rel}/{f}\n".encode())
            h.update(q.read_bytes())
    return h.hexdigest()
