"""BatchTopK (Bussmann, Leask & Nanda 2024, arXiv 2412.06410): the top ``B·k`` activations of the
whole batch are kept, so a token's L0 varies and the batch mean is ``k``.

    f = ReLU(pre) · 1[ReLU(pre) ≥ τ_B],  τ_B = the (B·k)-th largest entry of ReLU(pre [B, d_sae])
    θ = mean of τ_B over the final ``calibrate_frac`` of the run's steps  (τ_B = min{f_bi > 0})

At inference the SAE is a JumpReLU with ``threshold_i = θ`` for every latent (SAELens'
``BatchTopKTrainingSAE`` and dictionary_learning save it the same way), so tokens are encoded
independently of their batch. SAELens estimates θ by an EMA ``θ ← (1 − η)θ + ητ_B`` (η = 0.01,
from 0) over the whole run; we log that EMA (``threshold``, started at the first τ_B) but save
the plain running mean over the last steps, where the learning rate decays and τ_B is stable:
on the embedded store τ_B fell from 0.92 to 0.45 over a 150-step run, the EMA ended at 0.64 and
gave a held-out L0 of 20 instead of 32. ``-p calibrate_frac=0`` saves the EMA (SAELens' choice).
AuxK is added as for TopK.

Selection cost: the flat top-``B·k`` over ``B·d_sae`` entries (190 ms on 2 CPU cores at 4096 ×
5120) is replaced by an exact two-stage search (:func:`batch_topk_select`): each row's top ``c``
candidates, then the few rows that could hold more (real activations have rare high-norm tokens
that take hundreds of latents) in full. The result equals the flat selection (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..sae import SAE, SparseCodes
from ..sparse_ops import dense_pre_no_grad, gather_pre_acts
from .base import Arch, Encoded, Inference, register


def _nth_largest(v: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n``-th largest entry of the 1-D ``v`` (its smallest when ``n ≥ len(v)``)."""
    return v.kthvalue(v.numel() - n + 1).values if n < v.numel() else v.min()


