"""Dense, obviously-correct reference implementations of the orthogonality penalties.

Each builds full ``F×F`` matrices in float64 (small F only) straight from the formulas of the
the research logs and papers cited in each variant's module: ``cos = W Wᵀ`` (unit decoder rows ``W`` ``[F, d]``), dense
codes ``f`` ``[B, F]``, co-firing indicator ``A = [f > 0]`` and co-activation counts ``AᵀA``. They
are the yardstick for the sparse/chunked implementations in ``sae.train.variants``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sae.rundir.sae import SparseCodes


def dense(codes: SparseCodes, d_sae: int) -> Tensor:
    """``[B, F]`` float64 dense codes."""
    return codes.to_dense(d_sae).double()


def active(codes: SparseCodes, d_sae: int) -> Tensor:
    """``[B, F]`` float64 indicator of ``f > 0``."""
    return (dense(codes, d_sae) > 0).double()


def cosines(W: Tensor) -> Tensor:
    """``[F, F]`` ``cos_ij = d_i·d_j`` in float64 (differentiable in ``W``)."""
    Wd = W.double()
    return Wd @ Wd.T


def upper(F: int) -> Tensor:
    """``[F, F]`` bool mask of ``i < j``."""
    return torch.ones(F, F, dtype=torch.bool).triu(1)


def cofire_counts(codes: SparseCodes, d_sae: int) -> Tensor:
    """``[F, F]`` tokens in which both i and j fire (diagonal: tokens in which i fires)."""
    A = active(codes, d_sae)
    return A.T @ A


def topk_pairs(W: Tensor, codes: SparseCodes, rho: float, tau: float, lam: float) -> tuple[Tensor, Tensor]:
    """Log 000_a2efda2023e864e4.txt: ``λ · mean_{kept} max(0, |cos| − τ)²``, kept = top ``ceil(ρ F(F−1)/2)`` pairs i<j
    by ``s = fᵀf`` among those with ``s > 0``. Returns ``(value, kept keys i·F+j sorted)``."""
    F = W.shape[0]
    f = dense(codes, F)
    S = f.T @ f
    iu = upper(F)
    ii, jj = iu.nonzero(as_tuple=True)
    s = S[ii, jj]
    n = math.ceil(rho * F * (F - 1) / 2 - 1e-9)
    pos = (s > 0).nonzero().squeeze(1)
    order = pos[torch.argsort(s[pos], descending=True, stable=True)][:n]
    cos = cosines(W)[ii[order], jj[order]]
    val = lam * (cos.abs() - tau).clamp_min(0).square().mean()
    return val, torch.sort(ii[order] * F + jj[order]).values


def progressive(W: Tensor, codes: SparseCodes, p: float, lambda2_max: float, base: float,
                eps: float) -> Tensor:
    """Log 002_7519ceacfbae4f80.txt: ``λ2(p) Σ_{i<j} clamp((n_ij − thr)/thr, 0, 1) |cos_ij|``."""
    F = W.shape[0]
    B = codes.idx.shape[0]
    lam = lambda2_max * (1 - p) ** 2
    thr = max(base * (1 - p), eps)
    n = cofire_counts(codes, F) / B
    c = ((n - thr) / thr).clamp(0, 1)
    return lam * (c * cosines(W).abs())[upper(F)].sum()


def hinge_sq_matrix(W: Tensor, group: Tensor, alpha: float) -> Tensor:
    """``[F, F]`` ``h_ij = max(0, |cos_ij| − α·[g_i = g_j])²``."""
    same = (group[:, None] == group[None, :]).double()
    return (cosines(W).abs() - alpha * same).clamp_min(0).square()


def adaptive_sum(W: Tensor, group: Tensor, alpha: float) -> Tensor:
    """Logs 001_78720f72b251669d.txt, 003_178e35e7e8e06692.txt, densely in float64: ``Σ_{i<j} max(0, |cos_ij| − α·[g_i
    = g_j])²`` with ``cos_ij = d_i·d_j`` of the (unit) decoder rows, as the trainer's constraint keeps them."""
    F = W.shape[0]
    cos = W.double() @ W.double().T
    same = (group[:, None] == group[None, :]).double()
    h = (cos.abs() - alpha * same).clamp_min(0).square()
    return h[torch.triu(torch.ones(F, F, dtype=torch.bool), 1)].sum()


