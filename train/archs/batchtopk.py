"""BatchTopK (Bussmann, Leask & Nanda 2024, arXiv 2412.06410): the top ``B·k`` activations of the
whole batch are kept, so a token's L0 varies and the batch mean is ``k``.

    f = ReLU(pre) · 1[ReLU(pre) ≥ τ_B],  τ_B = the (B·k)-th largest entry of ReLU(pre [B, d_sae])
    θ = mean of τ_B over the final ``calibrate_frac`` of the run's steps  (τ_B = min{f_bi > 0})

At inference the SAE is a JumpReLU with ``threshold_i = θ`` for every latent (SAELens'
``BatchTopKTrainingSAE`` and dictionary_learning save it the same way), so tokens are encoded
independently of their batch. SAELens estimates θ by an EMA ``θ ← (1 − η)θ + ητ_B`` (η = 0.01,
from 0) over the whole run; we log that EMA (``threshold``, started at the first τ_B) but save
the plain running mean over the last steps, where the learning rate decays and τ_B is stable:
on the embedded store τ_B fell from 0.92 to 0.45 over a 150-step run, the EMA ended at 0.64 and
gave a held-out L0 of 20 instead of 32. ``-p calibrate_frac=0`` saves the EMA (SAELens' choice).
AuxK is added as for TopK.

Selection cost: the flat top-``B·k`` over ``B·d_sae`` entries (190 ms on 2 CPU cores at 4096 ×
5120) is replaced by an exact threshold search (:func:`batch_topk_select`): collect every entry
above a lower bound of τ (the previous batch's τ less 5 %, else a subsample estimate), then take
the n-th largest of those; 31–35 ms with the previous τ, 52 ms without (TopK's per-row top-k: 44
ms). The codes are ragged (:class:`~sae.rundir.codes.SparseCodes`): real activations have rare
high-norm tokens that take up to 2 016 of 5 120 latents, and a padded ``[B, K_max]`` form made the
step 1.36× TopK's; ragged, 1.05×. The result equals the flat selection (tested, including heavy
rows, ties, and too-high/too-low guesses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ...rundir.sae import SAE, SparseCodes
from ..sparse_ops import GatherFlat, dense_pre_no_grad
from .base import Arch, Encoded, Inference, register


def _sample_lower_bound(pre: torch.Tensor, n: int, margin: float) -> float:
    """A value that probably has ≥ ``n`` entries of ``pre`` above it: the ``margin·n/s``-th largest
    of every ``s``-th column (s ≈ d_sae/160, so about 160 latents of every token); ``-inf`` when
    the subsample is too small to say."""
    B, F = pre.shape
    s = max(1, min(32, F // 64))
    sub = pre[:, ::s].reshape(-1)
    m = math.ceil(margin * n * sub.numel() / pre.numel())
    if m >= sub.numel():
        return -math.inf
    return float(sub.topk(m, sorted=False).values.min())


@torch.no_grad()
def batch_topk_select(pre: torch.Tensor, k: int, guess: float | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                       torch.Tensor]:
    """The top ``n = B·k`` entries of ``ReLU(pre)`` ``[B, d_sae]`` as flat entries.

    Returns ``(rows [n'], latents [n'], tau)``: the kept entries in (row, latent) order (the ragged
    form of :class:`~sae.rundir.codes.SparseCodes`) and ``tau``, the n-th largest entry of
    ``ReLU(pre)`` (0-dim tensor; 0 when fewer than n entries are positive, and then every positive
    entry is kept). Entries tied with τ are all kept, so ``n' ≥ n`` only with ties.

    Method (exact for any ``guess``; the guess only sets the cost): take a lower bound ``lo`` —
    ``guess`` (e.g. the previous batch's τ lowered by 5 %) or a subsample estimate
    (:func:`_sample_lower_bound`) — and collect every entry ≥ lo (one compare and one ``nonzero``
    over ``pre``). If there are at least n of them, they include every entry ≥ τ, so τ is their
    n-th largest (a ``kthvalue`` over ~1.3n values). If not, ``lo`` was too high: lower it (the
    subsample's bound with a 4× then 16× wider margin, then 0) and repeat.
    """
    B, F = pre.shape
    n = min(B * k, B * F)
    def lower_bounds():  # decreasing; each tried only if the one before held fewer than n entries
        last = math.inf
        for b in ([guess] if guess is not None else []):
            if 0 < b < last:
                last = b
                yield b
        for margin in (1.5, 6.0, 24.0):
            b = _sample_lower_bound(pre, n, margin)
            if 0 < b < last:
                last = b
                yield b
        yield 0.0

    for lo in lower_bounds():
        rows, cols = (pre >= lo if lo > 0 else pre > 0).nonzero(as_tuple=True)
        if rows.numel() >= n or lo <= 0:
            break
    v = pre[rows, cols]
    if v.numel() <= n:  # fewer than n positive entries: keep them all
        return rows, cols, pre.new_zeros(()) if v.numel() < n else v.min()
    tau = v.kthvalue(v.numel() - n + 1).values
    keep = v >= tau
    return rows[keep], cols[keep], tau


@register
class BatchTopK(Arch):
    name = "batchtopk"
    uses_auxk = True
    source = "Bussmann et al. 2024 (arXiv 2412.06410)"

    @dataclass
    class Config:
        threshold_lr: float = 0.01
        """η of the logged EMA of τ_B (SAELens' ``topk_threshold_lr``)."""
        calibrate_frac: float = 0.2
        """θ saved = mean τ_B over this final fraction of steps (0 = save the EMA instead)."""
        ranges = {"threshold_lr": "(0,1]", "calibrate_frac": "[0,1]"}

    def __init__(self, d_in: int, d_sae: int, k: int, config: Any, train_cfg: Any) -> None:
        super().__init__(d_in, d_sae, k, config, train_cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        self.register_buffer("threshold_set", torch.zeros((), dtype=torch.bool))
        self.register_buffer("tau_sum", torch.zeros((), dtype=torch.float64))    # Σ τ_B over the final steps
        self.register_buffer("tau_count", torch.zeros((), dtype=torch.int64))
        self._tau_guess: float | None = None  # not state: results never depend on it

    def select(self, sae: SAE, x_c: torch.Tensor) -> tuple[SparseCodes, torch.Tensor, torch.Tensor]:
        """BatchTopK codes (ragged: ``B·k`` entries, each token its own count), the dense no-grad
        ``pre`` and τ_B. Only the kept entries carry gradients (:class:`GatherFlat`)."""
        pre = dense_pre_no_grad(x_c, sae.W_enc, sae.b_enc)
        if self.dist.active:
            rows, lat, tau = self.select_global(pre)
        else:
            rows, lat, tau = batch_topk_select(pre, self.k, self._tau_guess)
            t = float(tau)  # a host read; BatchTopK's counts are data-dependent anyway
            self._tau_guess = 0.95 * t if t > 0 else None  # speed only: the selection is exact for any guess
        vals = torch.relu(GatherFlat.apply(x_c, sae.W_enc, sae.b_enc, rows, lat, pre))
        return SparseCodes.ragged(rows, lat, vals, x_c.shape[0]), pre, tau

    @torch.no_grad()
    def select_global(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Data-parallel BatchTopK: this rank's share of the top ``B·k`` entries of the *global* batch
        (``B`` = the ranks' rows together) and the global τ_B — the same selection as one process.

        Every global top-``B·k`` entry is among its own rank's top ``B·k`` (:func:`batch_topk_select`
        with ``k·W`` on ``B/W`` rows), so τ_B is the ``B·k``-th largest of the ranks' candidates,
        gathered (``W·B·k`` floats); each rank then keeps its candidates ≥ τ_B (ties all kept, as in
        one process; τ_B = 0 and every positive entry kept when the batch has fewer than ``B·k``)."""
        n = self.global_batch(pre.shape[0]) * self.k
        rows, lat, tau_local = batch_topk_select(pre, self.k * self.dist.world, self._tau_guess)
        t = float(tau_local)
        self._tau_guess = 0.95 * t if t > 0 else None  # this rank's local bound: speed only
        v = pre[rows, lat]
        every = self.dist.cat(v)
        if every.numel() < n:
            tau = pre.new_zeros(())
        elif every.numel() == n:
            tau = every.min()
        else:
            tau = every.kthvalue(every.numel() - n + 1).values
        keep = v >= tau
        return rows[keep], lat[keep], tau

    @torch.no_grad()
    def update_threshold(self, codes: SparseCodes) -> None:
        """θ ← (1 − η)θ + η·(smallest positive kept activation of the global batch); the first batch
        sets θ. No host read."""
        v = codes.entries()[2].detach()
        if v.numel() == 0 and not self.dist.active:
            return
        m = torch.where(v > 0, v, torch.inf).amin() if v.numel() else v.new_full((), torch.inf)
        m = self.dist.min_(m.reshape(1)).reshape(()).to(torch.float64)
        ok = torch.isfinite(m)
        lr = self.config.threshold_lr
        new = torch.where(self.threshold_set, (1 - lr) * self.threshold + lr * m, m)
        self.threshold.copy_(torch.where(ok, new, self.threshold))
        self.threshold_set.logical_or_(ok)

    def encode(self, sae: SAE, x_c: torch.Tensor, step: int, total_steps: int, dead: torch.Tensor) -> Encoded:
        codes, pre, tau = self.select(sae, x_c)
        self.update_threshold(codes)
        frac = self.config.calibrate_frac
        if frac > 0 and step >= total_steps * (1 - frac):
            pos = tau > 0
            self.tau_sum += torch.where(pos, tau.to(torch.float64), 0.0)
            self.tau_count += pos.to(torch.int64)
        return Encoded(codes, pre, logs={"batch_threshold": tau.detach(), "threshold": self.threshold.clone()})

    def saved_threshold(self) -> float:
        """θ of the saved JumpReLU: the final-steps mean of τ_B, or the EMA when none was recorded."""
        n = int(self.tau_count)
        return float(self.tau_sum) / n if n else float(self.threshold)

    def inference(self) -> Inference:
        theta = self.saved_threshold()
        th = torch.full((self.d_sae,), theta, dtype=torch.float32)
        return Inference("jumprelu", threshold=th, cfg={"batchtopk_threshold": theta, "target_l0": self.k,
                                                        "batchtopk_threshold_ema": float(self.threshold)})
