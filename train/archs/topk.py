"""TopK (Gao et al. 2024, arXiv 2406.04093): exactly ``k`` latents per token.

    f = ReLU(TopK_k(pre))        AuxK on the top-k_aux dead latents (added by the trainer)

The dense pre-activations come from one no-grad GEMM; only the ``k`` selected values carry
gradients, through the sparse backward of :func:`~sae.train.sparse_ops.gather_pre_acts`.
Saved as SAELens ``architecture: "topk"`` with ``activation_fn_kwargs: {"k": k}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...rundir.sae import SAE, SparseCodes
from ..sparse_ops import dense_pre_no_grad, gather_pre_acts
from .base import Arch, Encoded, Inference, register


def topk_codes(sae: SAE, x_c: torch.Tensor, k: int) -> tuple[SparseCodes, torch.Tensor]:
    """TopK codes of ``x_c = x − b_dec`` ``[batch, d_in]`` as trained → ``(codes [batch, k], pre)``;
    ``pre`` is only valid until the next call on this thread (a reused buffer on CPU)."""
    pre = dense_pre_no_grad(x_c, sae.W_enc, sae.b_enc)
    with torch.no_grad():
        idx = pre.topk(k, dim=-1, sorted=False).indices
    return SparseCodes(torch.relu(gather_pre_acts(x_c, sae.W_enc, sae.b_enc, idx, pre)), idx), pre


@register
class TopK(Arch):
    name = "topk"
    uses_auxk = True
    fixed_width = True
    source = "Gao et al. 2024 (arXiv 2406.04093)"

    @dataclass
    class Config:
        pass

    def encode(self, sae: SAE, x_c: torch.Tensor, step: int, total_steps: int, dead: torch.Tensor) -> Encoded:
        codes, pre = topk_codes(sae, x_c, self.k)
        return Encoded(codes, pre)

    def inference(self) -> Inference:
        return Inference("topk", k=self.k)
