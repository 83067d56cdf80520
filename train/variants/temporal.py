"""``temporal`` (log ``004_09d1b6f66c15dfbf.txt``): orthogonality weighted by how unstable a pair's co-activation is.

From the research log ``004_09d1b6f66c15dfbf.txt``. Co-activation counts accumulate over windows of
``W`` *tokens* (a batch is split at a window boundary, so the tracker state depends only on the
token stream, not on the batch size). At each window end, before the window resets:

    c_ij  = count_ij / W                                  (co-firing rate in the window)
    α_ij  = min(α_base, count_ij / 1000)
    c̄_ij ← (1 − α_ij) · c̄_ij + α_ij · c_ij               (running average; α_ij = 0 if absent)
    w_ij  = c_ij · (1 + |c_ij − c̄_ij| / max(c_ij, c̄_ij, ε))   (with the updated c̄_ij)

and the penalty at every step is ``λ · Σ_{i<j} w_ij · |cos_ij|`` with the weights of the last
*completed* window (zero before the first window completes). A step first feeds its tokens to the
tracker, then penalises, so a step that completes a window already uses the new weights.

Storage is sparse and upper-triangular throughout (pairs ``i < j`` keyed ``i·F + j``, sorted int64
keys + values in buffers), at every F: the running window counts hold only pairs that co-fired in
the window; ``c`` and ``w`` of the last window hold that window's pairs; ``c̄`` holds every pair that
ever co-fired (``α_ij = 0`` leaves absent pairs unchanged, so it only grows, up to ``F(F−1)/2``
entries). To bound it, entries with ``c̄_ij < prune_below`` (default 1e-6) are dropped at window
ends and read as 0 afterwards; for a pair seen again (``c_ij ≥ 1/W``) this changes ``w_ij`` by at most
``prune_below`` in absolute value (``w = 2c − c̄`` when ``c ≥ c̄``). A pair seen once in a window of
8192 tokens gets ``c̄ = 0.001/8192 ≈ 1.2e-7`` and is dropped; ``prune_below = 0`` keeps everything
(the exact rule). Merges are sorts of the keys, ``O(n log n)`` in the stored pairs, independent of F.

The penalty sum has one term per pair of the last window (≈ W·K²/2 of them). ``sample_pairs = 0``
evaluates all of them (:func:`~.pairs.pair_penalty_sorted`, ``O(P·d)``). Otherwise, when the window
has more pairs than ``sample_pairs = M``, ``M`` pairs are drawn with replacement with probability
``w_ij / Σw`` (inverse-CDF sampling with ``ctx.generator``) and the loss is
``λ · (Σw / M) · Σ_samples |cos|`` — an unbiased estimate of the same sum and gradient at ``O(M·d)``
cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...rundir.sae import SparseCodes
from .base import PenaltyContext, register
from .pairs import (
    SparseStatePenalty,
    group_keys,
    merge_sparse,
    occurrence_keys,
    pair_penalty,
    pair_penalty_sorted,
)


def stability_weights(c: Tensor, cbar: Tensor, eps: float) -> Tensor:
    """``w = c · (1 + |c − c̄| / max(c, c̄, ε))`` elementwise."""
    return c * (1 + (c - cbar).abs() / torch.maximum(torch.maximum(c, cbar), torch.full_like(c, eps)))


@register
class TemporalPenalty(SparseStatePenalty):
    """``λ · Σ_{i<j} w_ij |cos_ij|`` with stability weights from token windows (the log).

    Buffers (all persistent, size-varying ones re-allocated on load): ``win_keys``/``win_counts``
    (pairs and counts of the running window), ``win_tokens``, ``avg_keys``/``avg_vals`` (``c̄``),
    ``last_keys``/``last_c``/``last_w`` (``c`` and ``w`` of the last completed window),
    ``n_windows``.
    """

    name = "temporal"
    resizable = ("win_keys", "win_counts", "avg_keys", "avg_vals", "last_keys", "last_c", "last_w")

    @dataclass
    class Config:
        """Defaults: ``lambda_=1e-3`` (Σ_ij c_ij = co-firing pairs per token ≈ K(K−1)/2 = 496 at K = 32,
        so Σ w|cos| ≈ 496·(1 + stability)·mean|cos| ≈ 20–80 and the penalty starts at 0.02–0.08),
        ``window_tokens=8192`` (two 4096-token batches; the log used 1000), ``alpha_base=0.1`` and
        ``count_scale=1000.0`` (α_ij = min(0.1, count_ij/1000), the log), ``eps=1e-8`` (the log),
        ``sample_pairs=65536`` (importance-sampled pairs per step; 0 = exact sum over all pairs),
        ``prune_below=1e-6`` (drop ``c̄`` entries below it at window ends; 0 = keep all, exact)."""

        ranges = {"lambda_": ">=0", "window_tokens": ">=1", "alpha_base": "[0,1]", "count_scale": ">0", "eps": ">0",
                  "sample_pairs": ">=0", "prune_below": ">=0"}
        """Allowed values, checked by ``make_config`` (not a dataclass field: no annotation)."""

        lambda_: float = 1e-3
        window_tokens: int = 8192
        alpha_base: float = 0.1
        count_scale: float = 1000.0
        eps: float = 1e-8
        sample_pairs: int = 65536
        prune_below: float = 1e-6

    def __init__(self, d_sae: int, d_in: int, config: Any) -> None:
        super().__init__(d_sae, d_in, config)
        if config.window_tokens < 1:
            raise ValueError("temporal: window_tokens must be >= 1")
        lng, flt = {"dtype": torch.long}, {"dtype": torch.float32}
        self.register_buffer("win_keys", torch.zeros(0, **lng))
        self.register_buffer("win_counts", torch.zeros(0, **lng))
        self.register_buffer("win_tokens", torch.zeros((), **lng))
        self.register_buffer("avg_keys", torch.zeros(0, **lng))
        self.register_buffer("avg_vals", torch.zeros(0, **flt))
        self.register_buffer("last_keys", torch.zeros(0, **lng))
        self.register_buffer("last_c", torch.zeros(0, **flt))
        self.register_buffer("last_w", torch.zeros(0, **flt))
        self.register_buffer("n_windows", torch.zeros((), **lng))
        self._summary: tuple[tuple[int, int], dict[str, Any]] | None = None

    # -- tracker ------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, codes: SparseCodes) -> int:
        """Feed a batch's tokens to the tracker, closing windows at exact token boundaries.

        Returns the number of windows completed by this batch.
        """
        n, pos, closed = int(codes.idx.shape[0]), 0, 0
        W_tok = int(self.config.window_tokens)
        while pos < n:
            take = min(n - pos, W_tok - int(self.win_tokens))
            sub = SparseCodes(codes.vals[pos:pos + take].detach(), codes.idx[pos:pos + take])
            occ = occurrence_keys(sub, self.d_sae).to(self.win_keys.device)  # one sort per batch
            self.win_keys, self.win_counts = merge_sparse(self.win_keys, self.win_counts, occ,
                                                          torch.ones_like(occ), b_sorted=False)
            self.win_tokens += take
            pos += take
            if int(self.win_tokens) == W_tok:
                self._close_window()
                closed += 1
        return closed

    def _close_window(self) -> None:
        """Window end: ``c``, ``α``, the ``c̄`` update and ``w`` (before the reset), then reset.

        ``c̄`` and the window are merged by one grouping of their (sorted) keys: a pair present in
        ``c̄`` only keeps its value (``α = 0``), a pair of the window gets ``(1 − α)·c̄ + α·c`` with
        ``c̄ = 0`` if new. Afterwards ``c̄`` entries below ``prune_below`` are dropped.
        """
        cfg = self.config
        n_avg = self.avg_keys.numel()
        g = group_keys(torch.cat([self.avg_keys, self.win_keys]), runs=True)
        U, dev = g.keys.numel(), g.perm.device
        n_win = self.win_keys.numel()
        # each key occurs at most once per side: scatter both sides' values by group (no masks)
        avg_side = torch.cat([self.avg_vals.double(), torch.zeros(n_win, dtype=torch.float64, device=dev)])
        win_side = torch.cat([torch.zeros(n_avg, dtype=torch.float64, device=dev), self.win_counts.double()])
        old = torch.zeros(U, dtype=torch.float64, device=dev).index_add_(0, g.grp, avg_side[g.perm])
        counts = torch.zeros(U, dtype=torch.float64, device=dev).index_add_(0, g.grp, win_side[g.perm])
        c = counts / float(self.win_tokens)
        alpha = (counts / cfg.count_scale).clamp(max=cfg.alpha_base)
        new = (1 - alpha) * old + alpha * c
        in_win = counts > 0
        self.last_keys = g.keys[in_win]
        self.last_c = c[in_win].float()
        self.last_w = stability_weights(c[in_win], new[in_win], cfg.eps).float()
        keep = new > 0 if cfg.prune_below <= 0 else new >= cfg.prune_below
        self.avg_keys, self.avg_vals = g.keys[keep], new[keep].float()
        self.win_keys = self.win_keys.new_zeros(0)
        self.win_counts = self.win_counts.new_zeros(0)
        self.win_tokens.zero_()
        self.n_windows += 1
        self._summary = None

    @torch.no_grad()
    def _window_summary(self) -> dict[str, Any]:
        """What every step until the next window end reuses: the sampling CDF of ``w`` (float64, CPU),
        ``Σw``, mean ``w`` and mean stability. Derived from the buffers (never saved); recomputed
        after a window closes or a state dict is loaded."""
        key = (int(self.n_windows), int(self.last_keys.numel()))
        if self._summary is None or self._summary[0] != key:
            w = self.last_w
            stab = w / self.last_c.clamp_min(self.config.eps) - 1
            self._summary = (key, {"cdf": torch.cumsum(w.double().cpu(), 0), "total_w": float(w.double().sum()),
                                   "mean_w": float(w.mean()), "mean_stability": float(stab.mean())})
        return self._summary[1]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._summary = None
        super()._load_from_state_dict(*args, **kwargs)

    # -- penalty ------------------------------------------------------------------------------------
    def forward(self, ctx: PenaltyContext) -> tuple[Tensor, dict[str, float]]:
        W = ctx.W_dec
        cfg = self.config
        closed = self.update(ctx.codes)
        P = int(self.last_keys.numel())
        logs: dict[str, float] = {"weight": float(cfg.lambda_), "windows_closed": float(closed),
                                  "tracked_pairs": float(self.avg_keys.numel()),
                                  "window_pairs": float(self.win_keys.numel())}
        if P == 0:
            logs.update(penalty=0.0, pairs=0.0)
            return W.sum() * 0.0, logs
        w = self.last_w
        summary = self._window_summary()
        M = int(cfg.sample_pairs)
        if M <= 0 or P <= M:
            val, cos = pair_penalty_sorted(W, self.last_keys, cfg.lambda_ * w, 0.0, power=1)
        else:
            cdf = summary["cdf"]
            u = torch.rand(M, generator=ctx.generator, dtype=torch.float64) * cdf[-1]
            pick = torch.searchsorted(cdf, u, right=True).clamp_(max=P - 1).to(w.device)
            keys = self.last_keys[pick]
            val, cos = pair_penalty(W, keys // self.d_sae, keys % self.d_sae,
                                    cfg.lambda_ * summary["total_w"] / M, 0.0, power=1)
        logs.update(penalty=float(val.detach()), pairs=float(min(P, M) if M > 0 else P),
                    last_window_pairs=float(P), mean_w=summary["mean_w"],
                    mean_stability=summary["mean_stability"], mean_abs_cos=float(cos.abs().mean()))
        return val, logs

    @torch.no_grad()
    def diagnostics(self, W_dec: Tensor) -> dict[str, Any]:
        """Window statistics: pairs per window, stability distribution, stored state size."""
        out: dict[str, Any] = {
            "windows": int(self.n_windows), "tracked_pairs": int(self.avg_keys.numel()),
            "last_window_pairs": int(self.last_keys.numel()),
            "state_bytes": int(sum(b.numel() * b.element_size() for b in self.buffers())),
        }
        if self.last_keys.numel():
            stab = self.last_w / self.last_c.clamp_min(self.config.eps) - 1
            out.update(stability_mean=float(stab.mean()), stability_max=float(stab.max()),
                       frac_unstable=float((stab > 0.5).float().mean()),
                       c_sum=float(self.last_c.double().sum()))
        return out
