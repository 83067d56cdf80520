"""``topk_pairs`` (log ``000_a2efda2023e864e4.txt``): orthogonality on the batch's most co-activated latent pairs.

From the research log ``000_a2efda2023e864e4.txt``: per batch, score every unique pair ``i < j`` by its
co-activation ``s_ij = Σ_b f_bi f_bj``, keep the top ``ρ`` fraction of all ``F(F−1)/2`` unique
pairs and penalise ``mean_{kept} max(0, |cos_ij| − τ)²`` with ``cos_ij = d_i·d_j`` (unit decoder
rows). ``τ`` is fixed, or adaptive: an EMA of ``mean + std`` of the kept ``|cos_ij|``, clamped to
``[0.05, 0.3]``. Pair-selection stability is the Jaccard overlap of the kept-pair sets between
consecutive logging steps (:meth:`TopKPairsPenalty.diagnostics`).

The co-firing pairs and the penalty sum come from the shared pair engine (:mod:`.pairs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import PenaltyContext, register
from .pairs import CoFiring, SparseStatePenalty, cofiring_pairs, cofiring_penalty, jaccard

# ---------------------------------------------------------------------------------------------------
# the variant
# ---------------------------------------------------------------------------------------------------

TAU_MIN, TAU_MAX = 0.05, 0.3


def n_keep(d_sae: int, rho: float) -> int:
    """Pairs kept per batch: ``ceil(ρ · F(F−1)/2)`` (at least 1 when ρ > 0)."""
    total = d_sae * (d_sae - 1) // 2
    return min(total, max(1 if rho > 0 else 0, math.ceil(rho * total - 1e-9)))


@register
class TopKPairsPenalty(SparseStatePenalty):
    """``λ · mean_{(i,j) ∈ top-ρ co-activated pairs} max(0, |cos_ij| − τ)²`` (research the log).

    Kept pairs: the ``n = ceil(ρ·F(F−1)/2)`` unique pairs ``i < j`` with the largest
    ``s_ij = Σ_b f_bi f_bj`` among the pairs that co-fire in the batch (all co-firing pairs when
    fewer than ``n`` co-fire). ``τ`` used at a step is the value before that step's EMA update.
    Buffers: ``tau`` (scalar), ``last_keys`` (this step's kept keys ``i·F+j``), ``logged_keys`` (kept
    keys at the previous :meth:`diagnostics` call), ``n_logged``.
    """

    name = "topk_pairs"
    resizable = ("last_keys", "logged_keys")

    @dataclass
    class Config:
        """Defaults: ``lambda_=1.0`` (the penalty is a mean of squared excess cosines ≤ (1−τ)², so it
        starts ≈ 0 at random init and reaches 0.01–0.1 when co-firing pairs align at |cos| ≈ 0.2–0.4),
        ``rho=0.001`` (the log's 0.1 %), ``tau=0.1`` (the log's fixed τ; also the initial value in
        adaptive mode), ``tau_mode="fixed"`` or ``"adaptive"``, ``tau_ema=0.99`` (EMA decay per step of
        the adaptive τ ← clamp(ema·τ + (1−ema)·(mean + std of kept |cos|), 0.05, 0.3))."""

        ranges = {"lambda_": ">=0", "rho": "(0,1]", "tau": "[0,1]", "tau_mode": "{fixed,adaptive}", "tau_ema": "[0,1)"}
        """Allowed values, checked by ``make_config`` (not a dataclass field: no annotation)."""

        lambda_: float = 1.0
        rho: float = 0.001
        tau: float = 0.1
        tau_mode: str = "fixed"
        tau_ema: float = 0.99

    def __init__(self, d_sae: int, d_in: int, config: Any) -> None:
        super().__init__(d_sae, d_in, config)
        if config.tau_mode not in ("fixed", "adaptive"):
            raise ValueError(f"tau_mode must be 'fixed' or 'adaptive', got {config.tau_mode!r}")
        self.n_keep = n_keep(d_sae, config.rho)
        self.register_buffer("tau", torch.tensor(float(config.tau), dtype=torch.float64))
        self.register_buffer("last_keys", torch.zeros(0, dtype=torch.long))
        self.register_buffer("logged_keys", torch.zeros(0, dtype=torch.long))
        self.register_buffer("n_logged", torch.zeros((), dtype=torch.long))

    def select(self, cof: CoFiring) -> Tensor:
        """Indices (into ``cof``'s pairs, ascending) of the kept pairs: top ``n_keep`` by score.

        Ties at the cut are broken towards smaller keys (as a stable descending sort would), so the
        kept set is a function of the batch alone.
        """
        s = cof.scores
        assert s is not None
        if cof.n_pairs <= self.n_keep:
            return torch.arange(cof.n_pairs, device=cof.keys.device)
        cut = torch.topk(s, self.n_keep, sorted=False).values.min()
        above = (s > cut).nonzero().squeeze(1)
        ties = (s == cut).nonzero().squeeze(1)[: self.n_keep - above.numel()]
        return torch.sort(torch.cat([above, ties])).values

    def forward(self, ctx: PenaltyContext) -> tuple[Tensor, dict[str, float]]:
        W = ctx.W_dec
        cof = cofiring_pairs(ctx.codes, self.d_sae, with_scores=True)
        kept = self.select(cof)
        tau = float(self.tau)
        weight = torch.zeros(cof.n_pairs, device=W.device, dtype=W.dtype)
        if kept.numel():
            weight[kept] = self.config.lambda_ / kept.numel()
        val, sel, cos = cofiring_penalty(W, cof, weight, tau, power=2)
        with torch.no_grad():
            self.last_keys = cof.keys[kept].clone()
            abs_cos = cos.abs()
            if self.config.tau_mode == "adaptive" and abs_cos.numel():
                target = abs_cos.mean() + abs_cos.std(unbiased=False)
                e = self.config.tau_ema
                self.tau.copy_((e * self.tau + (1 - e) * target).clamp(TAU_MIN, TAU_MAX))
        logs = {
            "penalty": float(val.detach()), "weight": float(self.config.lambda_), "tau": tau,
            "pairs": float(kept.numel()), "cofiring_pairs": float(cof.n_pairs),
            "mean_abs_cos": float(abs_cos.mean()) if abs_cos.numel() else 0.0,
            "frac_above_tau": float((abs_cos > tau).float().mean()) if abs_cos.numel() else 0.0,
        }
        return val, logs

    @torch.no_grad()
    def diagnostics(self, W_dec: Tensor) -> dict[str, Any]:
        """Jaccard overlap of the kept pairs now vs at the previous call (absent on the first call)."""
        out: dict[str, Any] = {"kept_pairs": int(self.last_keys.numel())}
        if int(self.n_logged) > 0:
            out["jaccard"] = jaccard(self.last_keys, self.logged_keys)
        self.logged_keys = self.last_keys.clone()
        self.n_logged += 1
        return out
