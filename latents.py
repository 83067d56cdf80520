"""Per-latent statistics of an SAE shared by the evaluations and the report: firing densities and
top-activating store rows (one pass of store rows through the encoder, no model forward), and
exact all-pairs decoder cosine statistics. Not an evaluation: ``evaluate.geometry`` reports these as
metrics, ``report.browser`` shows the contexts.

Store rows are raw activation units, which is what saved SAEs expect (training folds its
normalisation into the weights). Special rows (BOS/EOS/PAD) are never candidates: their residuals
have a huge norm and the SAE never saw them in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .rundir.sae import SAE
from .store import ActivationStore

DENSITY_EDGES = tuple(np.round(np.linspace(-7.0, 0.0, 29), 6).tolist())
"""log10 firing-rate bin edges of the density histogram (0.25 decades; rates below 1e-7 go to the first bin)."""


@dataclass
class CosineStats:
    """Nearest-neighbour |cosine| statistics of a set of vectors (see :func:`pairwise_cosine_stats`).

    ``max_abs_cos [n]``: ``max_{j≠i} |cos_ij|``; ``nearest [n]``: the argmax j;
    ``pairs_above``: ``{t: #{i<j : |cos_ij| > t}}``; ``n_pairs`` = n(n−1)/2.
    """

    max_abs_cos: torch.Tensor
    nearest: torch.Tensor
    pairs_above: dict[float, int] = field(default_factory=dict)
    n_pairs: int = 0


@torch.no_grad()
def pairwise_cosine_stats(W: torch.Tensor, thresholds: tuple[float, ...] = (0.5, 0.8), chunk_size: int = 1024
                          ) -> CosineStats:
    """Exact all-pairs |cosine| statistics of the rows of ``W [n, d]``, in blocks of ``chunk_size`` rows.

    Rows are normalised (zero rows stay zero, |cos| 0). Block ``[s, e)``: ``|Ŵ[s:e] Ŵᵀ|``
    ``[e−s, n]`` with its diagonal zeroed gives the row maxima; pairs are counted on the upper
    triangle (j > i) only, so each unordered pair is counted once. Cost O(n²d) flops, O(chunk·n) memory.
    """
    Wf = W.detach().float()
    n = Wf.shape[0]
    U = Wf / Wf.norm(dim=1, keepdim=True).clamp_min(1e-12)
    max_cos = torch.zeros(n)
    nearest = torch.zeros(n, dtype=torch.int64)
    counts = dict.fromkeys(thresholds, 0)
    cols = torch.arange(n, device=U.device)
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        block = (U[s:e] @ U.T).abs()
        rows = torch.arange(s, e, device=U.device)
        block[rows - s, rows] = 0.0
        if n > 1:
            v, j = block.max(dim=1)
            max_cos[s:e], nearest[s:e] = v.cpu(), j.cpu()
        upper = cols[None, :] > rows[:, None]
        for t in thresholds:
            counts[t] += int(((block > t) & upper).sum())
    return CosineStats(max_abs_cos=max_cos, nearest=nearest, pairs_above=counts, n_pairs=n * (n - 1) // 2)


@dataclass
class StoreScan:
    """What one pass of store rows through an SAE gives (see :func:`scan_store`).

    Attributes:
        hook_name: the store array read. n_rows: non-special rows encoded (N).
        density: ``[d_sae]`` float64, fraction of the N rows with ``f_i > 0``.
        top_vals: ``[d_sae, top_n]`` float32, largest activations per latent, descending (0 = none).
        top_rows: ``[d_sae, top_n]`` int64, their global store rows (−1 = none).
        ranges: the ``[start, stop)`` row ranges read.
    """

    hook_name: str
    n_rows: int
    density: torch.Tensor
    top_vals: torch.Tensor
    top_rows: torch.Tensor
    ranges: list[tuple[int, int]] = field(default_factory=list)


def sample_ranges(store: ActivationStore, n_tokens: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` totalling ≤ ``n_tokens`` rows, spread evenly over the store.

    Ranges start at chunk boundaries (each decoded chunk is read once) and hold whole chunks except
    possibly the last one; ``n_tokens ≥ store.n_tokens`` → the whole store.
    """
    n, c = store.n_tokens, store.chunk_tokens
    if n_tokens >= n:
        return [(s, min(s + c, n)) for s in range(0, n, c)]
    n_chunks = math.ceil(n / c)
    want = max(1, math.ceil(n_tokens / c))
    picks = sorted({int(i) for i in np.linspace(0, n_chunks - 1, want).round()})
    out, left = [], n_tokens
    for i in picks:
        if left <= 0:
            break
        s = i * c
        e = min(s + c, n, s + left)
        out.append((s, e))
        left -= e - s
    return out


@torch.no_grad()
def scan_store(sae: SAE, store: ActivationStore | str | Path, hook_name: str | None = None, n_tokens: int = 16384,
               top_n: int = 8, batch_size: int = 1024) -> StoreScan:
    """Encode ≈``n_tokens`` store rows; return per-latent densities and top-``top_n`` rows.

    ``hook_name`` defaults to the SAE's ``cfg["hook_name"]`` (else the store's only hook). Per
    batch of rows ``x [b, d_in]``: dense codes ``f [b, d_sae]`` (:meth:`SAE.encode`), special rows
    zeroed, firing counts added, and the batch's per-latent top rows merged into the running top
    lists (``[d_sae, top_n]``). Memory: ``O(batch_size · d_sae)``.

    Raises:
        StoreError: the hook is not in the store. ValueError: the store's width is not ``sae.d_in``.
    """
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    hook = store.default_hook(hook_name or sae.cfg.get("hook_name"))
    if store.d_model != sae.d_in:
        raise ValueError(f"store {store.path} has d_model {store.d_model} but the SAE has d_in {sae.d_in}")
    dev = sae.W_enc.device
    F = sae.d_sae
    fire = torch.zeros(F, dtype=torch.float64)
    top_vals = torch.zeros(F, top_n)
    top_rows = torch.full((F, top_n), -1, dtype=torch.int64)
    ranges = sample_ranges(store, n_tokens)
    n_rows = 0
    for start, stop in ranges:
        x_all = store.read_rows(hook, start, stop)
        valid_all = torch.from_numpy(store.valid_mask(store.tokens[start:stop]))
        for s in range(0, stop - start, batch_size):
            x = x_all[s:s + batch_size].to(dev, torch.float32)
            valid = valid_all[s:s + batch_size]
            f = sae.encode(x).float().cpu()
            f[~valid] = 0.0
            n_rows += int(valid.sum())
            fire += (f > 0).sum(0).double()
            k = min(top_n, f.shape[0])
            bv, bi = f.topk(k, dim=0)                                   # [k, F]
            rows = bi.T + (start + s)                                   # [F, k] global rows
            vals = torch.cat([top_vals, bv.T], dim=1)
            cand = torch.cat([top_rows, rows], dim=1)
            top_vals, j = vals.topk(top_n, dim=1)
            top_rows = cand.gather(1, j)
    top_rows[top_vals <= 0] = -1
    top_vals[top_vals <= 0] = 0.0
    density = fire / max(n_rows, 1)
    return StoreScan(hook_name=hook, n_rows=n_rows, density=density, top_vals=top_vals, top_rows=top_rows,
                     ranges=ranges)


def select_latents(density: torch.Tensor, max_cos: torch.Tensor | None = None, n: int = 12
                   ) -> list[tuple[int, str]]:
    """Pick ≈``n`` alive latents to browse: ``(latent, reason)`` pairs, no repeats.

    A third each (rounded up) of: the highest-density latents ("high density"), those closest to the
    median density of alive latents ("mid density"), and those with the largest maximum decoder
    |cos| ("max cos", when ``max_cos [d_sae]`` is given; else more mid-density ones). Dead latents
    (density 0) have no contexts and are never picked.
    """
    alive = torch.nonzero(density > 0).flatten()
    if len(alive) == 0 or n <= 0:
        return []
    per = math.ceil(n / 3) if max_cos is not None else math.ceil(n / 2)
    chosen: list[tuple[int, str]] = []
    seen: set[int] = set()

    def take(order: torch.Tensor, reason: str, k: int) -> None:
        got = 0
        for i in order.tolist():
            if got >= k or len(chosen) >= n:
                break
            if i not in seen:
                seen.add(i)
                chosen.append((int(i), reason))
                got += 1

    d = density[alive]
    take(alive[torch.argsort(d, descending=True, stable=True)], "high density", per)
    log_d = d.log10()
    med = log_d.median()
    take(alive[torch.argsort((log_d - med).abs(), stable=True)], "mid density", per)
    if max_cos is not None:
        take(alive[torch.argsort(max_cos[alive], descending=True, stable=True)], "max cos", n - len(chosen))
    take(alive[torch.argsort((log_d - med).abs(), stable=True)], "mid density", n - len(chosen))
    return chosen

