"""Feature-geometry evaluation: how (non-)orthogonal an SAE's dictionary is (SAEBench-style feature geometry:
max decoder cosine per latent, group condition numbers, pair stability).

Notation: ``d_i`` = unit decoder row i (``W_dec [d_sae, d_in]``), ``e_i`` = unit encoder column i
(``W_enc [d_in, d_sae]``), F = d_sae, ``cos_ij = d_i · d_j``.

Metrics (``eval_result_metrics``):

* ``decoder``: ``mean_max_cos`` / ``median_max_cos`` / ``max_max_cos`` of ``m_i = max_{j≠i} |cos_ij|``
  (the per-latent nearest-neighbour |cosine|; OrtSAE's "max cosine"); ``frac_pairs_above_0p5`` /
  ``_0p8`` = #{i<j : |cos_ij| > t} / (F(F−1)/2), exact (all pairs, in row chunks, strict ``>``);
  ``n_pairs_above_*`` the counts; ``frac_latents_max_cos_above_*`` = #{i : m_i > t} / F.
* ``encoder``: the same nearest-neighbour statistics for the encoder columns ``e_i``.
* ``groups``: κ_g = σ_max / σ_min of the decoder sub-matrix ``W_dec[g] [|g|, d_in]`` of each group
  g with ≥ ``min_group_size`` members (singular values of the unit rows; ``np.linalg.cond``).
  ``mean_kappa``/``median_kappa``/``max_kappa`` over groups with finite κ, ``n_singular_groups``
  those with σ_min ≤ 1e-6·σ_max. Groups: an axial spherical k-means of the decoder rows
  (:func:`cluster_groups`) with the same ``k`` for every run, so κ compares runs; the groups a run
  *learned* (``adaptive``), when it left them on disk (:func:`find_learned_groups`), are scored
  separately as ``learned_groups`` (``available`` 1/0, ``unstructured.learned_group_source``).
* ``stability``: pair-selection stability of ``topk_pairs`` — the Jaccard overlap of kept-pair
  sets between consecutive logged steps, read from ``metrics.jsonl`` (the first key containing
  ``jaccard``): ``mean_jaccard``, ``final_jaccard``, ``min_jaccard``; None when never logged.
* ``density``: ``frac_dead`` (density 0), ``frac_dense`` (> 0.1), ``median_log10_density`` of
  alive latents, from ``eval_results/core.json`` details when present, else by encoding a sample
  of store rows (:func:`sae.latents.scan_store`); None when neither is available.

``eval_result_details``: one dict per latent (``index``, ``max_decoder_cos``, ``nearest_decoder``,
``max_encoder_cos``, ``group``, ``feature_density``). Histograms (``max_decoder_cos``,
``max_encoder_cos`` over [0, 1]; ``log10_density`` with a dead count), per-group sizes and κ, the
Jaccard series and the last logged ``penalty/*`` values are in ``eval_result_unstructured``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..latents import DENSITY_EDGES, CosineStats, pairwise_cosine_stats
from ..rundir.format import PENALTY_STATE_FILE
from ..rundir.metrics import jaccard_series, read_metrics
from ..rundir.sae import SAE
from ..rundir.state import penalty_buffers
from .registry import EvalContext, EvalOutput

EVAL_TYPE_ID = "geometry"
NEEDS_MODEL = False
"""Decoder/encoder geometry only: ``sae evaluate --eval geometry`` loads no language model."""
SINGULAR_RTOL = 1e-6

__all__ = ["EVAL_TYPE_ID", "Config", "CosineStats", "available", "cluster_groups", "compute_geometry",
           "condition_numbers", "density_histogram", "find_learned_groups", "jaccard_series",
           "pairwise_cosine_stats", "run"]


@dataclass
class Config:
    """Settings of the geometry evaluation (recorded as ``eval_config``)."""

    thresholds: tuple[float, ...] = (0.5, 0.8)
    """|cos| thresholds of the pair fractions (strict ``>``)."""
    chunk_size: int = 1024
    """Rows per block of the pairwise cosine pass (memory ``chunk_size · d_sae`` floats)."""
    hist_bins: int = 50
    """Bins of the max-cosine histograms over [0, 1]."""
    groups: str = "auto"
    """auto: clustered κ plus learned-group κ when the run left groups; cluster: clustered only; none: skip κ."""
    n_groups: int | None = None
    """Clusters (the same for every run); None → ⌈d_sae / 32⌉."""
    min_group_size: int = 2
    """Groups smaller than this get no κ (a single unit row has κ = 1)."""
    cluster_iters: int = 25
    seed: int = 0
    density_tokens: int = 16384
    """Store rows encoded for densities when the run has no core result."""
    ranges = {"chunk_size": ">=1", "hist_bins": ">=1", "min_group_size": ">=2", "cluster_iters": ">=1",
              "seed": ">=0", "density_tokens": ">=0", "n_groups": ">=1", "thresholds": "[0,1]"}


@torch.no_grad()
def condition_numbers(W_dec: torch.Tensor, groups: torch.Tensor, min_group_size: int = 2
                      ) -> list[dict[str, Any]]:
    """κ = σ_max/σ_min of ``W_dec[g]`` for each group id ``g ≥ 0`` of ``groups [d_sae]`` (−1 = no group).

    Rows are normalised first (decoder rows are unit-norm in training). σ² are the eigenvalues of the
    smaller Gram matrix (``AAᵀ`` or ``AᵀA``, float64; ~10× faster than an SVD of the wide block and
    accurate for κ ≪ 1e8, beyond which the group counts as singular). Returns one dict per group
    with ≥ ``min_group_size`` members: ``group``, ``size``, ``kappa`` (``inf`` when σ_min ≤
    1e-6·σ_max), ``sigma_max``, ``sigma_min``. Same as ``np.linalg.cond(W_dec[g])`` (2-norm).
    """
    W = W_dec.detach().double().cpu()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = []
    for g in torch.unique(groups[groups >= 0]).tolist():
        members = torch.nonzero(groups == g).flatten()
        if len(members) < min_group_size:
            continue
        A = W[members]
        gram = A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A    # the smaller Gram matrix
        lam = torch.linalg.eigvalsh(gram).clamp_min(0.0)           # ascending σ²
        smax, smin = math.sqrt(float(lam[-1])), math.sqrt(float(lam[0]))
        kappa = smax / smin if smin > SINGULAR_RTOL * smax else math.inf
        out.append({"group": int(g), "size": len(members), "kappa": kappa, "sigma_max": smax, "sigma_min": smin})
    return out


@torch.no_grad()
def cluster_groups(W_dec: torch.Tensor, n_groups: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Axial spherical k-means of the decoder rows → group ids ``[d_sae]`` in ``0..n_groups−1``.

    Similarity is |cos| (a row and its negation span the same direction): each row joins the
    centroid c_k maximising |d_i · c_k|, and c_k ← normalise(Σ_i sign(d_i · c_k) d_i). Initial
    centroids: k-means++ seeding (:func:`_axial_kmeans_pp`, seeded); an emptied cluster is re-seeded
    with the row worst served by its centroid. Stops when assignments no longer change.
    """
    W = W_dec.detach().float().cpu()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = W.shape[0]
    k = max(1, min(n_groups, n))
    C = _axial_kmeans_pp(W, k, torch.Generator().manual_seed(seed))
    assign = torch.full((n,), -1, dtype=torch.int64)
    for _ in range(max(iters, 1)):
        S = W @ C.T                                         # [n, k]
        best = S.abs().argmax(dim=1)
        sign = torch.sign(S.gather(1, best[:, None]))[:, 0]
        sign[sign == 0] = 1.0
        if torch.equal(best, assign):
            break
        assign = best
        C = torch.zeros_like(C).index_add_(0, assign, W * sign[:, None])
        sizes = torch.bincount(assign, minlength=k)
        fit = S.abs().gather(1, assign[:, None])[:, 0]
        for empty in torch.nonzero(sizes == 0).flatten().tolist():
            worst = int(fit.argmin())
            C[empty] = W[worst]
            fit[worst] = math.inf
        C = C / C.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return assign


