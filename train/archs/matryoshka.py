"""Matryoshka BatchTopK (Bussmann et al. 2025, arXiv 2503.17547): nested dictionaries.

Latents are ordered; the prefixes ``m_1 < m_2 < … < m_G = d_sae`` (``-p groups=…``) must each
reconstruct the input on their own:

    f = BatchTopK(pre)                                   (as ``batchtopk``, one selection)
    loss = Σ_g Σ_b ‖x_b − (Σ_{i < m_g} f_bi W_dec,i + b_dec)‖² / Σ_b ‖x_b − x̄‖²   (+ AuxK)

i.e. the sum of every prefix's FVU (SAELens' ``MatryoshkaBatchTopKTrainingSAE`` adds one MSE per
inner level to the outer loss the same way; ours is in FVU units). ``logs["fvu"]`` is the full
SAE's FVU; ``fvu_prefix_<m>`` each prefix's. Saved as JumpReLU (threshold θ), with the prefix
widths in ``cfg.json`` as ``matryoshka_widths``.

``groups``: comma-separated widths (``128,512,2048``) or, when every value is ≤ 1, fractions of
d_sae (default ``0.0625,0.125,0.25,0.5,1``); ``d_sae`` is appended when the last width is smaller.
All prefix decodes come from one ``embedding_bag`` over the sparse slots (see
:meth:`Matryoshka.reconstruction`), never a dense ``[batch, d_sae]`` product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ..sae import SAE, SparseCodes
from .base import Inference, register
from .batchtopk import BatchTopK


def parse_widths(groups: str, d_sae: int) -> list[int]:
    """Prefix widths from ``groups`` (see the module docstring). Raises ``ConfigError``."""
    where = f"-p groups={groups!r} (arch 'matryoshka')"
    try:
        values = [float(v) for v in str(groups).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{where}: expected comma-separated widths or fractions, e.g. 128,512,2048") from None
    if not values:
        raise ConfigError(f"{where}: name at least one prefix width")
    if all(0 < v <= 1 for v in values):
        widths = [max(1, round(v * d_sae)) for v in values]
    elif all(v >= 1 and float(v).is_integer() for v in values):
        widths = [int(v) for v in values]
    else:
        raise ConfigError(f"{where}: give integer widths >= 1, or fractions in (0, 1] only")
    if widths[-1] > d_sae:
        raise ConfigError(f"{where}: width {widths[-1]} exceeds d_sae = {d_sae}")
    if any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
        raise ConfigError(f"{where}: widths {widths} must be strictly increasing")
    if widths[-1] != d_sae:
        widths.append(d_sae)
    return widths


@register
class Matryoshka(BatchTopK):
    name = "matryoshka"
    uses_auxk = True
    source = "Bussmann et al. 2025 (arXiv 2503.17547)"

    @dataclass
    class Config:
        groups: str = "0.0625,0.125,0.25,0.5,1"
        """Nested prefix widths (integers) or fractions of d_sae."""
        threshold_lr: float = 0.01
        calibrate_frac: float = 0.2
        ranges = {"threshold_lr": "(0,1]", "calibrate_frac": "[0,1]"}

    @classmethod
    def check(cls, d_in: int, d_sae: int, k: int, config: Any) -> None:
        super().check(d_in, d_sae, k, config)
        parse_widths(config.groups, d_sae)

    def __init__(self, d_in: int, d_sae: int, k: int, config: Any, train_cfg: Any) -> None:
        super().__init__(d_in, d_sae, k, config, train_cfg)
        self.widths = parse_widths(config.groups, d_sae)

    def reconstruction(self, sae: SAE, x: torch.Tensor, codes: SparseCodes,
                       total_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Σ_g FVU of prefix g. One ``embedding_bag`` over the slots sorted by group (bag = one
        token's slots in one group) gives every group's partial decode ``[B, G, d_in]``; their
        cumulative sum is every prefix's reconstruction (the decoder cost of one full decode)."""
        B, K = codes.idx.shape
        G = len(self.widths)
        dev = codes.idx.device
        bounds = torch.tensor(self.widths, device=dev)
        live = codes.live if codes.live is not None else torch.ones_like(codes.idx, dtype=torch.bool)
        rows = torch.arange(B, device=dev)[:, None].expand(B, K)[live]
        group = torch.bucketize(codes.idx[live], bounds, right=True)  # slot's group: i < m_0 → 0, ...
        bag = rows * G + group                                          # one bag per (token, group)
        order = torch.argsort(bag, stable=True)
        counts = torch.bincount(bag, minlength=B * G)
        parts = F.embedding_bag(codes.idx[live][order], sae.W_dec, counts.cumsum(0) - counts, mode="sum",
                                per_sample_weights=codes.vals[live][order]).view(B, G, -1)
        prefix = parts.cumsum(1) + sae.b_dec                    # [B, G, d_in]: x̂ of each prefix
        fvu = (x[:, None, :] - prefix).pow(2).sum((0, 2)) / total_var  # [G]
        logs: dict[str, Any] = {f"fvu_prefix_{m}": v for m, v in zip(self.widths, fvu.detach().unbind(), strict=True)}
        logs["fvu"] = logs[f"fvu_prefix_{self.widths[-1]}"]
        return fvu.sum(), prefix[:, -1], logs

    def inference(self) -> Inference:
        out = super().inference()
        out.cfg["matryoshka_widths"] = list(self.widths)
        return out
