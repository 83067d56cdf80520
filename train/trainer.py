"""One SAE + its optimiser + its penalty, consuming batches: the unit a sweep runs K of.

Loss per step (mission doc "The SAE"; Gao et al. 2024 for TopK/AuxK):
    FVU  = Σ‖x − x̂‖² / Σ‖x − x̄‖²                                     (x̄: batch mean)
    topk: FVU + α · Σ‖e − ê_aux‖² / Σ‖x − x̄‖² · min(1, n_dead / k_aux)    (AuxK, α = 1/32, k_aux = d_in/2;
          e = x − x̂ detached, ê_aux = decoder of the top-k_aux *dead* latents' pre-activations)
    relu: FVU + λ(t) · mean_b Σ_i f_bi ‖W_dec,i‖                        (λ warmed up linearly)
    + penalty(ctx)                                                      (orthogonality variant)
After ``backward`` the decoder gradient is projected orthogonally to each unit row, Adam steps,
and rows are renormalised to unit norm.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .sae import SAE, SparseCodes
from .sparse_ops import gather_pre_acts
from .variants import PenaltyContext, build_penalty


def step_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator for step ``step`` of a run seeded ``seed`` (stateless → resume-exact)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


_SCRATCH = threading.local()  # per thread: dask workers may run several sweep groups as threads


def _scratch(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A reusable ``[rows, cols]`` buffer for the no-grad pre-activations on CPU, else None.

    On CPU every fresh ``[batch, d_sae]`` tensor (84 MB at 4 096 × 5 120) is a new ``mmap`` that is
    page-faulted in again each step: reusing one buffer made the encoder GEMM 12 % faster here
    (134 vs 152 ms; the whole step 258 → 212 ms). One buffer is shared by all trainers of a thread
    (a sweep steps them one after another, and nothing keeps ``pre`` past the step; the sweep ≡
    alone test covers the sharing). CUDA's caching allocator already reuses memory, so there this
    returns None (a fresh output).
    """
    if device.type != "cpu":
        return None
    key = (rows, cols, dtype)
    if getattr(_SCRATCH, "key", None) != key:  # keep at most one shape alive per thread
        _SCRATCH.key, _SCRATCH.buf = key, torch.empty(rows, cols, dtype=dtype)
    return _SCRATCH.buf


def topk_codes(sae: SAE, x_c: torch.Tensor) -> tuple[SparseCodes, torch.Tensor]:
    """TopK codes of ``x_c = x − b_dec`` ``[batch, d_in]`` as trained: the dense pre-activations
    ``[batch, d_sae]`` come from one no-grad GEMM with the bias fused in (into a reused buffer on
    CPU), only the ``k`` selected values carry gradients (sparse backward, ``sparse_ops``).

    Returns ``(codes, pre)``; ``pre`` is only valid until the next call on this thread.
    """
    with torch.no_grad():
        pre = torch.addmm(sae.b_enc, x_c, sae.W_enc,
                          out=_scratch(x_c.shape[0], sae.d_sae, x_c.dtype, x_c.device))
        idx = pre.topk(sae.k, dim=-1, sorted=False).indices
    return SparseCodes(torch.relu(gather_pre_acts(x_c, sae.W_enc, sae.b_enc, idx, pre)), idx), pre


def _fused_adam_ok(device: str | torch.device) -> bool:
    """Fused (single-kernel) Adam exists for CPU and CUDA in torch ≥ 2.4; elsewhere use the default."""
    return torch.device(device).type in ("cpu", "cuda")


