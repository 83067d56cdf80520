"""Spurious correlation removal (SAEBench ``scr``; Karvonen et al. 2024, "Evaluating Sparse
Autoencoders on Targeted Concept Erasure Tasks", after Marks et al.'s SHIFT).

Data (:func:`sae.evaluate.datasets.tasks.confounded_dataset`, pairs :data:`sae.evaluate.datasets.tasks.SCR_PAIRS`):
two real binary attributes per pair — A = play genre comedies/histories with B = verse/prose form
of the speech, and A = code package email/asyncio with B = "holds a comment or docstring"
(SAEBench: A = a pair of professions, B = gender; or Amazon categories × rating). With
``q = size // 4`` per quadrant three sets are built on each side (train, test; document-disjoint):

* *biased* — (A⁺B⁺) vs (A⁻B⁻), ``2q`` each: A and B perfectly confounded;
* *A* — A⁺ vs A⁻ with B balanced (SAEBench "professor / nurse");
* *B* — B⁺ vs B⁻ with A balanced (SAEBench "male / female").

Per pair, on mean-pooled LLM activations (:mod:`sae.evaluate.probing`), probes ``P_biased``,
``P_A``, ``P_B`` are trained on the train sets. Clean test accuracies: ``acc(P_A, A)`` and
``acc(P_B, B)`` (the "oracles"), ``acc(P_biased, A)`` and ``acc(P_biased, B)``.

Latent ranking: ``effect_i = |Δ_i · (W_dec[i] · w)|`` with ``w`` the raw-space weight of ``P_B``
(direction 1) or ``P_A`` (direction 2) and ``Δ_i`` the class-mean difference of pooled latent i on
that probe's training set — for a linear probe this is exactly how much zero-ablating latent i
shrinks the probe's mean logit gap. The top-N latents (N ∈ ``n_values``, capped at ``d_sae``; only
latents with a non-zero effect) are zero-ablated keeping the SAE error, ``x' = x − Σ_S f_i W_dec[i]``
per token, applied to the pooled activations (identical by linearity), and ``P_biased`` is re-tested:

* ``scr_dir1_threshold_N`` = (acc(P_biased, A | B-latents ablated) − acc(P_biased, A)) /
  (acc(P_A, A) − acc(P_biased, A)) — removing B should move the biased probe toward the A oracle;
* ``scr_dir2_threshold_N`` = the same with A and B swapped (A-latents ablated, tested on B);
* ``scr_metric_threshold_N`` = dir1 when acc(P_biased, A) ≤ acc(P_biased, B) (the biased probe
  relies more on B, so B is the spurious signal), else dir2 (SAEBench ``get_scr_plotting_dict``,
  which leaves ties undefined).

A ratio whose denominator is 0 is NaN (null in the JSON); a small denominator (the biased probe
already close to the oracle, typical of the direction *not* selected) gives large magnitudes, as in
SAEBench. ``eval_result_metrics["scr_metrics"]``
holds the mean of each metric over the pairs with a finite value; ``eval_result_details`` one row
per pair (``dataset_name``, the metrics, clean accuracies, quadrant sizes);
``eval_result_unstructured`` the ablated accuracies and the top-ranked latents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..rundir.sae import SAE
from .datasets import tasks as T
from .probing import (
    LinearProbe,
    PooledTexts,
    ProbeSettings,
    ablate_pooled,
    corpus_unavailable_reason,
    fit_probe,
    latent_effects,
    pooled_texts,
    select_top_n,
)
from .registry import EvalContext, EvalOutput

EVAL_TYPE_ID = "scr"
N_VALUES = (2, 5, 10, 20, 50, 100, 500)

__all__ = ["EVAL_TYPE_ID", "N_VALUES", "Config", "available", "run", "scr_pair"]


@dataclass
class Config(ProbeSettings):
    """Settings of the SCR evaluation (recorded as ``eval_config``)."""

    pairs: tuple[tuple[T.Attribute, T.Attribute], ...] = T.SCR_PAIRS
    """(A, B) pairs, each attribute ``(label, positive value, negative value)``; A⁺ goes with B⁺ in the
    biased set."""
    train_set_size: int = 300
    """Probe training set size (4 quadrants of ``size // 4``; SAEBench: 4000)."""
    test_set_size: int = 100
    """SAEBench: 1000."""
    n_values: tuple[int, ...] = N_VALUES
    top_latents_reported: int = 20
    """How many top-ranked latents per direction go to ``eval_result_unstructured``."""
    n_bootstrap: int = 1000
    """Bootstrap resamples of each pair's test examples for the 95 % intervals (0: none)."""
    ranges = {**ProbeSettings.ranges, "train_set_size": ">=8", "test_set_size": ">=4", "n_values": ">=1",
              "top_latents_reported": ">=0", "n_bootstrap": ">=0"}


def available(ctx: EvalContext, cfg: Config | None = None) -> str | None:
    """None when the embedded corpus can be read."""
    return corpus_unavailable_reason()


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


@dataclass
class _Sets:
    """Pooled inputs of the three SCR sets on both sides: ``x`` LLM ``[n, d_model]``, ``f`` SAE codes."""

    x: dict[tuple[str, str], np.ndarray]
    f: dict[tuple[str, str], np.ndarray]
    y: dict[tuple[str, str], np.ndarray]


def _sets(ds: T.ConfoundedDataset, pooled: PooledTexts) -> _Sets:
    x, f, y = {}, {}, {}
    for which in ("a", "b", "biased"):
        for side in ("train", "test"):
            snips, labels = ds.binary(which, side)
            texts = [s.text for s in snips]
            x[which, side], f[which, side] = pooled.llm_of(texts), pooled.sae_of(texts)
            y[which, side] = np.asarray(labels)
    return _Sets(x, f, y)


def scr_pair(x: dict[tuple[str, str], np.ndarray], f: dict[tuple[str, str], np.ndarray],
             y: dict[tuple[str, str], np.ndarray], w_dec: np.ndarray, n_values: tuple[int, ...], C: float = 1.0,
             max_iter: int = 1000, standardize: bool = True, seed: int = 0, top_reported: int = 20
             ) -> tuple[dict[str, float], dict]:
    """SCR metrics of one attribute pair from pooled inputs (module doc).

    ``x[(set, side)] [n, d_model]`` pooled LLM activations, ``f[(set, side)] [n, d_sae]`` pooled SAE
    codes and ``y[(set, side)] [n]`` labels for set ∈ {a, b, biased}, side ∈ {train, test};
    ``w_dec [d_sae, d_model]``. Returns ``(metrics, extra)``: ``scr_dir1/dir2/metric_threshold_N``
    (N as given, the ablation capped at ``d_sae``) and clean/ablated accuracies, rankings.
    """
    probes: dict[str, LinearProbe] = {w: fit_probe(x[w, "train"], y[w, "train"], C, max_iter, standardize, seed)
                                      for w in ("a", "b", "biased")}
    clean = {
        "acc_a_probe_on_a": probes["a"].accuracy(x["a", "test"], y["a", "test"]),
        "acc_b_probe_on_b": probes["b"].accuracy(x["b", "test"], y["b", "test"]),
        "acc_biased_probe_on_a": probes["biased"].accuracy(x["a", "test"], y["a", "test"]),
        "acc_biased_probe_on_b": probes["biased"].accuracy(x["b", "test"], y["b", "test"]),
    }
    # dir 1: rank by the B probe, ablate, test the biased probe on A data; dir 2 the other way round
    plan = {1: ("b", "a"), 2: ("a", "b")}
    d_sae = w_dec.shape[0]
    metrics: dict[str, float] = {}
    ablated: dict[str, dict[str, float]] = {}
    ranked: dict[str, list[int]] = {}
    use_dir = 1 if clean["acc_biased_probe_on_a"] <= clean["acc_biased_probe_on_b"] else 2
    hits: dict[str, np.ndarray] = {}  # per test example: correct (1) or not, for the paired bootstrap
    for d, (ranked_by, eval_set) in plan.items():
        effects = latent_effects(f[ranked_by, "train"], y[ranked_by, "train"], probes[ranked_by], w_dec, "scr")
        ranked[f"dir{d}"] = [int(i) for i in select_top_n(effects, top_reported)]
        original = clean[f"acc_biased_probe_on_{eval_set}"]
        oracle = clean[f"acc_{eval_set}_probe_on_{eval_set}"]
        yt = np.asarray(y[eval_set, "test"])
        hits[f"dir{d}_original"] = (probes["biased"].predict(x[eval_set, "test"]) == yt).astype(np.float64)
        hits[f"dir{d}_oracle"] = (probes[eval_set].predict(x[eval_set, "test"]) == yt).astype(np.float64)
        ablated[f"dir{d}"] = {}
        for n in n_values:
            latents = select_top_n(effects, min(n, d_sae))
            xa = ablate_pooled(x[eval_set, "test"], f[eval_set, "test"], w_dec, latents)
            changed = probes["biased"].accuracy(xa, y[eval_set, "test"])
            hits[f"dir{d}_{n}"] = (probes["biased"].predict(xa) == yt).astype(np.float64)
            ablated[f"dir{d}"][str(n)] = changed
            metrics[f"scr_dir{d}_threshold_{n}"] = _ratio(changed - original, oracle - original)
    ordered: dict[str, float] = {}
    for n in n_values:
        ordered[f"scr_dir1_threshold_{n}"] = metrics[f"scr_dir1_threshold_{n}"]
        ordered[f"scr_metric_threshold_{n}"] = metrics[f"scr_dir{use_dir}_threshold_{n}"]
        ordered[f"scr_dir2_threshold_{n}"] = metrics[f"scr_dir2_threshold_{n}"]
    extra = {"clean_accuracies": clean, "metric_direction": use_dir, "ablated_accuracies": ablated,
             "top_latents": ranked, "_hits": hits}
    return ordered, extra


def scr_bootstrap_ci(pairs: list[tuple[int, dict[str, np.ndarray]]], n_values: Sequence[int], n_boot: int,
                     seed: int) -> dict[str, float]:
    """95 % percentile intervals of the pair-mean ``scr_metric_threshold_N``: each pair's test examples are
    resampled with replacement (paired: the same draw scores the original, oracle and ablated probes),
    the metric recomputed per pair and averaged over pairs (pairs with an undefined metric skipped)."""
    if n_boot <= 0 or not pairs:
        return {}
    rng = np.random.default_rng(seed)
    sums = {n: np.zeros(n_boot) for n in n_values}
    counts = {n: np.zeros(n_boot) for n in n_values}
    for use_dir, hits in pairs:
        orig, oracle = hits[f"dir{use_dir}_original"], hits[f"dir{use_dir}_oracle"]
        draw = rng.integers(0, len(orig), (n_boot, len(orig)))
        o, best = orig[draw].mean(1), oracle[draw].mean(1)
        for n in n_values:
            changed = hits[f"dir{use_dir}_{n}"][draw].mean(1)
            with np.errstate(divide="ignore", invalid="ignore"):
                v = (changed - o) / (best - o)
            ok = np.isfinite(v)
            sums[n][ok] += v[ok]
            counts[n][ok] += 1
    out = {}
    for n in n_values:
        vals = sums[n][counts[n] > 0] / counts[n][counts[n] > 0]
        if len(vals):
            out[f"scr_metric_threshold_{n}_ci_low"] = float(np.percentile(vals, 2.5))
            out[f"scr_metric_threshold_{n}_ci_high"] = float(np.percentile(vals, 97.5))
    return out


def _finite_mean(values: list[float]) -> float:
    ok = [v for v in values if math.isfinite(v)]
    return float(np.mean(ok)) if ok else math.nan


def run(sae: SAE, ctx: EvalContext, cfg: Config) -> EvalOutput:
    """SCR of ``sae`` on every configured attribute pair (module doc)."""
    sae = sae.to(ctx.model.device)
    datasets = [T.confounded_dataset(tuple(a), tuple(b), cfg.train_set_size,  # type: ignore[arg-type]
                                     cfg.test_set_size, cfg.seed, cfg.test_fraction, cfg.min_chars, cfg.max_chars,
                                     cfg.split_by)
                for a, b in cfg.pairs]
    texts = [s.text for ds in datasets for quad in (ds.train, ds.test) for v in quad.values() for s in v]
    pooled = pooled_texts(ctx, sae, texts, cfg.context_length, cfg.llm_batch_size, cfg.sae_batch_tokens,
                          cfg.store_dtype)
    w_dec = sae.W_dec.detach().double().cpu().numpy()
    details, unstructured = [], {"run_dir": str(ctx.run_dir), "pairs": {}}
    boot: list[tuple[int, dict[str, np.ndarray]]] = []
    for ds in datasets:
        s = _sets(ds, pooled)
        metrics, extra = scr_pair(s.x, s.f, s.y, w_dec, tuple(cfg.n_values), cfg.probe_C, cfg.probe_max_iter,
                                  cfg.standardize, cfg.seed, cfg.top_latents_reported)
        details.append({"dataset_name": ds.name, **metrics, **extra["clean_accuracies"],
                        "metric_direction": extra["metric_direction"],
                        "quadrant_size_train": ds.quadrant_size("train"),
                        "quadrant_size_test": ds.quadrant_size("test")})
        boot.append((extra["metric_direction"], extra.pop("_hits")))
        unstructured["pairs"][ds.name] = extra
    names = [k for k in details[0] if k.startswith("scr_")]
    means = {k: _finite_mean([d[k] for d in details]) for k in names}
    eval_config = {**asdict(cfg), "model_name": ctx.model.model_id, "hook_name": ctx.hook_name,
                   "effective_context_length": min(cfg.context_length, ctx.context_size),
                   "n_values_effective": [min(n, sae.d_sae) for n in cfg.n_values]}
    intervals = scr_bootstrap_ci(boot, list(cfg.n_values), cfg.n_bootstrap, cfg.seed)
    return EvalOutput({"scr_metrics": means, "confidence_intervals": intervals}, details, eval_config, unstructured)