@torch.no_grad()
def batch_topk_select(pre: torch.Tensor, k: int, cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """The top ``B·k`` entries of ``ReLU(pre)`` ``[B, d_sae]`` as per-row padded slots.

    Returns ``(idx [B, K], keep [B, K] bool, tau)``: each row's kept latents first (in descending
    order of ``pre``), then padding slots (``keep`` False), with ``K`` the largest kept count of any
    row; ``tau`` is the smallest kept value (0-dim tensor). Entries ``≤ 0`` are never kept (BatchTopK
    applies ReLU before selecting). ``cap``: candidate width per row (default ``2k``).

    Exactness: τ is first taken over every row's top ``c`` candidates; a row whose ``c``-th candidate
    is still ≥ τ may hold more selected entries, so τ is recomputed over the other rows' candidates
    plus those rows in full — a superset of the batch's top ``B·k`` — and those rows are selected
    from in full. Cost: one ``topk(c)`` of the batch plus work on the few saturated rows.
    """
    B, F = pre.shape
    n = min(B * k, B * F)
    c = min(F, max(cap or 0, 2 * k, 1))
    vals, idx = pre.topk(c, dim=1, sorted=True)
    tau = _nth_largest(vals.reshape(-1), n)
    sat = (vals[:, -1] >= tau).nonzero().squeeze(1) if c < F else vals.new_zeros(0, dtype=torch.long)
    if sat.numel():
        light = torch.ones(B, dtype=torch.bool, device=pre.device)
        light[sat] = False
        full = pre[sat]
        tau = _nth_largest(torch.cat([vals[light].reshape(-1), full.reshape(-1)]), n)
        kh = max(int((full >= tau).sum(1).max()), 1)
        hv, hi = full.topk(min(kh + 1, F), dim=1, sorted=True)
        K = max(int((vals[light] >= tau).sum(1).max()) if bool(light.any()) else 1, kh)
        # padding slots repeat an index the row does not keep (its last candidate), so no slot
        # aliases a kept latent
        out_v = vals.new_full((B, K), -math.inf)
        out_i = idx[:, -1:].expand(B, K).clone()
        w = min(K, c)
        out_v[:, :w], out_i[:, :w] = vals[:, :w], idx[:, :w]
        sat_v = hv.new_full((sat.numel(), K), -math.inf)
        sat_i = hi[:, -1:].expand(sat.numel(), K).clone()
        w = min(K, hv.shape[1])
        sat_v[:, :w], sat_i[:, :w] = hv[:, :w], hi[:, :w]
        out_v[sat], out_i[sat] = sat_v, sat_i
        vals, idx = out_v, out_i
    keep = (vals >= tau) & (vals > 0)
    K = max(int(keep.sum(1).max()), 1)
    return idx[:, :K].contiguous(), keep[:, :K].contiguous(), tau


@register
class BatchTopK(Arch):
    name = "batchtopk"
    uses_auxk = True
    source = "Bussmann et al. 2024 (arXiv 2412.06410)"

    @dataclass
    class Config:
        threshold_lr: float = 0.01
        """η of the logged EMA of τ_B (SAELens' ``topk_threshold_lr``)."""
        calibrate_frac: float = 0.2
        """θ saved = mean τ_B over this final fraction of steps (0 = save the EMA instead)."""
        ranges = {"threshold_lr": "(0,1]", "calibrate_frac": "[0,1]"}

    def __init__(self, d_in: int, d_sae: int, k: int, config: Any, train_cfg: Any) -> None:
        super().__init__(d_in, d_sae, k, config, train_cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        self.register_buffer("threshold_set", torch.zeros((), dtype=torch.bool))
        self.register_buffer("tau_sum", torch.zeros((), dtype=torch.float64))    # Σ τ_B over the final steps
        self.register_buffer("tau_count", torch.zeros((), dtype=torch.int64))

    def select(self, sae: SAE, x_c: torch.Tensor) -> tuple[SparseCodes, torch.Tensor, torch.Tensor]:
        """BatchTopK codes ``[B, K]`` (padding slots 0), the dense no-grad ``pre`` and τ_B."""
        pre = dense_pre_no_grad(x_c, sae.W_enc, sae.b_enc)
        idx, keep, tau = batch_topk_select(pre, self.k)
        vals = torch.relu(gather_pre_acts(x_c, sae.W_enc, sae.b_enc, idx, pre, live=keep))
        return SparseCodes(vals, idx, live=keep), pre, tau

    @torch.no_grad()
    def update_threshold(self, codes: SparseCodes) -> None:
        """θ ← (1 − η)θ + η·(smallest positive kept activation); the first batch sets θ."""
        pos = codes.vals.detach()
        pos = pos[pos > 0]
        if pos.numel():
            m = pos.min().to(torch.float64)
            lr = self.config.threshold_lr
            self.threshold.copy_(torch.where(self.threshold_set, (1 - lr) * self.threshold + lr * m, m))
            self.threshold_set.fill_(True)

    def encode(self, sae: SAE, x_c: torch.Tensor, step: int, total_steps: int, dead: torch.Tensor) -> Encoded:
        codes, pre, tau = self.select(sae, x_c)
        self.update_threshold(codes)
        frac = self.config.calibrate_frac
        if frac > 0 and step >= total_steps * (1 - frac) and float(tau) > 0:
            self.tau_sum += float(tau)
            self.tau_count += 1
        return Encoded(codes, pre, logs={"batch_threshold": float(tau), "threshold": float(self.threshold)})

    def saved_threshold(self) -> float:
        """θ of the saved JumpReLU: the final-steps mean of τ_B, or the EMA when none was recorded."""
        n = int(self.tau_count)
        return float(self.tau_sum) / n if n else float(self.threshold)

    def inference(self) -> Inference:
        theta = self.saved_threshold()
        th = torch.full((self.d_sae,), theta, dtype=torch.float32)
        return Inference("jumprelu", threshold=th, cfg={"batchtopk_threshold": theta, "target_l0": self.k,
                                                        "batchtopk_threshold_ema": float(self.threshold)})
