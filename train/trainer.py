"""One SAE + its architecture + its optimiser + its penalty, consuming batches: the unit a sweep
runs K of.

Loss per step (Gao et al. 2024, arXiv 2406.04093, for TopK/AuxK; ``train/archs`` for each
architecture's own terms):
    reconstruction (the arch's; FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the batch mean; Matryoshka sums
                    the FVU of every nested prefix)
    + the arch's sparsity terms (ReLU: L1; JumpReLU: L0 / tanh + pre-activation loss)
    + AuxK for topk/batchtopk/matryoshka: α · Σ‖e − ê_aux‖² / Σ‖x − x̄‖² · min(1, n_dead / k_aux)
          (α = 1/32, k_aux = d_in/2; e = x − x̂ detached, ê_aux = decoder of the top-k_aux *dead*
          latents' pre-activations; computed on the dead columns only, ``train/auxk.py``)
    + penalty(ctx)                                                      (orthogonality variant)
After ``backward`` the decoder gradient is projected orthogonally to each unit row, Adam steps
(on the SAE's and the arch's parameters), and rows are renormalised to unit norm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..rundir.sae import SAE, SparseCodes
from .archs import build_arch
from .archs.base import warmed_up
from .auxk import auxk_loss, capacity
from .collective import LOCAL, Collective, DistributedError
from .config import TrainConfig
from .variants import PenaltyContext, build_penalty

TRAINER_ADDITIVE_LOGS = ("loss", "l0", "auxk")
"""The trainer's own logged terms that are per-row sums over a global normaliser (summed over the
ranks of a data-parallel run; see :meth:`~sae.train.archs.base.Arch.is_additive`)."""


def step_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator for step ``step`` of a run seeded ``seed`` (stateless → resume-exact)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def read_logs(logs: dict[str, Any]) -> dict[str, float]:
    """Logged terms as floats: every tensor value is read back in ONE device→host transfer."""
    keys = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in logs.items() if not isinstance(v, torch.Tensor)}
    if keys:
        vals = torch.stack([logs[k].detach().reshape(()).double() for k in keys]).tolist()
        out.update(zip(keys, vals, strict=True))
    return out


def _fused_adam_ok(device: str | torch.device) -> bool:
    """Fused (single-kernel) Adam exists for CPU and CUDA in torch ≥ 2.4; elsewhere use the default."""
    return torch.device(device).type in ("cpu", "cuda")


class Trainer(nn.Module):
    """Trains one SAE. ``state_dict`` holds the SAE, the penalty buffers and dead-latent counters;
    :meth:`checkpoint_state` adds the optimiser and step for resuming.

    Args:
        cfg: run configuration. d_in: input width. total_steps: optimiser steps in the run.
        b_dec_init: ``[d_in]`` initial decoder bias (the mean of the *normalised* data).
        device: where the SAE lives. dist: the ranks of a data-parallel run (:mod:`sae.train.collective`);
            each :meth:`step` then takes this rank's equal share of the global batch.
    """

    def __init__(self, cfg: TrainConfig, d_in: int, total_steps: int, b_dec_init: torch.Tensor | None = None,
                 device: str | torch.device = "cpu", dist: Collective = LOCAL) -> None:
        super().__init__()
        self.cfg, self.total_steps, self.dist = cfg, total_steps, dist
        d_sae = cfg.d_sae or cfg.expansion * d_in
        # the training SAE holds W_enc, b_enc, W_dec, b_dec; the arch holds its own state
        self.sae = SAE(d_in, d_sae, "topk" if cfg.activation == "topk" else "relu", cfg.k)
        self.sae.init_weights(torch.Generator().manual_seed(cfg.model_seed), b_dec_init)
        self.arch = build_arch(cfg.activation, d_in, d_sae, cfg.k, cfg.arch_params, cfg)
        self.arch.dist = dist
        self.penalty = build_penalty(cfg.variant, d_sae, d_in, cfg.variant_params)
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.int64))
        self.to(device)
        params = [*self.sae.parameters(), *self.arch.parameters()]
        self.opt = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), fused=_fused_adam_ok(device))
        self.step_idx = 0
        self.aux_k = cfg.aux_k or d_in // 2
        self.aux_cap = 0  # AuxK candidate columns; sized at log steps (refresh_aux_capacity)

    @torch.no_grad()
    def init_from_sae(self, sae: SAE) -> None:
        """Start from ``sae`` (``d_in``/``d_sae`` as this trainer's, training units, unit decoder rows;
        see :mod:`sae.train.init_from`) instead of the random initialisation: its four tensors, and the
        architecture's own state (JumpReLU's θ)."""
        for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(self.sae, n).copy_(getattr(sae, n))
        self.arch.init_from_saved(sae)

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
        """Forward and total loss for batch ``x [batch, d_in]`` (normalised units).

        Returns ``(loss, logs, codes)``; the values of ``logs`` are 0-d device tensors (or floats):
        nothing here reads a device value on the host (see :meth:`step`)."""
        sae, dist = self.sae, self.dist
        x_c = x - sae.b_dec
        if dist.active:  # Σ‖x − x̄‖² of the global batch: its mean, then the ranks' sums
            batch = x.shape[0] * dist.world
            mean = dist.sum_(x.sum(0)) / batch
            total_var = dist.sum_((x - mean).pow(2).sum()).clamp_min(1e-12)
        else:
            batch = x.shape[0]
            total_var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        dead = self.tokens_since_fired > self.cfg.dead_tokens
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast == "bf16"):
            enc = self.arch.encode(sae, x_c, step, self.total_steps, dead)
            codes, pre = enc.codes, enc.pre
            loss, x_hat, logs = self.arch.reconstruction(sae, x, codes, total_var)
            logs = {**logs, **enc.logs}
            for term in enc.losses.values():
                loss = loss + term
            n_dead = dead.sum()
            if self.arch.uses_auxk and pre is not None and self.aux_cap and self.cfg.aux_k_coefficient > 0:
                aux, overflow = self._auxk(x, x - x_hat, pre, dead, total_var)
                loss = loss + self.cfg.aux_k_coefficient * aux
                logs["auxk"], logs["auxk_overflow"] = aux.detach(), overflow
        loss = loss.float()
        # data-parallel: the penalty sees the whole global batch's codes (no gradient flows through
        # them), so it and its state are equal on every rank; each adds 1/W of it to the summed loss
        gather = dist.active and self.penalty.uses_codes
        pen_codes = dist.gather_codes(codes, self.arch.fixed_width) if gather else codes
        ctx = PenaltyContext(W_dec=sae.W_dec, codes=pen_codes, step=step, total_steps=self.total_steps,
                             generator=step_generator(self.cfg.model_seed, step))
        pen, pen_logs = self.penalty(ctx)
        loss = loss + (pen / dist.world if dist.active else pen)
        logs.update({f"penalty/{k}": v for k, v in pen_logs.items()})
        logs["loss"] = loss.detach()
        logs["l0"] = codes.n_active().float() / batch
        logs["dead_fraction"] = n_dead / sae.d_sae
        return loss, logs, codes

    def _auxk(self, x: torch.Tensor, e: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor,
              total_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """AuxK on the dead latents' columns (:func:`~sae.train.auxk.auxk_loss`): ``(aux, overflow)``."""
        s = self.sae
        return auxk_loss(x, s.b_dec, s.W_enc, s.b_enc, s.W_dec, pre, e, total_var, self.tokens_since_fired,
                         dead, self.aux_k, self.aux_cap)

    @torch.no_grad()
    def refresh_aux_capacity(self) -> int:
        """Size AuxK's candidate set from the current dead count (one host read; see
        :func:`~sae.train.auxk.capacity`). Called at the start of log steps and on resume."""
        if not self.arch.uses_auxk or self.cfg.aux_k_coefficient <= 0:
            self.aux_cap = 0
            return 0
        n_dead = int((self.tokens_since_fired > self.cfg.dead_tokens).sum())
        self.aux_cap = capacity(n_dead, self.aux_k, self.sae.d_sae)
        return self.aux_cap

    def step(self, x: torch.Tensor, sync: bool = True) -> dict[str, Any]:
        """One optimiser step on ``x [batch, d_in]``.

        With ``sync=False`` nothing is read back to the host (no ``.item()``, ``int(tensor)``,
        ``bool(tensor)``, data-dependent shapes) on the default TopK path, so a GPU never stalls; the
        logged terms are returned as 0-d device tensors. With ``sync=True`` (log steps) they are
        read in one transfer and returned as floats, and AuxK's capacity is re-sized
        (:meth:`refresh_aux_capacity`, before the step). Architectures with a data-dependent number of active
        latents (relu, jumprelu, batchtopk, matryoshka) and the co-firing-pair penalties size their
        tensors from the data, which needs a host read on CUDA; see docs/performance.md, "Scale"."""
        step = self.step_idx
        if sync:
            self.refresh_aux_capacity()
        lr = self.lr_at(step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss, logs, codes = self.losses(x, step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.dist.active:  # data-parallel: Σ over ranks = the global batch's gradient
            self.dist.grads_(self.opt_params())
        self.sae.project_decoder_grad_()
        self.opt.step()
        self.sae.normalize_decoder_()
        self.arch.after_step(self.sae)
        with torch.no_grad():  # a latent fired if any token gave it a value > 0 (scatter: no sync)
            _rows, lat, v = codes.entries()
            hits = torch.zeros_like(self.tokens_since_fired).scatter_add_(0, lat, (v.detach() > 0).to(torch.int64))
            self.dist.sum_(hits)  # dead-latent counters count the global batch's firings
            self.tokens_since_fired.add_(x.shape[0] * self.dist.world).masked_fill_(hits > 0, 0)
        self.step_idx += 1
        logs["lr"] = lr
        if sync:
            if self.dist.active:
                logs = self._reduce_logs(logs)
            logs = read_logs(logs)
            logs["explained_variance"] = 1.0 - logs["fvu"]
        return logs

    def opt_params(self) -> list[torch.nn.Parameter]:
        """The optimised parameters (the SAE's, then the architecture's), in the optimiser's order."""
        return [p for g in self.opt.param_groups for p in g["params"]]

    @torch.no_grad()
    def _reduce_logs(self, logs: dict[str, Any]) -> dict[str, Any]:
        """Data-parallel log step: the additive terms summed over the ranks (one all-reduce), and a
        check that the ranks still hold the same weights (a float64 checksum of the parameters:
        equal on every rank unless a rank diverged, which stops the run)."""
        add = [k for k, v in logs.items() if isinstance(v, torch.Tensor)
               and (k in TRAINER_ADDITIVE_LOGS or self.arch.is_additive(k))]
        check = torch.stack([p.detach().double().sum() for p in self.opt_params()])
        buf = torch.cat([torch.stack([logs[k].detach().reshape(()).double() for k in add]) if add
                         else check.new_zeros(0), check, -check])
        lo = buf[len(add):].clone()
        if add:
            self.dist.sum_(buf[:len(add)])
        self.dist.max_(lo)
        n = len(check)
        if not torch.equal(lo[:n], check) or not torch.equal(-lo[n:], check):
            raise DistributedError(f"the ranks' weights differ at step {self.step_idx}: rank {self.dist.rank} "
                                   "diverged from the others (mixed library versions or devices?); resume "
                                   "from the last checkpoint on identical ranks")
        out = dict(logs)
        out.update({k: buf[i] for i, k in enumerate(add)})
        return out

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
        return {"model": self.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step_idx,
                "aux_cap": self.aux_cap}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.step_idx = int(state["step"])
        if "aux_cap" in state:
            self.aux_cap = int(state["aux_cap"])
        else:  # a checkpoint from before the capacity existed
            self.refresh_aux_capacity()
