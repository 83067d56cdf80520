"""JumpReLU (Rajamanoharan et al. 2024, arXiv 2407.14435), with Anthropic's 2025 sparsity loss.

    f_i = pre_i · H(pre_i − θ_i),    θ = exp(log_threshold)  (learned, one per latent)

The Heaviside step has no useful gradient, so θ is trained with the paper's straight-through
pseudo-derivatives (rectangle kernel K(u) = 1[|u| < ½], bandwidth ε), exactly as SAELens'
``JumpReLU``/``Step`` functions:

    ∂f_i/∂pre_i = H(pre_i − θ_i)                  ∂f_i/∂θ_i = −(θ_i/ε) K((pre_i − θ_i)/ε)
    ∂H(pre_i − θ_i)/∂pre_i = 0                     ∂H(pre_i − θ_i)/∂θ_i = −(1/ε) K((pre_i − θ_i)/ε)

Sparsity term (``sparsity_loss``):

* ``gemma`` (the paper, Gemma Scope): with ``L0 = mean_b Σ_i H(pre_bi − θ_i)``,
  ``λ(t) · (L0/target_l0 − 1)²`` (dictionary_learning's target-L0 form, the default, so the run
  lands at L0 ≈ ``--k``), or the paper's ``λ(t) · L0`` with ``-p target_l0=0``.
* ``anthropic`` (Anthropic, "Circuits Updates", January 2025; SAELens ``jumprelu_sparsity_loss_mode
  = "tanh"``): ``λ(t) · mean_b Σ_i tanh(c · f_bi ‖W_dec,i‖)`` plus the pre-activation loss
  ``λ_p · mean_b Σ_{i dead} ReLU(θ_i − pre_bi) ‖W_dec,i‖`` on dead latents only (as SAELens).

λ(t) is warmed up linearly over ``l0_warmup_frac`` of the run. Units: the losses are in units of
our FVU reconstruction loss (SAELens uses the summed squared error), so coefficients do not
transfer from SAELens unchanged.

Sparse path: only the slots where ``pre_i > θ_i − ε/2`` (the active latents and the kernel band
below their thresholds) are gathered; every gradient above is zero elsewhere, so the encoder
backward stays ``O(B·K·d_in)``. The dense pre-activations are needed once to find those slots.
θ is initialised per latent to the ``1 − k/d_sae`` quantile of its pre-activations on the first
batch (L0 ≈ k from step 0; ``-p init_threshold=0.01`` gives SAELens' constant start, which is
nearly dense at first). Saved as ``architecture: "jumprelu"`` with ``threshold = θ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...rundir.sae import SAE, SparseCodes
from ..sparse_ops import GatherFlat, dense_pre_no_grad
from .base import Arch, Encoded, Inference, register, warmed_up

DEFAULT_L0_COEFFICIENT = {"gemma": 1.0, "anthropic": 1e-3}


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """K(u) = 1 where |u| < ½, else 0 (same dtype as ``u``)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    """``f = p · H(p − t)`` elementwise with the STE above (``p``, ``t`` same shape)."""

    @staticmethod
    def forward(ctx, p, t, eps):  # type: ignore[override]
        ctx.save_for_backward(p, t)
        ctx.eps = eps
        return p * (p > t).to(p.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        p, t = ctx.saved_tensors
        eps = ctx.eps
        return (p > t).to(g.dtype) * g, -(t / eps) * rectangle((p - t) / eps) * g, None


class StepFn(torch.autograd.Function):
    """``H(p − t)`` elementwise; gradient only to ``t``: ``−(1/ε) K((p − t)/ε)``."""

    @staticmethod
    def forward(ctx, p, t, eps):  # type: ignore[override]
        ctx.save_for_backward(p, t)
        ctx.eps = eps
        return (p > t).to(p.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        p, t = ctx.saved_tensors
        return None, -(1.0 / ctx.eps) * rectangle((p - t) / ctx.eps) * g, None


@register
class JumpReLU(Arch):
    name = "jumprelu"
    source = "Rajamanoharan et al. 2024 (arXiv 2407.14435); Anthropic Circuits Updates, Jan 2025"
    additive_logs = ("fvu", "l0_surrogate", "tanh_sparsity", "pre_act_loss")

    @dataclass
    class Config:
        sparsity_loss: str = "gemma"
        """gemma (step L0, the paper) | anthropic (tanh sparsity + pre-activation loss)."""
        bandwidth: float = 0.05
        """ε of the rectangle kernel, in pre-activation units (SAELens' default)."""
        l0_coefficient: float = -1.0
        """λ of the sparsity term; −1 = the sparsity loss's default (gemma 1.0, anthropic 1e-3)."""
        target_l0: float = -1.0
        """gemma: L0 the penalty steers to (−1 = --k; 0 = the paper's plain λ·L0)."""
        l0_warmup_frac: float = 0.05
        init_threshold: float = 0.0
        """θ at step 0; 0 = each latent's (1 − k/d_sae) quantile on the first batch."""
        tanh_scale: float = 4.0
        """anthropic: c in tanh(c·f·‖W_dec‖)."""
        pre_act_coefficient: float = 3e-4
        """anthropic: λ_p of the dead-latent pre-activation loss (0 disables it)."""
        ranges = {"sparsity_loss": "{gemma,anthropic}", "bandwidth": ">0", "l0_coefficient": "=-1|>=0",
                  "target_l0": "=-1|>=0", "l0_warmup_frac": "[0,1]", "init_threshold": ">=0", "tanh_scale": ">0",
                  "pre_act_coefficient": ">=0"}

    def __init__(self, d_in: int, d_sae: int, k: int, config: Any, train_cfg: Any) -> None:
        super().__init__(d_in, d_sae, k, config, train_cfg)
        init = config.init_threshold if config.init_threshold > 0 else 1.0
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(init)))
        self.register_buffer("threshold_set", torch.tensor(config.init_threshold > 0))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    @torch.no_grad()
    def _init_from(self, pre: torch.Tensor) -> None:
        pre = self.dist.cat(pre)  # the global batch's [B, d_sae] (once, at step 0)
        B = pre.shape[0]
        above = max(1, round(B * self.k / self.d_sae))  # tokens per latent above its threshold
        q = pre.kthvalue(max(B - above, 1), dim=0).values.clamp_min(1e-3)
        self.log_threshold.copy_(q.log())
        self.threshold_set.fill_(True)

    @torch.no_grad()
    def init_from_saved(self, sae: SAE) -> None:
        """θ from the saved ``threshold`` (training units): ``log_threshold = log θ`` (θ = 0 is taken as
        1e-12, the smallest the log-parametrisation can start from)."""
        self.log_threshold.copy_(sae.threshold.to(self.log_threshold).clamp_min(1e-12).log())
        self.threshold_set.fill_(True)

    def l0_coefficient_at(self, step: int, total_steps: int) -> float:
        """λ(t): the coefficient warmed up linearly over ``l0_warmup_frac`` of the run."""
        lam = self.config.l0_coefficient
        if lam < 0:
            lam = DEFAULT_L0_COEFFICIENT[self.config.sparsity_loss]
        return warmed_up(lam, step, total_steps, self.config.l0_warmup_frac)

    def encode(self, sae: SAE, x_c: torch.Tensor, step: int, total_steps: int, dead: torch.Tensor) -> Encoded:
        cfg = self.config
        eps = cfg.bandwidth
        pre = dense_pre_no_grad(x_c, sae.W_enc, sae.b_enc)
        if not bool(self.threshold_set):
            self._init_from(pre)
        theta = self.threshold
        with torch.no_grad():
            # entries: active or inside the kernel band, flat (ragged codes: a few high-norm tokens
            # have thousands of entries, the mean is ~k; a padded [B, K_max] form cost 60× more)
            rows, cols = (pre > (theta.detach() - eps / 2)).nonzero(as_tuple=True)
        # the STE ops run on those entries only
        p = GatherFlat.apply(x_c, sae.W_enc, sae.b_enc, rows, cols, pre)  # grads → encoder
        t = theta.gather(0, cols)                                          # grads → log_threshold
        f = JumpReLUFn.apply(p, t, eps)
        codes = SparseCodes.ragged(rows, cols, f, x_c.shape[0])
        coef = self.l0_coefficient_at(step, total_steps)
        B = self.global_batch(x_c.shape[0])  # each rank's share of the global mean
        losses: dict[str, torch.Tensor] = {}
        logs: dict[str, Any] = {"l0_coefficient": coef, "threshold_mean": theta.detach().mean()}
        if cfg.sparsity_loss == "gemma":
            l0 = StepFn.apply(p.detach(), t, eps).sum() / B
            target = self.k if cfg.target_l0 < 0 else cfg.target_l0
            if target > 0 and self.dist.active:
                # (L0/t − 1)² is not a sum over rows: each rank adds 1/W of its value at the global
                # L0 and its share of the gradient, 2(L0/t − 1)/t · ∂l0_rank (summed: the exact one)
                l0_all = self.dist.sum_(l0.detach().clone())
                r = l0_all / target - 1
                losses["sparsity"] = coef * (r * r / self.dist.world + 2 * r / target * (l0 - l0.detach()))
            else:
                losses["sparsity"] = coef * ((l0 / target - 1) ** 2 if target > 0 else l0)
            logs["l0_surrogate"] = l0.detach()
        else:
            tanh = torch.tanh(cfg.tanh_scale * f).sum() / B  # ‖W_dec,i‖ = 1 (unit decoder rows)
            losses["sparsity"] = coef * tanh
            logs["tanh_sparsity"] = tanh.detach()
            dead_idx = dead.nonzero().squeeze(1)
            if cfg.pre_act_coefficient > 0 and dead_idx.numel():
                dead = dead_idx
                pre_dead = x_c @ sae.W_enc[:, dead] + sae.b_enc[dead]  # [B, n_dead], dense only on dead latents
                pa = (theta[dead] - pre_dead).relu().sum() / B
                losses["pre_act"] = cfg.pre_act_coefficient * pa
                logs["pre_act_loss"] = pa.detach()
        return Encoded(codes, None, losses, logs)

    def inference(self) -> Inference:
        return Inference("jumprelu", threshold=self.threshold.detach().float().cpu().clone(),
                         cfg={"jumprelu_sparsity_loss": self.config.sparsity_loss,
                              "jumprelu_bandwidth": self.config.bandwidth})