class Trainer(nn.Module):
    """Trains one SAE. ``state_dict`` holds the SAE, the penalty buffers and dead-latent counters;
    :meth:`checkpoint_state` adds the optimiser and step for resuming.

    Args:
        cfg: run configuration. d_in: input width. total_steps: optimiser steps in the run.
        b_dec_init: ``[d_in]`` initial decoder bias (the mean of the *normalised* data).
        device: where the SAE lives.
    """

    def __init__(self, cfg: TrainConfig, d_in: int, total_steps: int, b_dec_init: torch.Tensor | None = None,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.cfg, self.total_steps = cfg, total_steps
        d_sae = cfg.d_sae or cfg.expansion * d_in
        self.sae = SAE(d_in, d_sae, cfg.activation, cfg.k)
        self.sae.init_weights(torch.Generator().manual_seed(cfg.seed), b_dec_init)
        self.penalty = build_penalty(cfg.variant, d_sae, d_in, cfg.variant_params)
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.int64))
        self.to(device)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                    fused=_fused_adam_ok(device))
        self.step_idx = 0
        self.aux_k = cfg.aux_k or d_in // 2

    # -- schedules ----------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``lr_warmup_steps``, constant, then linear decay to 0 over the
        final ``lr_decay_frac`` of the run."""
        c = self.cfg
        warm = min(1.0, (step + 1) / max(c.lr_warmup_steps, 1))
        decay_start = self.total_steps * (1 - c.lr_decay_frac)
        decay = 1.0
        if step >= decay_start:
            decay = max(0.0, (self.total_steps - step) / max(self.total_steps - decay_start, 1))
        return c.lr * warm * decay

    def l1_at(self, step: int) -> float:
        """L1 coefficient with linear warm-up over ``l1_warmup_frac`` of the run."""
        warm = self.total_steps * self.cfg.l1_warmup_frac
        return self.cfg.l1_coefficient * min(1.0, (step + 1) / max(warm, 1))

    # -- one step -----------------------------------------------------------------------------
    def losses(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, Any], SparseCodes]:
        """Forward and total loss for batch ``x [batch, d_in]`` (normalised units)."""
        sae = self.sae
        x_c = x - sae.b_dec
        total_var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        logs: dict[str, Any] = {}
        if sae.activation == "topk":
            codes, pre = topk_codes(sae, x_c)
        else:
            pre = x_c @ sae.W_enc + sae.b_enc
            codes = sae.codes_from_pre(pre)
        x_hat = sae.decode_sparse(codes)
        e = x - x_hat
        fvu = e.pow(2).sum() / total_var
        loss = fvu
        logs["fvu"] = fvu.item()
        if sae.activation == "relu":
            # gather, not ``norms[codes.idx]``: advanced-indexing backward (index_put_ with accumulate)
            # adds in a thread-dependent order on CPU, which made two ReLU runs with one seed differ
            # from the first step (2e-4 by step ~30); gather's backward (scatter_add) is deterministic.
            norms = sae.W_dec.norm(dim=1).gather(0, codes.idx.reshape(-1)).view_as(codes.idx)
            l1 = (codes.vals * norms).sum(-1).mean()
            coef = self.l1_at(step)
            loss = loss + coef * l1
            logs.update(l1=l1.item(), l1_coefficient=coef)
        dead = self.tokens_since_fired > self.cfg.dead_tokens
        n_dead = int(dead.sum())
        if sae.activation == "topk" and n_dead and self.cfg.aux_k_coefficient > 0:
            k_aux = min(self.aux_k, n_dead)
            with torch.no_grad():
                aux_idx = pre.masked_fill(~dead, -math.inf).topk(k_aux, dim=-1, sorted=False).indices
            aux_vals = torch.relu(gather_pre_acts(x_c, sae.W_enc, sae.b_enc, aux_idx, pre))
            e_hat = sae.decode_sparse(SparseCodes(aux_vals, aux_idx), bias=False)
            aux = (e_hat - e.detach()).pow(2).sum() / total_var * min(1.0, n_dead / self.aux_k)
            loss = loss + self.cfg.aux_k_coefficient * aux
            logs["auxk"] = aux.item()
        ctx = PenaltyContext(W_dec=sae.W_dec, codes=codes, step=step, total_steps=self.total_steps,
                             generator=step_generator(self.cfg.seed, step))
        pen, pen_logs = self.penalty(ctx)
        loss = loss + pen
        logs.update({f"penalty/{k}": v for k, v in pen_logs.items()})
        logs["loss"] = loss.item()
        logs["explained_variance"] = 1.0 - logs["fvu"]
        logs["l0"] = (codes.vals > 0).sum(-1).float().mean().item()
        logs["dead_fraction"] = n_dead / sae.d_sae
        return loss, logs, codes

    def step(self, x: torch.Tensor) -> dict[str, Any]:
        """One optimiser step on ``x [batch, d_in]``; returns the step's logged terms."""
        step = self.step_idx
        lr = self.lr_at(step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss, logs, codes = self.losses(x, step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.project_decoder_grad_()
        self.opt.step()
        self.sae.normalize_decoder_()
        with torch.no_grad():
            fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
            fired[codes.idx[codes.vals > 0]] = True
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[fired] = 0
        self.step_idx += 1
        logs["lr"] = lr
        return logs

    # -- checkpointing ------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {"model": self.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step_idx}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.step_idx = int(state["step"])
