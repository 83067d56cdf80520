"""ReLU with a decoder-norm-weighted L1 penalty (SAELens "standard"; Anthropic's April 2024 update
for the ‖W_dec,i‖ weighting):

    f = ReLU(pre),   loss += λ(t) · mean_b Σ_i f_bi ‖W_dec,i‖,   λ warmed up linearly over
    ``l1_warmup_frac`` of the run (``--l1-coefficient``, in units of the FVU loss)

The pre-activations carry dense gradients (every positive latent is active). Codes are padded to
the largest active count in the batch. Saved as ``architecture: "standard"``.

Initialisation: ``b_enc = 0`` (SAELens). ``-p init_bias=true`` sets ``b_enc`` on the first batch
so that latent i fires on k/d_sae of the tokens (L0 ≈ ``--k`` at step 0). On the embedded store,
b_enc = 0 makes half the latents fire at first (FVU ≈ 13) and 150-step runs then collapsed to
L0 ≈ 2 with negative held-out explained variance at every coefficient from 0.03 to 8; with
``init_bias=true`` and ``--l1-coefficient 0.02`` the run reached L0 31. On small planted data the
plain init did better (EV 0.62 vs 0.52), so it stays the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...rundir.sae import SAE
from .base import Arch, Encoded, Inference, register, warmed_up


@register
class ReLU(Arch):
    name = "relu"
    source = "SAELens standard SAE; Bricken et al. 2023"
    additive_logs = ("fvu", "l1")

    @dataclass
    class Config:
        init_bias: bool = False
        """Set b_enc on the first batch so that each latent fires on k/d_sae of its tokens (L0 ≈ k
        from step 0). False (default, as SAELens): b_enc = 0, every latent with a positive
        projection fires at first."""

    def __init__(self, d_in: int, d_sae: int, k: int, config: Any, train_cfg: Any) -> None:
        super().__init__(d_in, d_sae, k, config, train_cfg)
        self.l1_coefficient = float(train_cfg.l1_coefficient)
        self.l1_warmup_frac = float(train_cfg.l1_warmup_frac)
        self.register_buffer("bias_set", torch.tensor(not config.init_bias))

    @classmethod
    def check(cls, d_in: int, d_sae: int, k: int, config: Any) -> None:
        pass  # k is not used

    def l1_at(self, step: int, total_steps: int) -> float:
        """L1 coefficient with linear warm-up over ``l1_warmup_frac`` of the run."""
        return warmed_up(self.l1_coefficient, step, total_steps, self.l1_warmup_frac)

    @torch.no_grad()
    def _init_bias(self, sae: SAE, x_c: torch.Tensor) -> None:
        proj = self.dist.cat(x_c @ sae.W_enc)  # the global batch's [B, d_sae] (once, at step 0)
        B = proj.shape[0]
        above = max(1, round(B * min(self.k, self.d_sae) / self.d_sae))
        sae.b_enc.copy_(-proj.kthvalue(max(B - above, 1), dim=0).values)
        self.bias_set.fill_(True)

    def encode(self, sae: SAE, x_c: torch.Tensor, step: int, total_steps: int, dead: torch.Tensor) -> Encoded:
        if not bool(self.bias_set):
            self._init_bias(sae, x_c)
        pre = x_c @ sae.W_enc + sae.b_enc
        codes = sae.codes_from_pre(pre)
        # gather, not ``norms[codes.idx]``: advanced-indexing backward (index_put_ with accumulate)
        # adds in a thread-dependent order on CPU, which made two ReLU runs with one seed differ
        # from the first step (2e-4 by step ~30); gather's backward (scatter_add) is deterministic.
        norms = sae.W_dec.norm(dim=1).gather(0, codes.idx.reshape(-1)).view_as(codes.idx)
        if self.dist.active:  # this rank's share of the global batch mean (the ranks' shares are summed)
            l1 = (codes.vals * norms).sum() / self.global_batch(x_c.shape[0])
        else:
            l1 = (codes.vals * norms).sum(-1).mean()
        coef = self.l1_at(step, total_steps)
        return Encoded(codes, pre.detach(), {"l1": coef * l1}, {"l1": l1.detach(), "l1_coefficient": coef})

    def inference(self) -> Inference:
        return Inference("relu")
