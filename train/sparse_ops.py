"""Sparse backward for the TopK encoder (our own autograd function).

The TopK SAE needs the dense pre-activations ``[batch, d_sae]`` only to *select* latents; the
loss depends on ``K`` gathered values per token. Autograd through ``pre.gather`` would run two
more dense ``batch × d_in × d_sae`` matmuls in the backward pass (``Gᵀ x`` and ``G W_encᵀ``) on a
gradient that is zero except at ``K`` entries per row. :class:`GatherPreActs` instead builds the
gradient as a CSR matrix with ``batch·K`` entries, so the backward costs ``O(batch·K·d_in)``.
"""

from __future__ import annotations

import warnings

import torch


class GatherPreActs(torch.autograd.Function):
    """``vals = pre.gather(1, idx)`` where ``pre = x_c W_enc + b_enc`` (precomputed, no grad).

    Inputs: ``x_c [batch, d_in]`` (= x − b_dec), ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
    ``idx [batch, K]`` (distinct per row), ``pre [batch, d_sae]``. Output ``[batch, K]``.
    Gradients: ∂x_c = G W_encᵀ, ∂W_enc = x_cᵀ G, ∂b_enc = Σ_b G, with G the sparse ``[batch, d_sae]``
    gradient scattered from ``idx``.
    """

    @staticmethod
    def forward(ctx, x_c, W_enc, b_enc, idx, pre):  # type: ignore[override]
        ctx.save_for_backward(x_c, W_enc, idx)
        return pre.gather(1, idx)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x_c, W_enc, idx = ctx.saved_tensors
        B, K = idx.shape
        d_sae = W_enc.shape[1]
        order = idx.argsort(dim=1)
        cols = idx.gather(1, order).reshape(-1)
        vals = g.gather(1, order).reshape(-1).to(x_c.dtype)
        crow = torch.arange(0, B * K + 1, K, device=idx.device, dtype=torch.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            G = torch.sparse_csr_tensor(crow, cols, vals, (B, d_sae))
            grad_x = grad_W = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = G @ W_enc.t()
            if ctx.needs_input_grad[1]:
                grad_W = (G.t() @ x_c).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        return grad_x, grad_W, grad_b, None, None


def gather_pre_acts(x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, idx: torch.Tensor,
                    pre: torch.Tensor) -> torch.Tensor:
    """Differentiable ``pre.gather(1, idx)`` with a sparse backward (see :class:`GatherPreActs`)."""
    return GatherPreActs.apply(x_c, W_enc, b_enc, idx, pre)
