"""ReLU with a decoder-norm-weighted L1 penalty (SAELens "standard"; Anthropic's April 2024 update
for the ‖W_dec,i‖ weighting):

    f = ReLU(pre),   loss += λ(t) · mean_b Σ_i f_bi ‖W_dec,i‖,   λ warmed up linearly over
    ``l1_warmup_frac`` of the run (``--l1-coefficient``, in units of the FVU loss)

The pre-activations carry dense gradients (every positive latent is active). Codes are padded to
the largest active count in the batch. Saved as ``architecture: "standard"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..sae import SAE
from .base import Arch, Encoded, Inference, register, warmed_up


@register
class ReLU(Arch):
    name = "relu"
    source = "SAELens standard SAE; Bricken et al. 2023"

    @dataclass
    class Config:
        pass

    def __init__(self, d_in: int, d_sae: int, k: int, config: Any, train_cfg: Any) -> None:
        super().__init__(d_in, d_sae, k, config, train_cfg)
        self.l1_coefficient = float(train_cfg.l1_coefficient)
        self.l1_warmup_frac = float(train_cfg.l1_warmup_frac)

    @classmethod
    def check(cls, d_in: int, d_sae: int, k: int, config: Any) -> None:
        pass  # k is not used

    def l1_at(self, step: int, total_steps: int) -> float:
        """L1 coefficient with linear warm-up over ``l1_warmup_frac`` of the run."""
        return warmed_up(self.l1_coefficient, step, total_steps, self.l1_warmup_frac)

    def encode(self, sae: SAE, x_c: torch.Tensor, step: int, total_steps: int, dead: torch.Tensor) -> Encoded:
        pre = x_c @ sae.W_enc + sae.b_enc
        codes = sae.codes_from_pre(pre)
        # gather, not ``norms[codes.idx]``: advanced-indexing backward (index_put_ with accumulate)
        # adds in a thread-dependent order on CPU, which made two ReLU runs with one seed differ
        # from the first step (2e-4 by step ~30); gather's backward (scatter_add) is deterministic.
        norms = sae.W_dec.norm(dim=1).gather(0, codes.idx.reshape(-1)).view_as(codes.idx)
        l1 = (codes.vals * norms).sum(-1).mean()
        coef = self.l1_at(step, total_steps)
        return Encoded(codes, pre.detach(), {"l1": coef * l1}, {"l1": l1.item(), "l1_coefficient": coef})

    def inference(self) -> Inference:
        return Inference("relu")