def _axial_kmeans_pp(U: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) on unit rows ``U [n, d]`` with the axial
    distance 1 − |cos|: the first centroid uniformly, each next one with probability ∝ its distance
    to the nearest chosen centroid. Returns ``[k, d]``."""
    n = U.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    C = [U[first]]
    dist = (1.0 - (U @ U[first]).abs()).clamp_min(0.0)
    for _ in range(1, k):
        total = float(dist.sum())
        j = int(torch.multinomial(dist / total, 1, generator=generator)) if total > 0 else \
            int(torch.randint(n, (1,), generator=generator))
        C.append(U[j])
        dist = torch.minimum(dist, (1.0 - (U @ U[j]).abs()).clamp_min(0.0))
    return torch.stack(C).clone()


# -- reading what training left behind -----------------------------------------------------------
def _as_groups(value: Any, d_sae: int) -> torch.Tensor | None:
    """A per-latent integer group id vector ``[d_sae]`` from a list/array/tensor, or a list of member lists."""
    try:
        if isinstance(value, dict):
            for k, v in value.items():
                if "group" in str(k).lower():
                    got = _as_groups(v, d_sae)
                    if got is not None:
                        return got
            return None
        if isinstance(value, list) and value and all(isinstance(m, list) for m in value):
            out = torch.full((d_sae,), -1, dtype=torch.int64)
            for gi, members in enumerate(value):
                out[torch.as_tensor(members, dtype=torch.int64)] = gi
            return out
        t = torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, IndexError, RuntimeError):
        return None
    if t.ndim != 1 or t.numel() != d_sae or t.dtype == torch.bool:
        return None
    if t.is_floating_point() and not bool((t == t.round()).all()):
        return None
    return t.to(torch.int64)


def find_learned_groups(run_dir: str | Path | None, d_sae: int) -> tuple[torch.Tensor | None, str]:
    """Group assignment ``[d_sae]`` an ``adaptive`` run left on disk, and where it came from.

    Looked for, in order: files in ``run_dir`` whose name contains ``group`` (``.json`` — a list of
    ids, a list of member lists, or a dict with a ``group*`` key —, ``.safetensors``, ``.pt``,
    ``.npy``); a ``*group*`` tensor in ``penalty_state.safetensors`` (the final penalty buffers
    that ``sae train`` saves); ``checkpoint.pt`` (a ``penalty.*group*`` buffer of the trainer state; only present for
    unfinished runs); the last ``metrics.jsonl`` record with a ``penalty/*group*`` list of length
    d_sae. Returns ``(None, reason)`` when none is found.
    """
    if run_dir is None:
        return None, "no run directory"
    run_dir = Path(run_dir)
    for path in sorted(run_dir.glob("*group*")):
        groups = _load_group_file(path, d_sae)
        if groups is not None:
            return groups, f"learned ({path.name})"
    buffers, source = penalty_buffers(run_dir)
    for k, v in buffers.items():
        if "group" in k.lower() and "size" not in k.lower():
            groups = _as_groups(v, d_sae)
            if groups is not None:
                name = k if source == PENALTY_STATE_FILE else f"penalty.{k}"
                return groups, f"learned ({source} {name})"
    records = read_metrics(run_dir)
    if records:
        rec = records[-1]
        for k, v in rec.items():
            if (k.startswith("penalty/") and "group" in k.lower() and "size" not in k.lower()
                    and isinstance(v, list) and len(v) == d_sae):
                groups = _as_groups(v, d_sae)
                if groups is not None:
                    return groups, f"learned (metrics.jsonl {k}, step {rec.get('step')})"
    return None, "no learned group assignment in the run directory"


def _load_group_file(path: Path, d_sae: int) -> torch.Tensor | None:
    """Group ids ``[d_sae]`` from one file (json / safetensors / pt / npy), or None."""
    try:
        if path.suffix == ".json":
            return _as_groups(json.loads(path.read_text()), d_sae)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return _as_groups(load_file(str(path)), d_sae)
        if path.suffix == ".pt":
            return _as_groups(torch.load(path, map_location="cpu", weights_only=True), d_sae)
        if path.suffix == ".npy":
            return _as_groups(np.load(path), d_sae)
    except Exception:  # noqa: BLE001 - unreadable or foreign file: not a group assignment
        return None
    return None


def _read_records(run_dir: Path | None) -> list[dict[str, Any]]:
    return [] if run_dir is None else read_metrics(run_dir)


def _core_density(run_dir: Path | None, d_sae: int) -> torch.Tensor | None:
    """Per-latent ``feature_density [d_sae]`` from ``run_dir/eval_results/core.json``, or None."""
    if run_dir is None:
        return None
    from ..rundir.results import feature_densities, read_result

    try:
        dens = feature_densities(read_result(run_dir, "core"))
    except (FileNotFoundError, ValueError, KeyError):
        return None
    return torch.tensor(dens, dtype=torch.float64) if len(dens) == d_sae else None


def density_histogram(density: torch.Tensor) -> dict[str, Any]:
    """Histogram of log10 firing rates of alive latents over :data:`DENSITY_EDGES` (clipped into range),
    plus ``n_dead`` (rate 0)."""
    d = density.double().cpu().numpy()
    alive = d[d > 0]
    lo, hi = DENSITY_EDGES[0], DENSITY_EDGES[-1]
    counts, _ = np.histogram(np.clip(np.log10(alive), lo, hi), bins=np.asarray(DENSITY_EDGES))
    return {"log10_edges": list(DENSITY_EDGES), "counts": counts.tolist(), "n_dead": int((d == 0).sum())}


def _hist01(values: torch.Tensor, bins: int) -> dict[str, Any]:
    counts, edges = np.histogram(values.cpu().numpy(), bins=bins, range=(0.0, 1.0))
    return {"edges": np.round(edges, 6).tolist(), "counts": counts.tolist()}


def _tag(t: float) -> str:
    """0.5 → '0p5' (metric names must not contain dots: tables flatten ``category.metric``)."""
    return f"{t:g}".replace(".", "p")


def _stats(x: torch.Tensor) -> dict[str, float]:
    return {"mean": float(x.mean()), "median": float(x.median()), "max": float(x.max())} if x.numel() else {}


def _group_metrics(W_dec: torch.Tensor, groups: torch.Tensor | None, min_group_size: int) -> dict[str, Any]:
    """κ statistics of ``W_dec``'s rows grouped by ``groups [d_sae]`` (all None without groups)."""
    kappas = condition_numbers(W_dec, groups, min_group_size) if groups is not None else []
    finite = torch.tensor([g["kappa"] for g in kappas if math.isfinite(g["kappa"])], dtype=torch.float64)
    ks = _stats(finite)
    sizes = [g["size"] for g in kappas]
    return {
        "n_groups": int(torch.unique(groups[groups >= 0]).numel()) if groups is not None else None,
        "n_groups_scored": len(kappas) if groups is not None else None,
        "mean_group_size": float(np.mean(sizes)) if sizes else None,
        "mean_kappa": ks.get("mean"), "median_kappa": ks.get("median"), "max_kappa": ks.get("max"),
        "n_singular_groups": sum(1 for g in kappas if not math.isfinite(g["kappa"])) if groups is not None else None,
    }


# -- the evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def compute_geometry(sae: SAE, run_dir: str | Path | None = None, store: str | Path | None = None,
                     cfg: Config | None = None, results_dir: str | Path | None = None) -> EvalOutput:
    """All geometry metrics of ``sae`` (see the module doc); needs no model.

    ``run_dir`` (for learned groups, ``metrics.jsonl`` and ``core.json``) and ``store`` (densities
    when there is no core result; default: the run's ``cfg.json`` ``store_path`` if it exists) are
    optional: what they feed is None without them.
    """
    cfg = cfg or Config()
    run_dir = Path(run_dir) if run_dir is not None else None
    W_dec = sae.W_dec.detach().float().cpu()
    W_enc = sae.W_enc.detach().float().cpu()
    F = W_dec.shape[0]
    dec = pairwise_cosine_stats(W_dec, cfg.thresholds, cfg.chunk_size)
    enc = pairwise_cosine_stats(W_enc.T, cfg.thresholds, cfg.chunk_size)
    metrics: dict[str, dict[str, Any]] = {}
    for name, st in (("decoder", dec), ("encoder", enc)):
        s = _stats(st.max_abs_cos)
        cat = {"mean_max_cos": s.get("mean"), "median_max_cos": s.get("median"), "max_max_cos": s.get("max")}
        for t in cfg.thresholds:
            cat[f"frac_pairs_above_{_tag(t)}"] = st.pairs_above[t] / st.n_pairs if st.n_pairs else None
            cat[f"n_pairs_above_{_tag(t)}"] = st.pairs_above[t]
            cat[f"frac_latents_max_cos_above_{_tag(t)}"] = float((st.max_abs_cos > t).double().mean())
        metrics[name] = cat

    # groups and condition numbers: one k-means grouping with the same k for every run (comparable
    # κ), and — separately labelled — the groups a run learned (adaptive), when it left them
    groups: torch.Tensor | None = None
    learned: torch.Tensor | None = None
    learned_source = "not looked for (groups='cluster' or 'none')"
    if cfg.groups == "none":
        source = "skipped (groups='none')"
    else:
        n_groups = cfg.n_groups or math.ceil(F / 32)
        groups = cluster_groups(W_dec, n_groups, cfg.cluster_iters, cfg.seed)
        source = (f"clustered: axial spherical k-means of decoder rows into {n_groups} groups (the same k for "
                  f"every run: k = {'Config.n_groups' if cfg.n_groups else 'ceil(d_sae / 32)'})")
        if cfg.groups == "auto":
            learned, learned_source = find_learned_groups(run_dir, F)
    metrics["groups"] = _group_metrics(W_dec, groups, cfg.min_group_size)
    metrics["learned_groups"] = {"available": int(learned is not None),
                                 **_group_metrics(W_dec, learned, cfg.min_group_size)}

    # pair-selection stability
    records = _read_records(run_dir)
    jac = jaccard_series(records)
    metrics["stability"] = {"mean_jaccard": jac["mean"] if jac else None,
                            "final_jaccard": jac["final"] if jac else None,
                            "min_jaccard": jac["min"] if jac else None}

    # densities
    density = _core_density(Path(results_dir) if results_dir is not None else run_dir, F)
    density_source = "eval_results/core.json" if density is not None else None
    store = store or sae.cfg.get("store_path")
    if density is None and store is not None and Path(str(store)).exists():
        from ..latents import scan_store

        try:
            scan = scan_store(sae, store, n_tokens=cfg.density_tokens, top_n=1)
            density, density_source = scan.density, f"{scan.n_rows} rows of store {store}"
        except ValueError as e:  # StoreError (a ValueError): wrong hook/width, incomplete store
            density_source = f"unavailable: {e}"
    if density is not None:
        alive = density[density > 0]
        metrics["density"] = {"frac_dead": float((density == 0).double().mean()),
                              "frac_dense": float((density > 0.1).double().mean()),
                              "median_log10_density": float(alive.log10().median()) if alive.numel() else None}
    else:
        metrics["density"] = {"frac_dead": None, "frac_dense": None, "median_log10_density": None}

    details = [{"index": i, "max_decoder_cos": float(dec.max_abs_cos[i]), "nearest_decoder": int(dec.nearest[i]),
                "max_encoder_cos": float(enc.max_abs_cos[i]),
                "group": int(groups[i]) if groups is not None else None,
                "learned_group": int(learned[i]) if learned is not None else None,
                "feature_density": float(density[i]) if density is not None else None} for i in range(F)]
    last = records[-1] if records else {}
    unstructured = {
        "run_dir": str(run_dir) if run_dir is not None else None,
        "group_source": source,
        "learned_group_source": learned_source,
        "density_source": density_source,
        "histograms": {
            "max_decoder_cos": _hist01(dec.max_abs_cos, cfg.hist_bins),
            "max_encoder_cos": _hist01(enc.max_abs_cos, cfg.hist_bins),
            "log10_density": density_histogram(density) if density is not None else None,
        },
        "group_condition_numbers": condition_numbers(W_dec, groups, cfg.min_group_size) if groups is not None else [],
        "learned_group_condition_numbers": (condition_numbers(W_dec, learned, cfg.min_group_size)
                                            if learned is not None else []),
        "jaccard": jac,
        "final_penalty_logs": {k: v for k, v in last.items() if k.startswith("penalty/")
                               and (not isinstance(v, list) or len(v) <= 256)},
    }
    eval_config = {**asdict(cfg), "thresholds": list(cfg.thresholds)}
    return EvalOutput(metrics=metrics, details=details, eval_config=eval_config, unstructured=unstructured)


def available(ctx: EvalContext) -> str | None:
    """Always runnable: every metric needs only the weights (the rest degrades to None)."""
    return None


def run(sae: SAE, ctx: EvalContext, cfg: Config) -> EvalOutput:
    """The registry entry point: :func:`compute_geometry` with the context's run directory and store."""
    return compute_geometry(sae, run_dir=ctx.run_dir, store=ctx.store_path, cfg=cfg, results_dir=ctx.results_dir)
