"""AuxK, the dead-latent auxiliary loss (Gao et al. 2024, arXiv 2406.04093, App. A.2), computed on
the dead latents' columns only and without a device→host read.

Definition (dense)::

    e      = x − x̂                        (detached residual of the main reconstruction)
    k_aux  = min(aux_k, n_dead)            (aux_k = d_in / 2 by default, as in the paper)
    f_aux  = ReLU(top-k_aux over the dead latents of pre)          [batch, d_sae]
    ê      = f_aux W_dec                   (no decoder bias)
    AuxK   = Σ‖e − ê‖² / Σ‖x − x̄‖² · min(1, n_dead / aux_k)

The normalisation by Σ‖x − x̄‖² (the batch variance of x, like our FVU) follows Gao et al. 2024 (arXiv 2406.04093);
OpenAI's reference normalises by Var(e) instead (about 10× stronger at EV 0.9; documented in
docs/training.md).

How it is computed: the candidates are the ``cap`` stalest latents (largest ``tokens_since_fired``;
every dead latent whenever ``n_dead ≤ cap``). Their ``[batch, cap]`` columns of the no-grad ``pre``
are ranked, picks that are not dead (or not positive: the ReLU) are masked out, and everything after
is dense over those columns in one autograd function with a written-out backward
(:class:`_AuxKColumns`): ``ê = f_cap W_dec[cand]`` and the three backward products are GEMMs of
``batch × cap × d_in`` instead of a top-k and scatter over all ``[batch, d_sae]``, and no graph of
elementwise ``[batch, cap]`` steps is recorded. The selection equals the dense definition whenever
``n_dead ≤ cap`` (tested against a float64 dense reference); ``cap`` is sized on the host at log
steps (:func:`capacity`), and when more latents die before the next one the stalest ``cap`` are used
(``overflow`` is logged).
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


class _AuxKColumns(torch.autograd.Function):
    """The whole AuxK term over the candidate columns, forward and backward written out (one
    function, so no autograd graph of ``[batch, cap]`` elementwise steps).

    Forward: ``f = cols ⊙ m`` (``m`` = selected, dead and positive: the ReLU and the top-k_aux mask in
    one), ``r = f W_c − e`` with ``W_c = W_dec[cand]``, ``loss = c · Σ r²`` (``c`` = the constant
    ``min(1, n_dead/aux_k) / Σ‖x − x̄‖²``). Backward, with ``G = 2c · r · ḡ``::

        ∂W_dec[cand] = fᵀ G                 ∂f = (G W_cᵀ) ⊙ m     (= ∂pre[:, cand])
        ∂W_enc[:, cand] = x_cᵀ ∂f           ∂b_enc[cand] = Σ_b ∂f      ∂b_dec = −W_enc[:, cand] Σ_b ∂f

    (``pre = (x − b_dec) W_enc + b_enc``; no input gradient: x is data, e is detached.) Checked
    against autograd through the dense definition in float64 (``tests/test_scale.py``).
    """

    @staticmethod
    def forward(ctx: Any, x_c: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                W_dec: torch.Tensor, cand: torch.Tensor, cols: torch.Tensor, m: torch.Tensor, e: torch.Tensor,
                c: torch.Tensor) -> torch.Tensor:
        dev = cols.device.type
        # Under ``torch.autocast`` (``--autocast bf16``) the four GEMMs run in the autocast dtype, as
        # they did through autograd; everything else (and every result) stays in the parameters' dtype.
        ctx.mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else cols.dtype
        with torch.autocast(dev, enabled=False):
            f = cols * m
            W_c = W_dec.index_select(0, cand)
            r = _mm(f, W_c, ctx.mm_dtype).sub_(e)                                  # f W_c − e
            loss = r.pow(2).sum() * c
        ctx.save_for_backward(x_c, W_enc, cand, f, m, W_c, r, c)
        ctx.shapes = (W_dec.shape, b_enc.shape)
        return loss

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_c, W_enc, cand, f, m, W_c, r, c = ctx.saved_tensors
        dec_shape, benc_shape = ctx.shapes
        dt = ctx.mm_dtype
        G = r * (2.0 * c * g)                                                     # [B, d_in]
        df = _mm(G, W_c.t(), dt).mul_(m)                                          # [B, cap]
        grad_bdec = grad_W = grad_b = grad_dec = None
        if ctx.needs_input_grad[4]:
            grad_dec = torch.zeros(dec_shape, dtype=G.dtype, device=G.device).index_copy_(0, cand, _mm(f.t(), G, dt))
        if ctx.needs_input_grad[2]:
            grad_W = torch.zeros_like(W_enc).index_copy_(1, cand, _mm(x_c.t(), df, dt))
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[1]:
            grad_b = torch.zeros(benc_shape, dtype=df.dtype, device=df.device).index_copy_(0, cand, df.sum(0))
            if ctx.needs_input_grad[1]:
                grad_bdec = -(W_enc @ grad_b)                  # a mat-vec over all columns: no strided gather
            if not ctx.needs_input_grad[3]:
                grad_b = None
        return None, grad_bdec, grad_W, grad_b, grad_dec, None, None, None, None, None


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` computed in ``dtype``, returned in ``a``'s dtype."""
    if dtype == a.dtype and dtype == b.dtype:
        return a @ b
    return (a.to(dtype) @ b.to(dtype)).to(a.dtype)


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
    kk = min(aux_k, cap)
    n_dead = dead.sum()
    with torch.no_grad():
        x_c = x.detach() - b_dec.detach()
        cand = tokens_since_fired.topk(cap, sorted=False).indices                # [cap] stalest first
        cand_dead = dead.gather(0, cand)
        cols = pre.index_select(1, cand)                                         # [B, cap]
        ok = cand_dead & (cols > 0)                                              # dead, and the ReLU
        if kk < cap:
            # the k_aux-th largest dead value per row; keeping every dead value ≥ it is the top-k_aux
            # (a tie at the threshold, measure-zero for continuous pre-activations, keeps both)
            kth = cols.masked_fill(~cand_dead, -math.inf).topk(kk, dim=-1, sorted=False).values.amin(-1, keepdim=True)
            m = ((cols >= kth) & ok).to(cols.dtype)
        else:
            m = ok.to(cols.dtype)
        scale = (n_dead.to(cols.dtype) / aux_k).clamp(max=1.0)
        c = scale / total_var.detach().to(cols.dtype)
    aux = _AuxKColumns.apply(x_c, b_dec, W_enc, b_enc, W_dec, cand, cols, m, e.detach(), c)
    return aux, n_dead > cap
