"""One SAE + its architecture + its optimiser + its penalty, consuming batches: the unit a sweep
runs K of.

Loss per step (mission doc "The SAE"; Gao et al. 2024 for TopK/AuxK; ``train/archs`` for each
architecture's own terms):
    reconstruction (the arch's; FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the batch mean; Matryoshka sums
                    the FVU of every nested prefix)
    + the arch's sparsity terms (ReLU: L1; JumpReLU: L0 / tanh + pre-activation loss)
    + AuxK for topk/batchtopk/matryoshka: α · Σ‖e − ê_aux‖² / Σ‖x − x̄‖² · min(1, n_dead / k_aux)
          (α = 1/32, k_aux = d_in/2; e = x − x̂ detached, ê_aux = decoder of the top-k_aux *dead*
          latents' pre-activations)
    + penalty(ctx)                                                      (orthogonality variant)
After ``backward`` the decoder gradient is projected orthogonally to each unit row, Adam steps
(on the SAE's and the arch's parameters), and rows are renormalised to unit norm.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .archs import build_arch
from .archs.base import warmed_up
from .config import TrainConfig
from .sae import SAE, SparseCodes
from .sparse_ops import gather_pre_acts
from .variants import PenaltyContext, build_penalty


def step_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator for step ``step`` of a run seeded ``seed`` (stateless → resume-exact)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


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
        # the training SAE holds W_enc, b_enc, W_dec, b_dec; the arch holds its own state
        self.sae = SAE(d_in, d_sae, "topk" if cfg.activation == "topk" else "relu", cfg.k)
        self.sae.init_weights(torch.Generator().manual_seed(cfg.model_seed), b_dec_init)
        self.arch = build_arch(cfg.activation, d_in, d_sae, cfg.k, cfg.arch_params, cfg)
        self.penalty = build_penalty(cfg.variant, d_sae, d_in, cfg.variant_params)
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.int64))
        self.to(device)
        params = [*self.sae.parameters(), *self.arch.parameters()]
        self.opt = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), fused=_fused_adam_ok(device))
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
        """ReLU's L1 coefficient at ``step`` (linear warm-up over ``l1_warmup_frac``)."""
        return warmed_up(self.cfg.l1_coefficient, step, self.total_steps, self.cfg.l1_warmup_frac)

    # -- one step -----------------------------------------------------------------------------
    def losses(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, Any], SparseCodes]:
        """Forward and total loss for batch ``x [batch, d_in]`` (normalised units)."""
        sae = self.sae
        x_c = x - sae.b_dec
        total_var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        dead = self.tokens_since_fired > self.cfg.dead_tokens
        enc = self.arch.encode(sae, x_c, step, self.total_steps, dead)
        codes, pre = enc.codes, enc.pre
        loss, x_hat, logs = self.arch.reconstruction(sae, x, codes, total_var)
        logs = {**logs, **enc.logs}
        for term in enc.losses.values():
            loss = loss + term
        e = x - x_hat
        n_dead = int(dead.sum())
        if self.arch.uses_auxk and pre is not None and n_dead and self.cfg.aux_k_coefficient > 0:
            k_aux = min(self.aux_k, n_dead)
            with torch.no_grad():
                aux_idx = pre.masked_fill(~dead, -math.inf).topk(k_aux, dim=-1, sorted=False).indices
            aux_vals = torch.relu(gather_pre_acts(x_c, sae.W_enc, sae.b_enc, aux_idx, pre))
            e_hat = sae.decode_sparse(SparseCodes(aux_vals, aux_idx), bias=False)
            aux = (e_hat - e.detach()).pow(2).sum() / total_var * min(1.0, n_dead / self.aux_k)
            loss = loss + self.cfg.aux_k_coefficient * aux
            logs["auxk"] = aux.item()
        ctx = PenaltyContext(W_dec=sae.W_dec, codes=codes, step=step, total_steps=self.total_steps,
                             generator=step_generator(self.cfg.model_seed, step))
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
        self.arch.after_step(self.sae)
        with torch.no_grad():
            fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
            fired[codes.idx[codes.vals > 0]] = True
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[fired] = 0
        self.step_idx += 1
        logs["lr"] = lr
        return logs

    @torch.no_grad()
    def inference_sae(self) -> SAE:
        """The trained SAE in its saved form (e.g. BatchTopK → JumpReLU with θ), normalised units."""
        spec = self.arch.inference()
        s = self.sae
        out = SAE(s.d_in, s.d_sae, spec.activation, spec.k, device=s.W_enc.device)
        for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(out, n).copy_(getattr(s, n))
        if spec.threshold is not None:
            out.threshold.copy_(spec.threshold)
        out.cfg = {"trained_architecture": self.arch.name, **spec.cfg}
        return out

    # -- checkpointing ------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {"model": self.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step_idx}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.step_idx = int(state["step"])
