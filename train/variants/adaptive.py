"""``adaptive``: orthogonality with controlled sharing inside co-activation groups.

From the research logs ``001_78720f72b251669d.txt`` and ``003_178e35e7e8e06692.txt``: every ``G`` steps cluster the
latents into groups from accumulated co-activation and penalise ``Σ max(0, |cos_ij| − α·[g_i = g_j])²`` — pairs in one
group may share up to ``α`` of cosine ("controlled sharing"; sweep α ∈ {0.01, 0.05, 0.1, 0.5}). Report the
condition numbers ``κ = σ_max/σ_min`` of each group's decoder sub-matrix (:meth:`diagnostics`).

What is computed: an unbiased estimate of the penalty's sum over all ``N = F(F−1)/2`` pairs,
divided by the constant ``N`` (so λ weighs the mean pair, as for ``static_ortho``; the gradient
direction is exactly that of the sum — use ``λ_Σ = λ/N`` to compare with an un-normalised Σ).
With ``h_ij = max(0, |cos_ij| − α·[g_i = g_j])²``, ``cos_ij = d_i·d_j``:

    L = λ/N · Ŝ,     E[Ŝ] = S = Σ_{i<j} h_ij = Σ_{(i,j) ∈ P} h_ij + Σ_{(i,j) ∉ P} h_ij

* ``P``: the unique pairs that co-fire in at least one token of the batch (fixed by the batch,
  not by the random draws). Their part is summed **exactly** (:func:`~.pairs.cofiring_penalty`,
  ``O(B·K²·d)``) — or, when there are more than ``M = cofire_samples > 0`` of them, estimated as
  ``|P| · mean`` of ``M`` pairs drawn uniformly with replacement (unbiased), ``O(M·d)``.
* the rest: a uniformly random subset ``R`` of ``c = chunk_size`` latents (``randperm(F,
  ctx.generator)``) contains any given pair with probability ``π = c(c−1)/(F(F−1))``; the pairs of
  ``R`` that are *not* in ``P`` are summed with weight ``1/π`` (Horvitz–Thompson: unbiased, and
  exact when ``c ≥ F``), ``O(c²·d)``.

The co-firing pairs are therefore counted once, with the same weight as every other pair (the
previous version added a *mean* over co-firing pairs to a mean over all pairs, giving each
co-firing pair ~13× the weight at F = 5 120). Tested: the estimate's expectation and its
gradient's expectation over many seeds match a dense float64 Σ (``tests/test_variants.py``).

Groups (buffer ``group [F]``, the id of a latent's group = its smallest member; initially every
latent alone). Every step adds the batch's co-firing pair counts to a bounded accumulator (at most
``track_pairs_per_latent · F`` pairs: after each merge only the highest counts are kept, ties to the
smaller key — a deterministic heavy-hitter sketch). The refresh period is
``G' = min(G, max(1, total_steps // 10))`` (at least ten refreshes per run); the first refresh
happens at step ``G'``, after a warm-up of ``G'`` batches (groups from a random-init SAE are
noise), then at every step with ``step % G' == 0``, *after* adding that step's batch: the groups
are rebuilt greedily (single linkage with a
size cap): pairs in decreasing count order, ties by key, whose count is at least
``min_coactivation ×`` the tokens accumulated, join their two groups unless the union would exceed
``max_group_size``. The accumulator then resets, so each refresh uses the ``G`` batches since the
last one. The penalty of a refresh step uses the new groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import PenaltyContext, register
from .pairs import SparseStatePenalty, cofiring_pairs, cofiring_penalty, merge_sparse, pair_penalty


def top_pairs(keys: Tensor, counts: Tensor, d_sae: int, cap: int) -> tuple[Tensor, Tensor]:
    """The ``cap`` entries with the largest count (ties: smaller key), re-sorted by key."""
    if keys.numel() <= cap:
        return keys, counts
    space = d_sae * d_sae
    comp = counts.long() * space + (space - 1 - keys)  # unique, so topk has no ties
    sel = torch.topk(comp, cap, sorted=False).indices
    sel = sel[torch.argsort(keys[sel])]
    return keys[sel], counts[sel]


def greedy_groups(d_sae: int, keys: Tensor, counts: Tensor, min_count: float, max_size: int) -> Tensor:
    """Size-capped single-linkage groups from pair counts; ``[F]`` long group ids (smallest member).

    Pairs are visited in decreasing count (ties: increasing key ``i·F + j``); a pair with
    ``count ≥ min_count`` merges its two groups when the merged size is ``≤ max_size``.
    """
    parent = np.arange(d_sae)
    size = np.ones(d_sae, dtype=np.int64)
    if keys.numel():
        k = keys.cpu().numpy()
        c = counts.cpu().numpy()
        order = np.lexsort((k, -c))

        def find(x: int) -> int:
            root = x
            while parent[root] != root:
                root = parent[root]
            while parent[x] != root:
                parent[x], x = root, parent[x]
            return root

        for n in order:
            if c[n] < min_count:
                break
            ri, rj = find(int(k[n] // d_sae)), find(int(k[n] % d_sae))
            if ri == rj or size[ri] + size[rj] > max_size:
                continue
            lo, hi = min(ri, rj), max(ri, rj)
            parent[hi] = lo
            size[lo] += size[hi]
        for x in range(d_sae):
            parent[x] = find(x)
    return torch.from_numpy(parent.astype(np.int64))


def group_condition_numbers(W: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(group ids, sizes, κ)`` for every group with ≥ 2 members; ``κ = σ_max/σ_min`` of ``W[members]``.

    ``W`` ``[F, d]``; singular values in float64 (batched over groups of equal size).
    """
    g = group.cpu()
    ids, sizes = torch.unique(g, return_counts=True)
    multi = sizes >= 2
    ids, sizes = ids[multi], sizes[multi]
    kappa = torch.empty(ids.numel(), dtype=torch.float64)
    Wd = W.detach().double().cpu()
    order = torch.argsort(g, stable=True)
    starts = torch.searchsorted(g[order], ids)
    for s in torch.unique(sizes).tolist():
        which = (sizes == s).nonzero().squeeze(1)
        members = order[starts[which, None] + torch.arange(s)]
        sv = torch.linalg.svdvals(Wd[members])
        kappa[which] = sv[:, 0] / sv[:, -1]
    return ids, sizes, kappa


