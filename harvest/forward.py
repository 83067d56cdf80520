"""One chunk of tokens through the model: the unit of work of every harvest (local or on dask workers)."""

from __future__ import annotations

import numpy as np
import torch

from ..model import LoadedModel, capture_resid_post


@torch.no_grad()
def forward_chunk(lm: LoadedModel, tokens: np.ndarray, layers: list[int], batch_size: int) -> dict[int, torch.Tensor]:
    """``tokens [n_seq, ctx]`` → ``{L: [n_seq * ctx, d_model]}`` float32 on CPU, batched from chunk start."""
    parts: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    for i in range(0, len(tokens), batch_size):
        ids = torch.from_numpy(tokens[i:i + batch_size]).long().to(lm.device)
        got = capture_resid_post(lm.model, ids, layers)
        for L in layers:
            parts[L].append(got[L].reshape(-1, got[L].shape[-1]).float().cpu())
    return {L: torch.cat(v) for L, v in parts.items()}
