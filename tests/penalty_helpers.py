"""Helpers shared by the penalty and pair-engine tests: random unit decoder rows and real codes."""

from __future__ import annotations

import torch

from sae.rundir.sae import SAE, SparseCodes


def unit_rows(F: int, d: int, seed: int = 0, shared: float = 0.0) -> torch.Tensor:
    """``[F, d]`` random unit rows; ``shared > 0`` adds a common direction (larger cosines)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(F, d, generator=g) + shared * torch.randn(1, d, generator=g)
    return (W / W.norm(dim=1, keepdim=True)).requires_grad_(True)


def make_codes(act: str, F: int = 48, B: int = 96, k: int = 6, seed: int = 0, freq_bias: float = 1.5
               ) -> SparseCodes:
    """Codes from the real ``SAE.codes_from_pre``: TopK (k per row) or ReLU (padded with zeros).

    A descending per-latent bias makes some latents fire often, so pairs co-fire repeatedly.
    """
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(B, F, generator=g) + torch.linspace(freq_bias, -freq_bias, F)
    if act == "relu":
        pre = pre - 1.2  # a few active latents per token, varying counts → zero-padded slots
    sae = SAE(8, F, act, k)
    codes = sae.codes_from_pre(pre)
    vals = codes.vals.detach().clone().requires_grad_(True)
    return SparseCodes(vals, codes.idx)


def grads(val: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(val, W, retain_graph=True)
    return g


def assert_close_val_grad(val: torch.Tensor, want: torch.Tensor, W: torch.Tensor) -> None:
    torch.testing.assert_close(val.double(), want.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads(val, W).double(), grads(want, W).double(), rtol=1e-4, atol=1e-7)