def static_ortho_exact(W: Tensor, lam: float) -> Tensor:
    """The logs' fixed-orthogonal baseline: ``λ ‖W Wᵀ − I‖²_F / F²`` over the off-diagonal entries."""
    F = W.shape[0]
    G = cosines(W) - torch.eye(F, dtype=torch.float64)
    off = ~torch.eye(F, dtype=torch.bool)
    return lam * G[off].square().sum() / F**2


def same_chunk(chunks: Tensor, F: int) -> Tensor:
    """``[F, F]`` bool: i ≠ j in the same row of ``chunks`` ``[m, c]`` (entries ≥ F are padding)."""
    label = torch.full((F,), -1, dtype=torch.long)
    for r, row in enumerate(chunks):
        row = row[row < F]
        label[row] = r
    m = (label[:, None] == label[None, :]) & (label[:, None] >= 0)
    return m & ~torch.eye(F, dtype=torch.bool)


def static_ortho_chunked(W: Tensor, lam: float, chunks: Tensor) -> Tensor:
    """The chunk estimator: ``λ · mean_{i≠j same chunk} cos² · F(F−1)/F²``."""
    F = W.shape[0]
    m = same_chunk(chunks, F)
    return lam * cosines(W)[m].square().mean() * (F * (F - 1) / F**2)


def ortsae(W: Tensor, lam: float, chunks: Tensor) -> Tensor:
    """OrtSAE, arXiv 2509.22033: ``λ · mean_i max_{j ≠ i, same chunk} cos_ij²`` (latents alone in a chunk skipped)."""
    F = W.shape[0]
    m = same_chunk(chunks, F)
    C2 = cosines(W).square().masked_fill(~m, -1.0)
    best = C2.max(1).values
    has = m.any(1)
    return lam * best[has].mean()


class DenseTemporalTracker:
    """Log 004_09d1b6f66c15dfbf.txt with dense ``[F, F]`` float64 matrices (upper triangle used), one token at a
    time."""

    def __init__(self, F: int, window: int, alpha_base: float, count_scale: float, eps: float) -> None:
        self.F, self.window, self.eps = F, window, eps
        self.alpha_base, self.count_scale = alpha_base, count_scale
        self.count = torch.zeros(F, F, dtype=torch.float64)
        self.tokens = 0
        self.cbar = torch.zeros(F, F, dtype=torch.float64)
        self.c = torch.zeros(F, F, dtype=torch.float64)
        self.w = torch.zeros(F, F, dtype=torch.float64)
        self.windows = 0

    def feed(self, codes: SparseCodes) -> None:
        A = active(codes, self.F)
        iu = upper(self.F)
        for row in A:
            self.count += torch.outer(row, row) * iu
            self.tokens += 1
            if self.tokens == self.window:
                c = self.count / self.tokens
                alpha = torch.minimum(self.count / self.count_scale, torch.tensor(self.alpha_base))
                self.cbar = (1 - alpha) * self.cbar + alpha * c
                mx = torch.maximum(torch.maximum(c, self.cbar), torch.tensor(self.eps))
                self.w = c * (1 + (c - self.cbar).abs() / mx)
                self.c = c
                self.count = torch.zeros_like(self.count)
                self.tokens = 0
                self.windows += 1

    def penalty(self, W: Tensor, lam: float) -> Tensor:
        """``λ Σ_{i<j} w_ij |cos_ij|``."""
        return lam * (self.w * cosines(W).abs())[upper(self.F)].sum()


def jaccard(a: set[int], b: set[int]) -> float:
    """``|A ∩ B| / |A ∪ B|`` (1.0 for two empty sets)."""
    return 1.0 if not (a | b) else len(a & b) / len(a | b)