@register
class AdaptivePenalty(SparseStatePenalty):
    """``λ/N · Ŝ`` with ``E[Ŝ] = Σ_{i<j} max(0, |cos_ij| − α·[same group])²`` (module docstring)."""

    name = "adaptive"
    resizable = ("acc_keys", "acc_counts")

    @dataclass
    class Config:
        """Defaults: ``lambda_=10.0`` (the mean pair ``h`` starts near ``cos² ≈ 1/d_in`` ≈ 0.002 at
        random init, so L starts ≈ 0.02), ``alpha=0.1`` (sweep 0.01/0.05/0.1/0.5),
        ``refresh_every=100`` (G, log ``001_78720f72b251669d.txt``; capped at total_steps // 10), ``chunk_size=1024``,
        ``max_group_size=32``,
        ``min_coactivation=1e-3`` (a pair links its groups if it co-fired on ≥ 0.1 % of the tokens since
        the last refresh), ``track_pairs_per_latent=8`` (accumulator capacity 8·F pairs),
        ``cofire_samples=65536`` (pairs sampled for the co-firing sum; 0 = all co-firing pairs)."""

        ranges = {"lambda_": ">=0", "alpha": "[0,1]", "refresh_every": ">=1", "chunk_size": ">=2",
                  "max_group_size": ">=1", "min_coactivation": "[0,1]", "track_pairs_per_latent": ">=1",
                  "cofire_samples": ">=0"}
        """Allowed values, checked by ``make_config`` (not a dataclass field: no annotation)."""

        lambda_: float = 10.0
        alpha: float = 0.1
        refresh_every: int = 100
        chunk_size: int = 1024
        max_group_size: int = 32
        min_coactivation: float = 1e-3
        track_pairs_per_latent: int = 8
        cofire_samples: int = 65536

    def __init__(self, d_sae: int, d_in: int, config: Any) -> None:
        super().__init__(d_sae, d_in, config)
        if config.refresh_every < 1:
            raise ValueError("adaptive: refresh_every must be >= 1")
        self.register_buffer("group", torch.arange(d_sae, dtype=torch.long))
        self.register_buffer("acc_keys", torch.zeros(0, dtype=torch.long))
        self.register_buffer("acc_counts", torch.zeros(0, dtype=torch.long))
        self.register_buffer("acc_tokens", torch.zeros((), dtype=torch.long))
        self.register_buffer("n_refreshes", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_refresh_step", torch.full((), -1, dtype=torch.long))

    @torch.no_grad()
    def refresh(self, step: int) -> None:
        """Rebuild ``group`` from the accumulator, then reset the accumulator."""
        cfg = self.config
        min_count = max(cfg.min_coactivation * float(self.acc_tokens), 1.0)
        group = greedy_groups(self.d_sae, self.acc_keys, self.acc_counts, min_count, cfg.max_group_size)
        self.group.copy_(group.to(self.group.device))
        self.acc_keys = self.acc_keys.new_zeros(0)
        self.acc_counts = self.acc_counts.new_zeros(0)
        self.acc_tokens.zero_()
        self.n_refreshes += 1
        self.last_refresh_step.fill_(step)

    def refresh_period(self, total_steps: int) -> int:
        """``G' = min(G, max(1, total_steps // 10))``."""
        return max(1, min(self.config.refresh_every, max(1, total_steps // 10)))

    def forward(self, ctx: PenaltyContext) -> tuple[Tensor, dict[str, float]]:
        W = ctx.W_dec
        cfg = self.config
        F = self.d_sae
        n_all = F * (F - 1) / 2
        cof = cofiring_pairs(ctx.codes, F)
        G = self.refresh_period(ctx.total_steps)
        with torch.no_grad():
            keys, counts = merge_sparse(self.acc_keys, self.acc_counts, cof.keys, cof.counts)
            self.acc_keys, self.acc_counts = top_pairs(keys, counts, F, cfg.track_pairs_per_latent * F)
            self.acc_tokens += cof.n_tokens
            refreshed = ctx.step > 0 and ctx.step % G == 0
            if refreshed:
                self.refresh(ctx.step)
        group = self.group
        # co-firing pairs P: exact sum (or |P| · mean of M uniform draws), each pair weight 1/N
        M = cfg.cofire_samples
        if cof.n_pairs and (M <= 0 or cof.n_pairs <= M):
            same = (group[cof.i] == group[cof.j]).to(W.dtype)
            weight = torch.full((cof.n_pairs,), 1.0 / n_all, device=W.device, dtype=W.dtype)
            cofire, _, _ = cofiring_penalty(W, cof, weight, cfg.alpha * same, power=2)
            same_frac = float(same.mean())
        elif cof.n_pairs:
            pick = torch.randint(cof.n_pairs, (M,), generator=ctx.generator).to(W.device)
            i, j = cof.i[pick], cof.j[pick]
            same = (group[i] == group[j]).to(W.dtype)
            cofire, _ = pair_penalty(W, i, j, cof.n_pairs / (M * n_all), cfg.alpha * same, power=2)
            same_frac = float(same.mean())
        else:
            cofire, same_frac = W.sum() * 0.0, 0.0
        # every other pair: a random c-subset holds a pair with probability π; weight 1/(π·N)
        c = min(cfg.chunk_size, F)
        sub = torch.randperm(F, generator=ctx.generator)[:c].to(W.device)
        n_rest = 0
        if c >= 2:
            a, b = torch.triu_indices(c, c, 1, device=W.device)
            lo, hi = torch.minimum(sub[a], sub[b]), torch.maximum(sub[a], sub[b])
            rest = ~torch.isin(lo * F + hi, cof.keys.to(W.device))
            a, b = a[rest], b[rest]
            n_rest = int(a.numel())
            Wc = W[sub]
            cos = (Wc @ Wc.T)[a, b]  # one [c, c] Gram matrix, never [pairs, d] gathers
            tau = cfg.alpha * (group[sub[a]] == group[sub[b]]).to(W.dtype)
            pi = c * (c - 1) / (F * (F - 1))
            chunk = (cos.abs() - tau).clamp_min(0).square().sum() / (pi * n_all)
        else:
            chunk = W.sum() * 0.0
        val = cfg.lambda_ * (cofire + chunk)
        logs = {
            "penalty": float(val.detach()), "weight": float(cfg.lambda_),
            "pairs": float(min(cof.n_pairs, M if M > 0 else cof.n_pairs) + n_rest),
            "cofiring_pairs": float(cof.n_pairs),
            "cofire_term": float(cofire.detach()), "chunk_term": float(chunk.detach()),
            "same_group_frac": same_frac, "refreshed": float(refreshed), "refresh_period": float(G),
            "grouped_latents": float((torch.bincount(group, minlength=F)[group] > 1).float().mean()),
        }
        return val, logs

    @torch.no_grad()
    def diagnostics(self, W_dec: Tensor) -> dict[str, Any]:
        """Per-group condition numbers ``κ = σ_max/σ_min`` of ``W_dec[group]`` and group sizes."""
        ids, sizes, kappa = group_condition_numbers(W_dec, self.group)
        out: dict[str, Any] = {"n_groups": int(ids.numel()), "refreshes": int(self.n_refreshes),
                               "last_refresh_step": int(self.last_refresh_step)}
        if ids.numel():
            sz = sizes.double()
            out.update(group_size_mean=float(sz.mean()), group_size_max=int(sizes.max()),
                       kappa_mean=float(kappa.mean()), kappa_median=float(kappa.median()),
                       kappa_max=float(kappa.max()))
        return out
