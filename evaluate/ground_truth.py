"""Ground-truth feature recovery on a synthetic store (``sae store synth``): SynthSAEBench's metrics
(Chanin & Garriga-Alonso, arXiv 2602.14687) plus ground-truth absorption.

Notation: ``W_dec [d_sae, d_in]`` the SAE's decoder rows, ``D [F, d_in]`` the true feature vectors,
``C_ij = |cos(W_dec_i, D_j)|``; on held-out samples ``x [n, d_in]`` with true feature activations
``a [n, F]`` (``a_j > 0``: feature j is active), the SAE's codes ``f [n, d_sae]`` and reconstruction
``x̂``. The samples are drawn fresh from the store's generator (its held-out stream, never written
into the store, see :mod:`sae.synth.store`), so no SAE trained on them.

Metrics (``eval_result_metrics``), with SAELens' definitions (``sae_lens/synthetic/evals.py``,
``eval_sae_on_synthetic_data``; ``tests/test_ground_truth.py`` checks agreement to 1e-4):

* ``recovery.mcc`` — mean ``C_ij`` over the one-to-one matching of latents to features that
  maximises it (Hungarian, ``scipy.optimize.linear_sum_assignment``; min(d_sae, F) pairs);
  arXiv 2505.20254.
* ``recovery.uniqueness`` — #distinct ``argmax_j C_ij`` over latents / d_sae.
* ``classification.precision/recall/f1_score/accuracy`` — each latent i is a detector of its
  best-matching feature ``j(i) = argmax_j C_ij``: fired = ``f_i ≠ 0``, truth = ``a_j(i) > 0``;
  precision = TP/(TP+FP), recall = TP/(TP+FN), F1 their harmonic mean (each 0 when undefined),
  accuracy = (TP+TN)/n; the mean over *all* latents (dead ones score 0).
* ``reconstruction.explained_variance`` = 1 − Σ‖x − x̂‖² / (Σ‖x‖² − n‖x̄‖²) (SAELens' streaming
  R²: total variance about the sample mean); ``reconstruction.shrinkage`` = mean ‖x̂‖/‖x‖ over
  samples with ‖x‖ > 1e-6.
* ``sparsity.sae_l0`` = mean #{i : f_i ≠ 0}; ``sparsity.true_l0`` = mean #{j : a_j ≠ 0};
  ``sparsity.dead_latents`` = #latents with f_i = 0 on every sample (a count, as SAELens reports).
* ``absorption`` (ours; no proxy gives it). Match features to latents by the MCC assignment,
  keeping pairs with ``C ≥ match_threshold`` (default 0.5): ``m(j)``, the latent of feature j, if
  any. For every parent p of the hierarchy with a latent, an *event* is a sample where p is
  active together with one of its children c that has a latent (children of a SynthSAEBench
  parent are mutually exclusive: at most one is active). The event is *absorbed* when the
  parent's latent is silent and the child's latent fires: ``f_m(p) = 0`` and ``f_m(c) ≠ 0`` — the
  child's latent has taken over the parent's direction, the failure Chanin et al. call feature
  absorption (arXiv 2409.14507), measured here against the true features instead of a probe.
  ``absorption_rate`` = Σ absorbed / Σ events over all parents (pooled); ``mean_parent_absorption``
  = the mean of the per-parent rates over parents with ≥ ``min_events`` events;
  ``parent_silent_rate`` = the fraction of events with the parent's latent silent whatever the
  child's does (absorption is the part of it where the child's latent fires); ``n_parents`` =
  parents scored; ``n_events``.

Intervals: 95 % percentile bootstrap over the held-out samples, resampling blocks of
``bootstrap_block`` i.i.d. samples (``n_bootstrap`` resamples), for every sample-based metric;
``mcc`` and ``uniqueness`` depend on the decoder only and have none. ``eval_result_details``: one
dict per latent (``index``, ``feature``, ``cos``, ``precision``, ``recall``, ``f1``, ``fires``) and,
under ``unstructured.absorption_by_parent``, each scored parent's events and rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..rundir.sae import SAE
from .registry import EvalContext, EvalOutput

EVAL_TYPE_ID = "ground_truth"
NEEDS_MODEL = False
"""Synthetic stores carry their own generator: no language model loads."""
MIN_INPUT_NORM = 1e-6


@dataclass
class Config:
    """Settings of the ground-truth evaluation (recorded as ``eval_config``)."""

    n_samples: int = 100_000
    """Held-out samples (SAELens' default for ``eval_sae_on_synthetic_data``)."""
    batch_size: int = 4096
    """Samples encoded at once."""
    match_threshold: float = 0.5
    """|cos| a feature's matched latent needs for the absorption metric."""
    min_events: int = 20
    """Parent events a parent needs to enter ``mean_parent_absorption``."""
    n_bootstrap: int = 1000
    bootstrap_block: int = 1000
    """Samples per bootstrap block (blocks are resampled with replacement)."""
    seed: int = 0
    """Seed of the bootstrap resampling (the samples come from the store's held-out stream)."""
    ranges = {"n_samples": ">=1", "batch_size": ">=1", "match_threshold": "[0,1]", "min_events": ">=1",
              "n_bootstrap": ">=0", "bootstrap_block": ">=1", "seed": ">=0"}


def available(ctx: EvalContext) -> str | None:
    """``None`` for a synthetic store, else why not."""
    if ctx.store_path is None:
        return "needs --store SYNTHETIC_STORE (written by `sae store synth`)"
    from ..store import ActivationStore
    from ..synth.store import is_synthetic

    if not is_synthetic(ActivationStore(ctx.store_path).attrs):
        return f"{ctx.store_path} has no ground truth (not written by `sae store synth`)"
    return None


# -- decoder-only metrics ------------------------------------------------------------------------
def abs_cos(W_dec: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``C [d_sae, F]`` = |cos| between decoder rows and true features (float32)."""
    a = torch.nn.functional.normalize(W_dec.detach().float(), dim=1)
    b = torch.nn.functional.normalize(features.detach().float(), dim=1)
    return (a @ b.T).abs()


def hungarian(C: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The one-to-one matching (latents, features) maximising Σ C (``linear_sum_assignment``)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(1.0 - C.double().numpy())
    return rows, cols


# -- per-block statistics ------------------------------------------------------------------------
@dataclass
class _Blocks:
    """Per-block sums from which every sample-based metric (and each bootstrap resample) follows."""

    n: list[int]
    tp: list[np.ndarray]
    fp: list[np.ndarray]
    fn: list[np.ndarray]
    fired: list[np.ndarray]
    sae_l0: list[float]
    true_l0: list[float]
    shrink_sum: list[float]
    shrink_n: list[int]
    sum_x: list[np.ndarray]
    sum_sq: list[float]
    sum_res: list[float]
    events: list[np.ndarray]
    absorbed: list[np.ndarray]
    silent: list[np.ndarray]

    @classmethod
    def empty(cls) -> _Blocks:
        return cls(*([] for _ in range(15)))


def parent_pairs(hierarchy: dict | None) -> list[tuple[int, list[int]]]:
    """``(parent feature, [child features])`` for every node with children, from ``Hierarchy.to_dict()``."""
    out: list[tuple[int, list[int]]] = []

    def walk(node: dict) -> None:
        kids = node.get("children") or []
        if kids and node.get("feature_index") is not None:
            out.append((int(node["feature_index"]), [int(k["feature_index"]) for k in kids
                                                     if k.get("feature_index") is not None]))
        for k in kids:
            walk(k)

    for root in (hierarchy or {}).get("roots", []):
        walk(root)
    return out


@torch.no_grad()
def block_stats(sae: SAE, x: torch.Tensor, a: torch.Tensor, best: torch.Tensor, parents: list[int],
                pairs: tuple[np.ndarray, np.ndarray, np.ndarray], latent_of: np.ndarray, blocks: _Blocks) -> None:
    """Add one block's sums: ``x [b, d_in]`` samples, ``a [b, F]`` (dense) true activations,
    ``best [d_sae]`` each latent's best feature, ``latent_of [F]`` the matched latent (−1: none),
    ``pairs`` = (index into ``parents``, parent feature, child feature) of every scored pair."""
    f = sae.encode(x)
    x_hat = sae.decode(f)
    fires = f != 0
    truth = a[:, best] > 0
    blocks.n.append(len(x))
    blocks.tp.append((fires & truth).sum(0).numpy())
    blocks.fp.append((fires & ~truth).sum(0).numpy())
    blocks.fn.append((~fires & truth).sum(0).numpy())
    blocks.fired.append(fires.any(0).numpy())
    blocks.sae_l0.append(float(fires.sum()))
    blocks.true_l0.append(float((a != 0).sum()))
    xd, xh = x.double(), x_hat.double()
    norms = xd.norm(dim=1)
    ok = norms > MIN_INPUT_NORM
    blocks.shrink_sum.append(float((xh.norm(dim=1)[ok] / norms[ok]).sum()))
    blocks.shrink_n.append(int(ok.sum()))
    blocks.sum_x.append(xd.sum(0).numpy())
    blocks.sum_sq.append(float((xd * xd).sum()))
    blocks.sum_res.append(float(((xd - xh) ** 2).sum()))
    # every (parent, child) pair at once: pair_parent[k] indexes ``parents``; P/Cf features; Lp/Lc latents
    pair_parent, P, Cf = pairs
    event = (a[:, P] > 0) & (a[:, Cf] > 0)
    parent_off = ~fires[:, latent_of[P]]
    ev, ab, si = (np.zeros(len(parents), dtype=np.int64) for _ in range(3))
    np.add.at(ev, pair_parent, event.sum(0).numpy())
    np.add.at(si, pair_parent, (event & parent_off).sum(0).numpy())
    np.add.at(ab, pair_parent, (event & parent_off & fires[:, latent_of[Cf]]).sum(0).numpy())
    blocks.events.append(ev)
    blocks.absorbed.append(ab)
    blocks.silent.append(si)


def metrics_from(blocks: _Blocks, weights: np.ndarray, min_events: int) -> dict[str, float]:
    """Every sample-based metric from block sums weighted by ``weights [n_blocks]`` (all ones: the
    estimate; multinomial counts: one bootstrap resample)."""
    w = weights.astype(np.float64)

    def tot(xs: list) -> Any:
        return np.tensordot(w, np.asarray(xs, dtype=np.float64), axes=1)

    n = tot(blocks.n)
    tp, fp, fn = tot(blocks.tp), tot(blocks.fp), tot(blocks.fn)
    tn = n - tp - fp - fn
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        rec = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
    fired = np.tensordot(w, np.asarray(blocks.fired, dtype=np.float64), axes=1) > 0
    mean_x = tot(blocks.sum_x) / n
    total_var = tot(blocks.sum_sq) / n - float(mean_x @ mean_x)
    mse = tot(blocks.sum_res) / n
    ev_ = (1.0 if mse < 1e-10 else 0.0) if total_var < 1e-10 else 1.0 - mse / total_var
    events, absorbed, silent = tot(blocks.events), tot(blocks.absorbed), tot(blocks.silent)
    scored = events >= min_events
    with np.errstate(divide="ignore", invalid="ignore"):
        per_parent = absorbed[scored] / events[scored]
    return {
        "precision": float(prec.mean()), "recall": float(rec.mean()), "f1_score": float(f1.mean()),
        "accuracy": float(((tp + tn) / max(n, 1e-8)).mean()),
        "explained_variance": float(ev_),
        "shrinkage": float(tot(blocks.shrink_sum) / max(tot(blocks.shrink_n), 1)),
        "sae_l0": float(tot(blocks.sae_l0) / n), "true_l0": float(tot(blocks.true_l0) / n),
        "dead_latents": float((~fired).sum()),
        "absorption_rate": float(absorbed.sum() / events.sum()) if events.sum() > 0 else float("nan"),
        "mean_parent_absorption": float(per_parent.mean()) if len(per_parent) else float("nan"),
        "parent_silent_rate": float(silent.sum() / events.sum()) if events.sum() > 0 else float("nan"),
    }


SECTIONS = {
    "classification": ("precision", "recall", "f1_score", "accuracy"),
    "reconstruction": ("explained_variance", "shrinkage"),
    "sparsity": ("sae_l0", "true_l0", "dead_latents"),
    "absorption": ("absorption_rate", "mean_parent_absorption", "parent_silent_rate"),
}


@torch.no_grad()
def evaluate_samples(sae: SAE, features: torch.Tensor, samples: list[tuple[torch.Tensor, torch.Tensor]],
                     hierarchy: dict | None, cfg: Config) -> EvalOutput:
    """The evaluation on given samples: ``features [F, d_in]`` the true dictionary, ``samples`` blocks
    of ``(x [b, d_in], a [b, F])`` (``a`` dense or sparse COO), ``hierarchy`` as ``Hierarchy.to_dict()``."""
    sae = sae.float().cpu().eval()
    C = abs_cos(sae.W_dec.detach(), features)
    best = C.argmax(dim=1)
    rows, cols = hungarian(C)
    matched_cos = C[rows, cols]
    mcc = float(matched_cos.mean())
    uniqueness = len(best.unique()) / C.shape[0]
    latent_of = np.full(features.shape[0], -1, dtype=np.int64)
    keep = matched_cos.numpy() >= cfg.match_threshold
    latent_of[cols[keep]] = rows[keep]
    pairs = [(p, [c for c in kids if latent_of[c] >= 0]) for p, kids in parent_pairs(hierarchy) if latent_of[p] >= 0]
    pairs = [(p, kids) for p, kids in pairs if kids]
    parents, children = [p for p, _ in pairs], [k for _, k in pairs]
    flat = [(k, p, c) for k, (p, kids) in enumerate(pairs) for c in kids]
    pair_arrays = (np.asarray([t[0] for t in flat], dtype=np.int64), np.asarray([t[1] for t in flat], dtype=np.int64),
                   np.asarray([t[2] for t in flat], dtype=np.int64))
    blocks = _Blocks.empty()
    for x, a in _rechunk(samples, cfg.bootstrap_block):
        for s in range(0, len(x), cfg.batch_size):  # a block larger than a batch: one block, several batches
            part = _Blocks.empty()
            block_stats(sae, x[s:s + cfg.batch_size], a[s:s + cfg.batch_size], best, parents, pair_arrays,
                        latent_of, part)
            _merge_into(blocks, part, new_block=s == 0)
    n_blocks = len(blocks.n)
    est = metrics_from(blocks, np.ones(n_blocks), cfg.min_events)
    rng = np.random.default_rng(cfg.seed)
    boots = [metrics_from(blocks, rng.multinomial(n_blocks, np.full(n_blocks, 1 / n_blocks)), cfg.min_events)
             for _ in range(cfg.n_bootstrap if n_blocks > 1 else 0)]
    metrics: dict[str, dict[str, Any]] = {"recovery": {"mcc": mcc, "uniqueness": uniqueness}}
    for section, names in SECTIONS.items():
        metrics[section] = {}
        for m in names:
            metrics[section][m] = est[m]
            vals = np.array([b[m] for b in boots], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            if len(vals):
                lo, hi = np.percentile(vals, [2.5, 97.5])
                metrics[section][f"{m}_ci"] = [float(lo), float(hi)]
    metrics["sparsity"]["dead_latents"] = int(est["dead_latents"])
    events = np.asarray(blocks.events).sum(0) if blocks.events else np.zeros(0)
    absorbed = np.asarray(blocks.absorbed).sum(0) if blocks.absorbed else np.zeros(0)
    metrics["absorption"].update(n_parents=int((events >= cfg.min_events).sum()), n_events=int(events.sum()),
                                 n_matched_features=int(keep.sum()))
    details = _details(blocks, C, best, est)
    return EvalOutput(
        metrics=metrics, details=details, eval_config=asdict(cfg),
        unstructured={"absorption_by_parent": [
            {"parent": p, "children": kids, "events": int(e), "absorbed": int(b),
             "rate": float(b / e) if e else None}
            for p, kids, e, b in zip(parents, children, events, absorbed, strict=True)],
            "n_samples": int(sum(blocks.n)), "n_blocks": n_blocks,
            "confidence_intervals": {"level": 0.95, "method": "percentile bootstrap over blocks of held-out samples",
                                     "n_bootstrap": cfg.n_bootstrap, "block": cfg.bootstrap_block}})


def _rechunk(samples: list[tuple[torch.Tensor, torch.Tensor]], size: int):
    """Blocks of exactly ``size`` rows (the last may be shorter) from differently sized pieces; ``a`` dense."""
    buf_x: list[torch.Tensor] = []
    buf_a: list[torch.Tensor] = []
    have = 0
    for x, a in samples:
        a = a.to_dense() if a.is_sparse else a
        buf_x.append(x)
        buf_a.append(a)
        have += len(x)
        while have >= size:
            X, A = torch.cat(buf_x), torch.cat(buf_a)
            yield X[:size], A[:size]
            buf_x, buf_a, have = [X[size:]], [A[size:]], have - size
    if have:
        yield torch.cat(buf_x), torch.cat(buf_a)


def _merge_into(blocks: _Blocks, part: _Blocks, new_block: bool) -> None:
    for name in blocks.__dataclass_fields__:
        src, dst = getattr(part, name), getattr(blocks, name)
        if new_block:
            dst.extend(src)
        else:
            dst[-1] = dst[-1] + src[0] if name != "fired" else (dst[-1] | src[0])


def _details(blocks: _Blocks, C: torch.Tensor, best: torch.Tensor, est: dict) -> list[dict[str, Any]]:
    tp, fp, fn = (np.asarray(getattr(blocks, k)).sum(0) for k in ("tp", "fp", "fn"))
    fires = tp + fp
    out = []
    for i in range(C.shape[0]):
        p = tp[i] / (tp[i] + fp[i]) if tp[i] + fp[i] else 0.0
        r = tp[i] / (tp[i] + fn[i]) if tp[i] + fn[i] else 0.0
        out.append({"index": i, "feature": int(best[i]), "cos": float(C[i, best[i]]), "precision": float(p),
                    "recall": float(r), "f1": float(2 * p * r / (p + r)) if p + r else 0.0, "fires": int(fires[i])})
    return out


Samples = list[tuple[torch.Tensor, torch.Tensor]]


def heldout_samples(ctx: EvalContext, cfg: Config) -> tuple[torch.Tensor, Samples, dict]:
    """``(features [F, d_in], [(x, a sparse)], hierarchy)`` of the store's held-out stream, computed once
    per store and sample count for every SAE of one ``sae evaluate`` call."""
    from ..store import ActivationStore
    from ..synth.store import load_synthetic_model, sample_heldout

    store = ActivationStore(str(ctx.store_path))
    meta = store.attrs["synthetic"]

    def make() -> tuple[torch.Tensor, Samples, dict]:
        model = load_synthetic_model(store)
        pieces = sample_heldout(model, cfg.n_samples, int(meta["sample_seed"]))
        return model.feature_dict.feature_vectors.detach().float().cpu(), pieces, meta.get("hierarchy")

    return ctx.cached(("ground_truth", store.content_digest, meta.get("ground_truth_sha256"), cfg.n_samples), make)


def run(sae: SAE, ctx: EvalContext, cfg: Config) -> EvalOutput:
    """Score ``sae`` against the ground truth of the synthetic store ``ctx.store_path`` (module doc)."""
    features, samples, hierarchy = heldout_samples(ctx, cfg)
    if features.shape[1] != sae.W_dec.shape[1]:
        from ..errors import ConfigError

        raise ConfigError(f"the SAE has d_in {sae.W_dec.shape[1]}, the synthetic store's features "
                          f"{features.shape[1]}: evaluate it on the store it was trained on")
    out = evaluate_samples(sae, features, samples, hierarchy, cfg)
    out.unstructured["run_dir"] = str(ctx.run_dir)
    return out
