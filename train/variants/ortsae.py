"""``ortsae``: the OrtSAE orthogonality penalty (Korznikov et al. 2025, arXiv 2509.22033).

OrtSAE (arXiv 2509.22033): penalise each latent's maximum squared cosine to the
other latents of a random chunk, every step:

    L = λ · mean_{i : |chunk(i)| > 1} max_{j ∈ chunk(i), j ≠ i} cos_ij²,    cos_ij = d_i·d_j

with the chunks a fresh random partition of the F latents into pieces of ``chunk_size`` drawn from
``ctx.generator`` (:func:`~.static_ortho.random_chunks`). The per-chunk Gram matrices are formed
without autograd (``O(F·c·d)`` time, ``O(block·c²)`` memory) only to find each latent's partner
``j*(i) = argmax_j cos_ij²``; the loss is then ``λ · mean_i cos_{i j*(i)}²`` on those F pairs
(:func:`~.pairs.pair_penalty`, ``O(F·d)``), whose gradient equals autograd's through the max.
The partner search may run in bfloat16 (``search_dtype``); the loss on the chosen pairs is exact.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Penalty, PenaltyContext, register
from .chunks import CHUNK_BLOCK, padded, random_chunks
from .pairs import pair_penalty


@functools.cache
def _cpu_has_bf16_matmul() -> bool:
    """True when this (Linux) CPU has native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read(1 << 16)
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_search_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` → bfloat16 on CUDA and on CPUs with native bf16 matmul, else float32."""
    if name == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and _cpu_has_bf16_matmul())
        return torch.bfloat16 if fast else torch.float32
    if name not in ("bfloat16", "float32"):
        raise ValueError(f"ortsae: search_dtype must be auto, bfloat16 or float32, got {name!r}")
    return getattr(torch, name)


@torch.no_grad()
def chunk_partners(W: Tensor, chunks: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """For chunks ``[m, c]`` (padding index F), each latent's max-``cos²`` partner in its chunk.

    The Gram matrices are formed in ``dtype`` (only the argmax is used: with bfloat16 the chosen
    partner's ``cos²`` is within bf16 rounding, ~1 %, of the true maximum).
    Returns ``(i, j)`` long vectors over the latents whose chunk has another latent.
    """
    F = W.shape[0]
    # which slots have a partner is known from the (host-side) chunks alone: a real latent in a chunk
    # with another real latent (its argmax then never lands on padding, cos² ≥ 0 > −1). Selecting
    # them by host-computed positions keeps the search free of device→host reads.
    real = chunks.cpu() < F
    ok_pos = (real & (real.sum(1, keepdim=True) >= 2)).reshape(-1).nonzero().squeeze(1)
    chunks = chunks.to(W.device)
    Wp = padded(W.detach().to(dtype))
    parts_i, parts_j = [], []
    for s in range(0, chunks.shape[0], CHUNK_BLOCK):
        ch = chunks[s:s + CHUNK_BLOCK]
        lo, hi = s * ch.shape[1], (s + ch.shape[0]) * ch.shape[1]
        pos = ok_pos[(ok_pos >= lo) & (ok_pos < hi)] - lo
        pos = pos.to(W.device, non_blocking=True)
        Wc = Wp[ch]
        G2 = torch.bmm(Wc, Wc.transpose(1, 2)).float().square_()  # fp32 argmax is 5x faster than bf16 on CPU
        G2.diagonal(dim1=1, dim2=2).fill_(-1.0)
        G2.masked_fill_((ch >= F).unsqueeze(1), -1.0)  # padding is never a partner
        best = G2.argmax(-1)
        partner = torch.gather(ch, 1, best)
        parts_i.append(ch.reshape(-1)[pos])
        parts_j.append(partner.reshape(-1)[pos])
    return torch.cat(parts_i), torch.cat(parts_j)


@register
class OrtSAEPenalty(Penalty):
    """``λ · mean_i max_{j ∈ chunk(i)\\{i}} cos_ij²`` over a fresh random chunk partition each step."""

    name = "ortsae"
    uses_codes = False

    @dataclass
    class Config:
        """Defaults: ``lambda_=1.0`` (at random init in d_in = 640 the chunk-max ``cos²`` is ≈ 0.02 for
        c = 1024, so the penalty starts ≈ 0.02 and grows to ≈ 0.1–0.3 only if near-duplicate latents
        form), ``chunk_size=1024`` (OrtSAE, arXiv 2509.22033, uses chunks of this order), ``chunks_per_step=0``
        (every latent every step, as in OrtSAE; ``n > 0`` uses only the first n chunks), ``search_dtype="auto"``
        (precision of the no-grad partner search: bfloat16 on CUDA and bf16-capable CPUs, 3.8× faster than fp32 on
        this machine's CPU; the penalty and its gradient are always computed in the SAE's dtype)."""

        ranges = {"lambda_": ">=0", "chunk_size": ">=2", "chunks_per_step": ">=0",
                  "search_dtype": "{auto,bfloat16,float32}"}
        """Allowed values, checked by ``make_config`` (not a dataclass field: no annotation)."""

        lambda_: float = 1.0
        chunk_size: int = 1024
        chunks_per_step: int = 0
        search_dtype: str = "auto"

    def __init__(self, d_sae: int, d_in: int, config: Config) -> None:
        super().__init__(d_sae, d_in, config)
        resolve_search_dtype(config.search_dtype, torch.device("cpu"))  # validate early

    def forward(self, ctx: PenaltyContext) -> tuple[Tensor, dict[str, float]]:
        W = ctx.W_dec
        chunks = random_chunks(self.d_sae, self.config.chunk_size, self.config.chunks_per_step, ctx.generator)
        i, j = chunk_partners(W, chunks, resolve_search_dtype(self.config.search_dtype, W.device))
        n = int(i.numel())
        if n == 0:
            return W.sum() * 0.0, {"penalty": 0.0, "weight": float(self.config.lambda_), "pairs": 0.0}
        val, cos = pair_penalty(W, i, j, self.config.lambda_ / n, 0.0, power=2)
        c2 = cos.square()
        logs = {"penalty": val.detach(), "weight": float(self.config.lambda_), "pairs": float(n),
                "mean_max_cos2": c2.mean(), "max_cos2": c2.max()}
        return val, logs
