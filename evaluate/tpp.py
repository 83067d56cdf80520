"""Targeted probe perturbation (SAEBench ``tpp``; Karvonen et al. 2024, "Evaluating Sparse
Autoencoders on Targeted Concept Erasure Tasks"): can ablating a few latents disable one concept's
probe while leaving the probes of other concepts intact?

Data (:func:`sae.evaluate.datasets.tasks.multiclass_dataset`): code snippets of five standard-library
packages (asyncio, email, multiprocessing, tkinter, xml; SAEBench: five professions of Bias-in-Bios /
five Amazon categories), ``n_train`` / ``n_test`` per class, file-disjoint; or any other label of
the embedded snippets (e.g. ``attr="genre"``, ``classes=TPP_GENRES``), or the classes of an
optional HF dataset (``hf_dataset``).

For each class c a one-vs-rest probe ``P_c`` is trained on pooled LLM activations (positives = class
c, negatives drawn evenly from the others; SAEBench ``prepare_probe_data``); ``acc_c`` = its clean
test accuracy on class c's test set. Latents are ranked for class c by
``effect_i = max(Δ_i, 0) · (W_dec[i] · w_c)`` (Δ_i: class-mean difference of pooled latent i on
``P_c``'s training set; SAEBench's TPP clamps Δ so only latents more active on class c count). For
N ∈ ``n_values`` (capped at ``d_sae``) the top-N latents of class i are zero-ablated keeping the SAE
error (on pooled activations; :mod:`sae.evaluate.probing`) in every test set, giving ``acc_{i→j}``
for every probe j. Then (SAEBench ``create_tpp_plotting_dict``):

* ``tpp_threshold_N_intended_diff_only`` = mean_i (acc_i − acc_{i→i});
* ``tpp_threshold_N_unintended_diff_only`` = mean_i mean_{j≠i} (acc_j − acc_{i→j});
* ``tpp_threshold_N_total_metric`` = intended − unintended (per class, then averaged).

``eval_result_metrics["tpp_metrics"]`` holds the class means; ``eval_result_details`` one row for
the dataset (``dataset_name``, the same metrics, as SAEBench); ``eval_result_unstructured`` the
per-class metrics, clean accuracies, top-ranked latents and the ablated accuracy matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..rundir.sae import SAE
from .datasets import tasks as T
from .probing import (
    ProbeSettings,
    ablate_pooled,
    corpus_unavailable_reason,
    fit_probe,
    latent_effects,
    pooled_texts,
    select_top_n,
)
from .registry import EvalContext, EvalOutput

EVAL_TYPE_ID = "tpp"
N_VALUES = (2, 5, 10, 20, 50, 100, 500)

__all__ = ["EVAL_TYPE_ID", "N_VALUES", "Config", "available", "run", "tpp_scores"]


@dataclass
class Config(ProbeSettings):
    """Settings of the TPP evaluation (recorded as ``eval_config``)."""

    classes: tuple[str, ...] = T.CODE_PACKAGES
    attr: str = "package"
    hf_dataset: str | None = None
    """Optional ``hf:<id>[...]`` dataset instead of the embedded genres (its most frequent classes)."""
    hf_max_classes: int = 5
    n_train: int = 150
    """Training snippets per class (each probe trains on 2 · n_train)."""
    n_test: int = 50
    n_values: tuple[int, ...] = N_VALUES
    top_latents_reported: int = 20
    n_bootstrap: int = 1000
    """Bootstrap resamples of each class's test examples for the 95 % intervals (0: none)."""
    ranges = {**ProbeSettings.ranges, "hf_max_classes": ">=2", "n_train": ">=2", "n_test": ">=1", "n_values": ">=1",
              "top_latents_reported": ">=0", "n_bootstrap": ">=0"}


def available(ctx: EvalContext, cfg: Config | None = None) -> str | None:
    """None when the embedded corpus (or the requested HF dataset) can be used."""
    cfg = cfg or Config()
    if cfg.hf_dataset:
        return T.hf_unavailable_reason(cfg.hf_dataset)
    return corpus_unavailable_reason()


