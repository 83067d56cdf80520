"""``static_ortho``: the research logs' "fixed orthogonal SAE" baseline, estimated on random chunks.

The research logs' fixed-orthogonal baseline: ``L = λ · ‖W_dec W_decᵀ − I‖²_F / F²`` restricted to the
off-diagonal entries, i.e. ``λ · Σ_{i≠j} cos_ij² / F²`` (unit decoder rows, ``cos_ij = d_i·d_j``).
The seeds formed the full ``F×F`` Gram matrix every step (1.07 GB at F = 16384); here it is
estimated without bias from random chunks, so the cost is ``O(n·c·d)`` for ``n`` chunks of ``c``
latents:

* each step, ``ctx.generator`` draws a random permutation of the F latents, cut into consecutive
  chunks of ``chunk_size`` (the last one shorter when ``c ∤ F``); the first ``chunks_per_step``
  chunks are used (0 = all of them, every latent every step);
* ``mean_pairs`` = mean of ``cos_ij²`` over the ordered pairs ``i ≠ j`` inside the used chunks. Under
  a uniformly random permutation every unordered pair is equally likely to share a chunk, so this is
  an unbiased estimate of the mean over all ``F(F−1)`` off-diagonal entries (exact when the used
  chunks cover all latents in one chunk, ``chunk_size ≥ F``);
* ``L = λ · mean_pairs · F(F−1)/F²``.

The gradient ``∂/∂d_i Σ_{i≠j∈chunk} cos_ij² = 4 Σ_{j≠i} cos_ij d_j`` is computed by one batched matmul
per chunk from the saved chunk Gram matrices (custom autograd function).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import Penalty, PenaltyContext, register
from .chunks import CHUNK_BLOCK, chunk_sizes, padded, random_chunks


class _ChunkOffDiagSq(torch.autograd.Function):
    """``Σ_chunks Σ_{i≠j ∈ chunk} (d_i·d_j)²`` with chunks ``[m, c]`` (padding index F = zero row)."""

    @staticmethod
    def forward(ctx: Any, W: Tensor, chunks: Tensor) -> Tensor:
        Wp = padded(W)
        total = W.new_zeros((), dtype=torch.float64)
        grams = []
        for s in range(0, chunks.shape[0], CHUNK_BLOCK):
            Wc = Wp[chunks[s:s + CHUNK_BLOCK]]
            G = torch.bmm(Wc, Wc.transpose(1, 2))
            G.diagonal(dim1=1, dim2=2).zero_()
            total += (G * G).sum(dtype=torch.float64)
            grams.append(G)
        ctx.save_for_backward(W, chunks, *grams)
        return total.to(W.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        W, chunks, *grams = ctx.saved_tensors
        Wp = padded(W)
        gW = W.new_zeros(W.shape[0] + 1, W.shape[1])
        for n, s in enumerate(range(0, chunks.shape[0], CHUNK_BLOCK)):
            ch = chunks[s:s + CHUNK_BLOCK]
            dWc = torch.bmm(grams[n], Wp[ch]).mul_(4 * grad)
            gW[ch.reshape(-1)] = dWc.reshape(-1, W.shape[1])  # indices are distinct except padding
        return gW[:-1], None


def chunk_offdiag_sq(W: Tensor, chunks: Tensor) -> tuple[Tensor, int]:
    """``(Σ_{i≠j in the same chunk} cos_ij², number of ordered pairs i≠j)`` for ``chunks`` ``[m, c]``."""
    n_pairs = sum(s * (s - 1) for s in chunk_sizes(W.shape[0], chunks))  # arithmetic: no device read
    return _ChunkOffDiagSq.apply(W, chunks.to(W.device)), n_pairs


@register
class StaticOrthoPenalty(Penalty):
    """``λ · ‖W_dec W_decᵀ − I‖²_F,off-diag / F²``, unbiasedly estimated on random latent chunks."""

    name = "static_ortho"
    uses_codes = False

    @dataclass
    class Config:
        """Defaults: ``lambda_=10.0`` (random unit rows in ``d_in`` dims have mean ``cos² ≈ 1/d_in``,
        ≈ 0.0016 at d_in = 640, so the penalty starts near 0.016), ``chunk_size=1024`` and
        ``chunks_per_step=4`` (≤ 4096 latents per step: cost ``4·c²·d`` ≈ 3 GFLOP forward, independent
        of F; 0 = every chunk, cost ``F·c·d``)."""

        ranges = {"lambda_": ">=0", "chunk_size": ">=2", "chunks_per_step": ">=0"}
        """Allowed values, checked by ``make_config`` (not a dataclass field: no annotation)."""

        lambda_: float = 10.0
        chunk_size: int = 1024
        chunks_per_step: int = 4

    def forward(self, ctx: PenaltyContext) -> tuple[Tensor, dict[str, float]]:
        W = ctx.W_dec
        F = self.d_sae
        chunks = random_chunks(F, self.config.chunk_size, self.config.chunks_per_step, ctx.generator)
        sq, n_pairs = chunk_offdiag_sq(W, chunks)
        if n_pairs == 0:
            return W.sum() * 0.0, {"penalty": 0.0, "weight": self.config.lambda_, "pairs": 0.0}
        mean_sq = sq / n_pairs
        val = self.config.lambda_ * mean_sq * (F * (F - 1) / F**2)
        logs = {"penalty": val.detach(), "weight": float(self.config.lambda_),
                "pairs": float(n_pairs // 2), "mean_cos2": mean_sq.detach()}
        return val, logs
