"""BatchTopK (Bussmann, Leask & Nanda 2024, arXiv 2412.06410): the top ``B·k`` activations of the
whole batch are kept, so a token's L0 varies and the batch mean is ``k``.

    f = ReLU(pre) · 1[ReLU(pre) ≥ τ_B],  τ_B = the (B·k)-th largest entry of ReLU(pre [B, d_sae])
    θ ← (1 − η) θ + η · min{f_bi > 0}       (running estimate of the batch threshold, η = threshold_lr)

At inference the SAE is a JumpReLU with ``threshold_i = θ`` for every latent (SAELens'
``BatchTopKTrainingSAE`` and dictionary_learning save it the same way), so tokens are encoded
independently of their batch. θ starts at the first batch's value (SAELens starts it at 0 and
lets the EMA climb, which biases short runs low). AuxK is added as for TopK.

Selection cost: the flat top-``B·k`` over ``B·d_sae`` entries (190 ms on 2 CPU cores at 4096 ×
5120) is replaced by an exact two-stage search: each row's top ``c`` candidates (``c`` ≥ 2k),
the (B·k)-th largest among them, and a retry with ``2c`` when some row has all ``c`` candidates
selected (then, and only then, could a selected entry be missing). The result equals the flat
selection (tested against it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..sae import SAE, SparseCodes
from ..sparse_ops import dense_pre_no_grad, gather_pre_acts
from .base import Arch, Encoded, Inference, register


@torch.no_grad()
def batch_topk_select(pre: torch.Tensor, k: int, cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """The top ``B·k`` entries of ``ReLU(pre)`` ``[B, d_sae]`` as per-row padded slots.

    Returns ``(idx [B, K], keep [B, K] bool, tau)``: each row's kept latents first (in descending
    order of ``pre``), then padding slots (``keep`` False) of the same row's next candidates, with
    ``K`` the largest kept count of any row; ``tau`` is the smallest kept value (0-dim tensor).
    Entries ``≤ 0`` are never kept (BatchTopK applies ReLU before selecting). ``cap``: first
    candidate width (default ``2k``).
    """
    B, F = pre.shape
    n = min(B * k, B * F)
    c = min(F, max(cap or 0, 2 * k, 1))
    while True:
        vals, idx = pre.topk(c, dim=1, sorted=True)
        flat = vals.reshape(-1)
        tau = flat.kthvalue(flat.numel() - n + 1).values if n < flat.numel() else flat.min()
        counts = (vals >= tau).sum(1)
        if int(counts.max()) < c or c == F:
            break
        c = min(F, 2 * c)
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
        """η of the threshold's running estimate (SAELens' ``topk_threshold_lr``)."""
        ranges = {"threshold_lr": "(0,1]"}

    def __init__(self, d_in: int, d_sae: int, k: int, config: Any, train_cfg: Any) -> None:
        super().__init__(d_in, d_sae, k, config, train_cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        self.register_buffer("threshold_set", torch.zeros((), dtype=torch.bool))
        self._cap = 2 * k  # candidate width hint (does not change results, only speed)

    def select(self, sae: SAE, x_c: torch.Tensor) -> tuple[SparseCodes, torch.Tensor, torch.Tensor]:
        """BatchTopK codes ``[B, K]`` (padding slots 0), the dense no-grad ``pre`` and τ_B."""
        pre = dense_pre_no_grad(x_c, sae.W_enc, sae.b_enc)
        idx, keep, tau = batch_topk_select(pre, self.k, self._cap)
        self._cap = max(2 * self.k, -(-idx.shape[1] * 5 // 4 // 16) * 16)
        vals = torch.relu(gather_pre_acts(x_c, sae.W_enc, sae.b_enc, idx, pre)) * keep
        return SparseCodes(vals, idx), pre, tau

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
        return Encoded(codes, pre, logs={"batch_threshold": float(tau), "threshold": float(self.threshold)})

    def inference(self) -> Inference:
        th = torch.full((self.d_sae,), float(self.threshold), dtype=torch.float32)
        return Inference("jumprelu", threshold=th,
                         cfg={"batchtopk_threshold": float(self.threshold), "target_l0": self.k})