def tpp_scores(sets: dict[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]], w_dec: np.ndarray,
               n_values: tuple[int, ...], C: float = 1.0, max_iter: int = 1000, standardize: bool = True,
               seed: int = 0, top_reported: int = 20) -> tuple[dict[str, float], dict]:
    """TPP metrics from pooled inputs (module doc).

    ``sets[c][side] = (x [n, d_model] pooled LLM activations, f [n, d_sae] pooled SAE codes, y [n])``
    of class c's one-vs-rest set, side ∈ {train, test}; ``w_dec [d_sae, d_model]``. Returns
    ``(class-mean metrics, extra)`` with per-class metrics, clean and ablated accuracies, rankings.
    """
    classes = list(sets)
    probes = {c: fit_probe(sets[c]["train"][0], sets[c]["train"][2], C, max_iter, standardize, seed) for c in classes}
    clean = {c: probes[c].accuracy(sets[c]["test"][0], sets[c]["test"][2]) for c in classes}
    hits: dict = {"clean": {c: (probes[c].predict(sets[c]["test"][0]) == sets[c]["test"][2]).astype(np.float64)
                            for c in classes}, "ablated": {}}
    d_sae = w_dec.shape[0]
    per_class: dict[str, dict[str, float]] = {c: {} for c in classes}
    ablated: dict[str, dict[str, dict[str, float]]] = {c: {} for c in classes}
    ranked: dict[str, list[int]] = {}
    for i in classes:
        x, f, y = sets[i]["train"]
        effects = latent_effects(f, y, probes[i], w_dec, "tpp")
        ranked[i] = [int(k) for k in select_top_n(effects, top_reported)]
        for n in n_values:
            latents = select_top_n(effects, min(n, d_sae))
            acc = {}
            for j in classes:
                xj, fj, yj = sets[j]["test"]
                pred = probes[j].predict(ablate_pooled(xj, fj, w_dec, latents))
                hits["ablated"][i, n, j] = (pred == np.asarray(yj)).astype(np.float64)
                acc[j] = float(hits["ablated"][i, n, j].mean())
            ablated[i][str(n)] = acc
            intended = clean[i] - acc[i]
            unintended = float(np.mean([clean[j] - acc[j] for j in classes if j != i]))
            per_class[i][f"tpp_threshold_{n}_total_metric"] = intended - unintended
            per_class[i][f"tpp_threshold_{n}_intended_diff_only"] = intended
            per_class[i][f"tpp_threshold_{n}_unintended_diff_only"] = unintended
    names = list(per_class[classes[0]])
    means = {k: float(np.mean([per_class[c][k] for c in classes])) for k in names}
    extra = {"per_class": per_class, "clean_accuracies": clean, "ablated_accuracies": ablated, "top_latents": ranked,
             "_hits": hits}
    return means, extra


def tpp_bootstrap_ci(hits: dict, classes: Sequence[str], n_values: Sequence[int], n_boot: int, seed: int
                     ) -> dict[str, float]:
    """95 % percentile intervals of the class-mean ``tpp_threshold_N_total_metric``: each class's test
    examples are resampled with replacement (one draw per class, shared by its clean and every ablated
    accuracy) and the metric recomputed."""
    if n_boot <= 0 or len(classes) < 2:
        return {}
    rng = np.random.default_rng(seed)
    draws = {c: rng.integers(0, len(hits["clean"][c]), (n_boot, len(hits["clean"][c]))) for c in classes}
    clean = {c: hits["clean"][c][draws[c]].mean(1) for c in classes}
    out = {}
    for n in n_values:
        total = np.zeros(n_boot)
        for i in classes:
            drop = {j: clean[j] - hits["ablated"][i, n, j][draws[j]].mean(1) for j in classes}
            total += drop[i] - np.mean([drop[j] for j in classes if j != i], axis=0)
        total /= len(classes)
        out[f"tpp_threshold_{n}_total_metric_ci_low"] = float(np.percentile(total, 2.5))
        out[f"tpp_threshold_{n}_total_metric_ci_high"] = float(np.percentile(total, 97.5))
    return out


def run(sae: SAE, ctx: EvalContext, cfg: Config) -> EvalOutput:
    """TPP of ``sae`` on the configured classes (module doc)."""
    sae = sae.to(ctx.model.device)
    if cfg.hf_dataset:
        ds = T.hf_multiclass_dataset(cfg.hf_dataset, cfg.n_train, cfg.n_test, cfg.hf_max_classes, cfg.seed)
    else:
        ds = T.multiclass_dataset(cfg.classes, cfg.attr, cfg.n_train, cfg.n_test, cfg.seed, cfg.test_fraction,
                                  cfg.min_chars, cfg.max_chars, cfg.split_by)
    binaries = {c: ds.one_vs_rest(c) for c in ds.classes}
    texts = [t for b in binaries.values() for t in b.train_texts + b.test_texts]
    pooled = pooled_texts(ctx, sae, texts, cfg.context_length, cfg.llm_batch_size, cfg.sae_batch_tokens,
                          cfg.store_dtype)
    sets = {c: {"train": (pooled.llm_of(b.train_texts), pooled.sae_of(b.train_texts), np.asarray(b.train_labels)),
                "test": (pooled.llm_of(b.test_texts), pooled.sae_of(b.test_texts), np.asarray(b.test_labels))}
            for c, b in binaries.items()}
    w_dec = sae.W_dec.detach().double().cpu().numpy()
    means, extra = tpp_scores(sets, w_dec, tuple(cfg.n_values), cfg.probe_C, cfg.probe_max_iter, cfg.standardize,
                              cfg.seed, cfg.top_latents_reported)
    details = [{"dataset_name": ds.name, **means, "n_classes": len(ds.classes),
                "n_train_per_class": len(ds.train[ds.classes[0]]), "n_test_per_class": len(ds.test[ds.classes[0]])}]
    eval_config = {**asdict(cfg), "model_name": ctx.model.model_id, "hook_name": ctx.hook_name,
                   "effective_context_length": min(cfg.context_length, ctx.context_size),
                   "n_values_effective": [min(n, sae.d_sae) for n in cfg.n_values]}
    hits = extra.pop("_hits")
    intervals = tpp_bootstrap_ci(hits, list(sets), list(cfg.n_values), cfg.n_bootstrap, cfg.seed)
    unstructured = {"run_dir": str(ctx.run_dir), "dataset_name": ds.name, "classes": list(ds.classes), **extra}
    return EvalOutput({"tpp_metrics": means, "confidence_intervals": intervals}, details, eval_config, unstructured)
