"""``progressive`` (log ``002_7519ceacfbae4f80.txt``): co-firing-gated orthogonality whose weight and threshold decay.

From the research log ``002_7519ceacfbae4f80.txt``: with training progress ``p = step/total_steps``,

    λ2(p)  = λ2_max · (1 − p)²
    thr(p) = max(base · (1 − p), ε)
    n_ij   = fraction of the batch's tokens in which latents i and j both fire (f > 0)
    c_ij   = clamp((n_ij − thr)/thr, 0, 1)
    L      = λ2(p) · Σ_{i<j} c_ij · |cos_ij|,     cos_ij = d_i·d_j (unit decoder rows)

``ε > 0`` keeps ``thr`` (a divisor) positive at ``p = 1``. Only pairs with ``n_ij > thr`` have
``c_ij > 0`` and every such pair co-fires, so the sum runs over the batch's co-firing pairs found
by :func:`~.pairs.cofiring_pairs` (``O(B·K²)``, independent of F) and the cosines are formed
only for the selected pairs (:func:`~.pairs.cofiring_penalty`) — never an ``F×F`` matrix.
(The research the log applied the weights to ``|f_iᵀ f_j|`` of the activations; we use decoder
cosines, so the penalty has no gradient with respect to the codes.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import Penalty, PenaltyContext, register
from .pairs import cofiring_pairs, cofiring_penalty


def lambda2(p: float, lambda2_max: float) -> float:
    """``λ2(p) = λ2_max · (1 − p)²``."""
    return lambda2_max * (1.0 - p) ** 2


def threshold(p: float, base: float, eps: float) -> float:
    """``thr(p) = max(base · (1 − p), ε)``."""
    return max(base * (1.0 - p), eps)


def competition(n: Tensor, thr: float) -> Tensor:
    """``c = clamp((n − thr)/thr, 0, 1)`` elementwise (``thr > 0``)."""
    return ((n - thr) / thr).clamp(0.0, 1.0)


@register
class ProgressivePenalty(Penalty):
    """``λ2(p) · Σ_{i<j} c_ij(p) · |cos_ij|`` over the batch's co-firing pairs (the log).

    Stateless: the schedule reads ``ctx.progress``, so it resumes exactly without buffers.
    """

    name = "progressive"

    @dataclass
    class Config:
        """Defaults: ``lambda2_max=0.1`` and ``base_threshold=0.1`` (the log's run 1), ``eps=1e-3``
        (floor of the threshold: late in training a pair must co-fire on > 0.1 % of the batch's
        tokens, and on ≥ 0.2 % for full weight). The sum is not normalised (as in the log): with
        ``Σ_{i<j} n_ij ≈ K(K−1)/2`` at most ``K(K−1)/(2·thr)`` pairs are active, so at ``p = 0`` the
        penalty is ≤ 0.1·Σ c·|cos|, typically 0.01–0.1."""

        ranges = {"lambda2_max": ">=0", "base_threshold": "(0,1]", "eps": ">0"}
        """Allowed values, checked by ``make_config`` (not a dataclass field: no annotation)."""

        lambda2_max: float = 0.1
        base_threshold: float = 0.1
        eps: float = 1e-3

    def __init__(self, d_sae: int, d_in: int, config: Any) -> None:
        super().__init__(d_sae, d_in, config)
        if config.eps <= 0:
            raise ValueError("progressive: eps must be > 0 (it bounds the threshold away from 0)")

    def schedule(self, p: float) -> tuple[float, float]:
        """``(λ2(p), thr(p))``."""
        c = self.config
        return lambda2(p, c.lambda2_max), threshold(p, c.base_threshold, c.eps)

    def forward(self, ctx: PenaltyContext) -> tuple[Tensor, dict[str, float]]:
        W = ctx.W_dec
        lam, thr = self.schedule(ctx.progress)
        cof = cofiring_pairs(ctx.codes, self.d_sae)
        n = cof.counts.to(W.dtype) / max(cof.n_tokens, 1)
        c = competition(n, thr)
        weight = lam * c
        val, sel, cos = cofiring_penalty(W, cof, weight, 0.0, power=1)
        with torch.no_grad():
            gated = c[sel]
        logs = {
            "penalty": float(val.detach()), "weight": lam, "lambda2": lam, "thr": thr,
            "pairs": float(sel.numel()), "cofiring_pairs": float(cof.n_pairs),
            "mean_c": float(gated.mean()) if gated.numel() else 0.0,
            "mean_abs_cos": float(cos.abs().mean()) if cos.numel() else 0.0,
        }
        return val, logs
