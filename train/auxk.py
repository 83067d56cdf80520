"""AuxK, the dead-latent auxiliary loss (Gao et al. 2024, arXiv 2406.04093, App. A.2), computed on
the dead latents' columns only and without a device→host read.

Definition (dense)::

    e      = x − x̂                        (detached residual of the main reconstruction)
    k_aux  = min(aux_k, n_dead)            (aux_k = d_in / 2 by default, as in the paper)
    f_aux  = ReLU(top-k_aux over the dead latents of pre)          [batch, d_sae]
    ê      = f_aux W_dec                   (no decoder bias)
    AuxK   = Σ‖e − ê‖² / Σ‖x − x̄‖² · min(1, n_dead / aux_k)

The normalisation by Σ‖x − x̄‖² (the batch variance of x, like our FVU) follows the mission doc;
OpenAI's reference normalises by Var(e) instead (about 10× stronger at EV 0.9; documented in the
README's deviations).

How it is computed: the candidates are the ``cap`` stalest latents (largest ``tokens_since_fired``;
every dead latent whenever ``n_dead ≤ cap``). Their ``[batch, cap]`` columns of the no-grad ``pre``
are ranked, picks that are not dead are zeroed, and everything after is dense over those columns:
``ê = f_cap W_dec[cand]`` and the encoder backward ``∂W_enc[:, cand] = x_cᵀ g`` are GEMMs of
``batch × cap × d_in`` (4 of them, forward + backward) instead of a top-k and scatter over all
``[batch, d_sae]``. The selection equals the dense definition whenever ``n_dead ≤ cap`` (tested
against a float64 dense reference); ``cap`` is sized on the host at log steps (:func:`capacity`),
and when more latents die before the next one the stalest ``cap`` are used (``overflow`` is logged).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def capacity(n_dead: int, aux_k: int, d_sae: int) -> int:
    """Candidate columns for ``n_dead`` dead latents: 0 when none, else ``n_dead`` plus a margin of
    ``max(64, n_dead / 4)`` for latents that die before the next resize, at most ``d_sae``. (When
    ``n_dead < aux_k`` every dead latent is picked, so ``aux_k`` columns are never needed then.)"""
    if n_dead <= 0:
        return 0
    return min(d_sae, n_dead + max(64, n_dead // 4))


class _ColumnPreActs(torch.autograd.Function):
    """``pre[:, cand]`` (precomputed, no grad) with the gradients of ``pre = (x − b_dec) W_enc + b_enc``
    restricted to columns ``cand`` (distinct): ``∂W_enc[:, cand] = x_cᵀ g``, ``∂b_enc[cand] = Σ_b g``,
    ``∂b_dec = −W_enc[:, cand] Σ_b g`` (no ``[batch, d_in]`` input gradient: x is data)."""

    @staticmethod
    def forward(ctx: Any, x_c: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                cand: torch.Tensor, pre_cols: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_c, W_enc, cand)
        return pre_cols

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_c, W_enc, cand = ctx.saved_tensors
        g_sum = g.sum(0)
        grad_W = grad_b = grad_bdec = None
        if ctx.needs_input_grad[2]:
            grad_W = torch.zeros_like(W_enc).index_copy_(1, cand, x_c.t() @ g)
        if ctx.needs_input_grad[3]:
            grad_b = torch.zeros(W_enc.shape[1], dtype=g.dtype, device=g.device).index_copy_(0, cand, g_sum)
        if ctx.needs_input_grad[1]:
            grad_bdec = -(W_enc.index_select(1, cand) @ g_sum)
        return None, grad_bdec, grad_W, grad_b, None, None


def auxk_loss(x: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
              W_dec: torch.Tensor, pre: torch.Tensor, e: torch.Tensor, total_var: torch.Tensor,
              tokens_since_fired: torch.Tensor, dead: torch.Tensor, aux_k: int, cap: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """AuxK for batch ``x [batch, d_in]`` (see module doc).

    Args:
        pre: ``[batch, d_sae]`` no-grad pre-activations of this step. e: ``[batch, d_in]`` residual
        ``x − x̂`` (detached here). total_var: ``Σ‖x − x̄‖²``. tokens_since_fired, dead: ``[d_sae]``.
        aux_k: the paper's ``k_aux``. cap: candidate columns (> 0).
    Returns ``(aux, overflow)``: the unweighted loss (0-d, differentiable in the SAE parameters) and a
    0-d bool, true when more latents are dead than ``cap`` holds.
    """
    B = x.shape[0]
    kk = min(aux_k, cap)
    n_dead = dead.sum()
    with torch.no_grad():
        x_c = x.detach() - b_dec.detach()
        cand = tokens_since_fired.topk(cap, sorted=False).indices                # [cap] stalest first
        cand_dead = dead.gather(0, cand)
        cols = pre.index_select(1, cand)                                         # [B, cap]
        if kk < cap:
            local = cols.masked_fill(~cand_dead, -math.inf).topk(kk, dim=-1, sorted=False).indices
            keep = torch.zeros(B, cap, dtype=torch.bool, device=x.device).scatter_(1, local, True) & cand_dead
        else:
            keep = cand_dead.expand(B, cap)
    p = _ColumnPreActs.apply(x_c, b_dec, W_enc, b_enc, cand, cols)
    f = torch.relu(p) * keep                                                     # [B, cap], dense
    e_hat = f @ W_dec.index_select(0, cand)
    scale = (n_dead.to(e_hat.dtype) / aux_k).clamp(max=1.0)
    aux = (e_hat - e.detach()).pow(2).sum() / total_var * scale
    return aux, n_dead > cap
