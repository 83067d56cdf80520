"""k-sparse probing on the sae-probes benchmark (Kantamneni et al., arXiv 2502.16681), as SAEBench
0.6 runs it (``sparse_probing_sae_probes``), offline.

Data
    The binary classification datasets the PyPI package ``sae-probes`` ships in its wheel (113 in
    0.4.2: news topics, sentiment, hate speech, entities, geography, code, ...), read through the
    package (``sae_probes.utils_data``); each dataset's labels are ``LabelEncoder``-coded, its
    first 5 000 prompts kept (the package's ``MAX_AMT``). ``datasets`` picks a subset (below).

Activations (ours, through :mod:`sae.model`)
    Each prompt is tokenised as the package does (the tokenizer's default special tokens, so BOS
    for Gemma; left-truncated to ``max_seq_len`` = 1 024 tokens) and ``resid_post`` at the SAE's
    hook is taken at the **last token** — the package's ``_process_activations``. Prompts are
    batched by length with right padding and an attention mask (padding never reaches a real
    position of a causal model). The ``[n_prompts, d_model]`` float32 matrix of a dataset is
    computed once per (model, hook, dataset, ``max_seq_len``) and kept in the evaluation cache
    (``ctx.cached(..., persist=True)``), shared by every SAE of that hook and later calls.

Protocol ("normal" setting, the package's ``run_sae_eval`` / ``run_baseline_dataset_layer``)
    * split: ``num_train = min(n − 100, 1024)`` class-balanced training prompts, every other
      prompt but one class-balanced for test (``get_train_test_indices``, seed 42);
    * SAE codes ``f = sae.encode(x)`` ``[n, d_sae]``; latents ranked by
      ``|mean(f̃ | y=1) − mean(f̃ | y=0)|`` on the training set, with each latent scaled by its mean
      absolute non-zero activation (``mean_act_normalization``; ``normalization = "none"``: raw);
    * for each k in ``ks`` a logistic-regression probe on the top-k latents with the package's
      regularisation search (``find_best_reg``: 10 values of C from 1e5 to 1e-5, chosen by
      validation AUC on the last ``min(0.2 n, 100)`` training prompts — or 6-fold CV under 128 —,
      refit on all training prompts; L1/saga by default as SAEBench, ``reg_type = "l2"``: lbfgs);
    * the dense baseline ("llm"): the same search, L2, on the full ``[d_model]`` activation.

Metrics (SAEBench 0.6 ``sparse_probing_sae_probes/eval_output.py`` key names)
    ``eval_result_metrics``: ``llm`` {``llm_test_accuracy``, ``llm_test_auc``, ``llm_test_f1``} and
    ``sae`` {``sae_top_{k}_test_accuracy``, ``sae_top_{k}_test_auc``, ``sae_top_{k}_test_f1``} —
    means over datasets (F1 is sklearn's ``average="weighted"``); ``confidence_intervals``: 95 %
    percentile intervals of those means from a bootstrap of the test prompts (``n_bootstrap``
    replicates; every dataset resampled independently, accuracy and AUC; the probes are not
    refit, so this is the test-sample noise only). ``eval_result_details``: one row per dataset
    (``dataset_name``, the same keys, ``sae_metrics_by_k``, sizes, its own intervals), and the
    top-level ``sae_metrics_by_k`` ``{k: {test_accuracy, test_auc, test_f1}}`` as SAEBench writes it.
    SAEBench's default ``ks`` are (1, 2, 5); the paper's, and ours, the powers of two.

Datasets
    ``datasets = ("auto",)``: every dataset on a GPU; on a CPU the ``cpu`` set (:data:`CPU_DATASETS`,
    short-prompt datasets of every kind; the whole benchmark is ~30 M tokens of forward pass).
    Names are the package's numbered tags (``"117_us_state_FL"``); shell-style patterns
    (``"*news*"``) and ``all``/``cpu`` work too. Unknown names are refused before anything loads.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..progress import progress_bar
from ..rundir.sae import SAE
from .registry import EvalContext, EvalOutput

EVAL_TYPE_ID = "sparse_probing_sae_probes"
"""SAEBench 0.6's ``eval_type_id`` for this evaluation; the result file is ``eval_results/sae_probes.json``."""

MAX_AMT = 5000
"""Prompts kept per dataset (sae-probes ``get_xy_traintest``'s ``MAX_AMT``)."""

CPU_DATASETS: tuple[str, ...] = (
    "5_hist_fig_ismale", "6_hist_fig_isamerican", "7_hist_fig_ispolitician",
    "21_headline_istrump", "22_headline_isobama", "23_headline_ischina", "24_headline_isiran",
    "26_headline_isfrontpage", "54_cs_tf", "77_second-derivative", "87_glue_cola", "92_glue_sst2",
    "105_click_bait", "114_nyc_borough_Manhattan", "115_nyc_borough_Brooklyn", "116_nyc_borough_Bronx",
    "117_us_state_FL", "118_us_state_CA", "119_us_state_TX",
    "120_us_timezone_Chicago", "121_us_timezone_New_York", "122_us_timezone_Los_Angeles",
    "123_world_country_United_Kingdom", "124_world_country_United_States", "125_world_country_Italy",
    "126_art_type_book", "127_art_type_song", "128_art_type_movie", "129_arith_mc_A",
    "130_temp_cat_Frequency", "131_temp_cat_Typical Time", "132_temp_cat_Event Ordering",
    "133_context_type_Causality", "134_context_type_Belief_states", "135_context_type_Event_duration",
    "148_twt_emotion_worry", "149_twt_emotion_happiness", "150_twt_emotion_sadness",
    "154_athlete_sport_football", "155_athlete_sport_basketball", "156_athlete_sport_baseball",
)
"""The default datasets on a CPU: the 41 of sae-probes 0.4.2 whose prompts average ≤ 80 characters
(people, places, headlines, grammar, sentiment, science and maths facts, art, time, context, emotion,
sport): 106 908 prompts, ≈ 1.1 M tokens with Gemma 3's tokenizer."""

__all__ = ["CPU_DATASETS", "EVAL_TYPE_ID", "Config", "available", "check", "requires", "result_stem", "run",
           "score_dataset"]


@dataclass
class Config:
    """Settings of the sae-probes evaluation (recorded as ``eval_config``; defaults: SAEBench 0.6's and the
    package's, except ``ks`` — the paper's powers of two)."""

    datasets: tuple[str, ...] = ("auto",)
    """Dataset tags, patterns, ``all``, ``cpu`` or ``auto`` (= all on a GPU, cpu on a CPU)."""
    ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    """Numbers of latents per sparse probe: the paper's powers of two, up to 16 (SAEBench: 1, 2, 5; the
    package: up to 512 — each doubling past 16 costs more than all smaller k together, see the README)."""
    reg_type: str = "l1"
    """Penalty of the sparse probes' regularisation search (SAEBench: l1)."""
    normalization: str = "mean"
    """Latent ranking: ``mean`` (scaled by mean non-zero activation, the package's default) or ``none``."""
    binarize: bool = False
    """Probe on ``f ≠ 0`` instead of ``f`` (the package's option)."""
    include_llm_baseline: bool = True
    """Also probe the dense activation (``llm_*`` metrics; cached per model and hook)."""
    max_seq_len: int = 1024
    llm_batch_tokens: int = 8192
    """Padded tokens per forward batch."""
    sae_batch_size: int = 128
    n_bootstrap: int = 1000
    seed: int = 42
    n_jobs: int = -1
    """Parallel probe fits (joblib; -1 = every core). The results do not depend on it."""
    ranges = {"ks": ">=1", "reg_type": "{l1,l2}", "normalization": "{mean,none}", "max_seq_len": ">=2",
              "llm_batch_tokens": ">=1", "sae_batch_size": ">=1", "n_bootstrap": ">=0", "seed": ">=0",
              "n_jobs": "=-1|>=1"}


def result_stem(cfg: Config) -> str:
    """The result file is ``eval_results/sae_probes.json`` (the name users pass to ``--eval``)."""
    return "sae_probes"


def requires() -> str | None:
    """None when the ``sae-probes`` package is installed, else what to install."""
    if importlib.util.find_spec("sae_probes") is None:
        return "the sae-probes benchmark needs the sae-probes package: pip install 'sae[probes]'"
    return None


def all_datasets() -> list[str]:
    """Every binary dataset tag of the installed package, in its order."""
    from sae_probes.utils_data import get_numbered_binary_tags

    return list(get_numbered_binary_tags())


def resolve_datasets(names: tuple[str, ...], device: str) -> list[str]:
    """The dataset tags ``names`` select (see the module doc), in the package's order.

    Raises:
        ConfigError: a name or pattern that matches no dataset (naming a few real ones).
    """
    every = all_datasets()
    chosen: set[str] = set()
    for name in names:
        if name == "auto":
            chosen.update(every if device == "cuda" else CPU_DATASETS)
        elif name == "all":
            chosen.update(every)
        elif name == "cpu":
            chosen.update(CPU_DATASETS)
        else:
            hits = [d for d in every if fnmatch.fnmatchcase(d, name) or d.split("_", 1)[-1] == name]
            if not hits:
                raise ConfigError(f"sae_probes.datasets: {name!r} is not an sae-probes dataset (e.g. {every[0]}, "
                                  f"{every[-1]}; patterns like '*news*' work; `all` or `cpu` for sets)")
            chosen.update(hits)
    return [d for d in every if d in chosen]


def check(cfg: Config, device: str = "auto") -> None:
    """Refuse, before anything loads, a missing package or unknown datasets.

    Raises:
        ConfigError: the package is missing (naming the extra) or a dataset name is unknown.
    """
    reason = requires()
    if reason:
        raise ConfigError(f"--eval sae_probes: {reason}")
    resolve_datasets(cfg.datasets, "cuda" if device == "cuda" else "cpu")


def available(ctx: EvalContext, cfg: Config | None = None) -> str | None:
    """None when the package is installed (the datasets ship in it)."""
    return requires()


# -- activations ----------------------------------------------------------------------------------
def _prompt_ids(tokenizer: Any, prompts: list[str], max_seq_len: int) -> list[list[int]]:
    """Token ids as sae-probes makes them: default special tokens, the last ``max_seq_len`` kept."""
    ids = tokenizer(prompts)["input_ids"]
    return [list(row[-max_seq_len:]) for row in ids]


@torch.no_grad()
def last_token_acts(ctx: EvalContext, prompts: list[str], max_seq_len: int, batch_tokens: int, label: str
                    ) -> torch.Tensor:
    """``resid_post`` at ``ctx``'s hook on the last token of each prompt: ``[len(prompts), d_model]``
    float32 (CPU), in prompt order."""
    from ..model import capture_resid_post
    from .common import right_pad

    lm = ctx.model
    pad = lm.tokenizer.pad_token_id  # type: ignore[attr-defined]
    pad = int(pad) if pad is not None else lm.bos_token_id
    rows = _prompt_ids(lm.tokenizer, prompts, max_seq_len)
    out = torch.zeros(len(rows), lm.d_model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    with progress_bar(ctx.quiet, unit="prompt") as bar:
        task = bar.add_task(f"sae-probes activations {label}", total=len(rows))
        start = 0
        while start < len(order):  # prompts by length; a batch holds at most batch_tokens padded tokens
            stop = start + 1
            while stop < len(order) and len(rows[order[stop]]) * (stop - start + 1) <= batch_tokens:
                stop += 1
            idx = order[start:stop]
            ids, attn = right_pad([rows[i] for i in idx], pad)
            acts = capture_resid_post(lm.model, ids.to(lm.device), [ctx.layer], attn.to(lm.device))[ctx.layer]
            last = torch.tensor([len(rows[i]) - 1 for i in idx], device=acts.device)
            out[torch.tensor(idx)] = acts[torch.arange(len(idx), device=acts.device), last].float().cpu()
            bar.update(task, advance=len(idx))
            start = stop
    if not torch.isfinite(out).all():
        raise ValueError(f"non-finite model activations on sae-probes dataset {label}")
    return out


@dataclass
class DatasetSplit:
    """One dataset's activations and its package split: ``x_* [n, d_model]`` float32, ``y_*`` int64."""

    name: str
    x_train: torch.Tensor
    y_train: np.ndarray
    x_test: torch.Tensor
    y_test: np.ndarray


def split_dataset(name: str, acts: torch.Tensor, seed: int) -> DatasetSplit:
    """The package's "normal" split of ``acts`` ``[n_prompts, d_model]`` (rows = the dataset's prompts).

    Raises:
        ValueError: ``acts`` does not have one row per prompt of the dataset.
    """
    from sae_probes.utils_data import get_dataset_sizes, get_train_test_indices, get_yvals

    y_all = np.asarray(get_yvals(name))
    if len(acts) != len(y_all):
        raise ValueError(f"{name}: {len(acts)} activation rows for {len(y_all)} prompts")
    x, y = acts[:MAX_AMT], y_all[:MAX_AMT]
    num_train = min(get_dataset_sizes()[name] - 100, 1024)
    num_test = len(x) - num_train - 1
    tr, te = get_train_test_indices(y, num_train, num_test, 0.5, seed)
    return DatasetSplit(name, x[tr], y[tr], x[te], y[te])


# -- probes ---------------------------------------------------------------------------------------
def _fit(x_train: Any, y_train: np.ndarray, x_test: Any, y_test: np.ndarray, penalty: str, seed: int
         ) -> dict[str, Any]:
    """The package's regularisation search (``find_best_reg``) and what the bootstrap needs."""
    from sae_probes.utils_training import find_best_reg
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():  # non-convergence at max_iter is part of the protocol; sklearn's
        warnings.simplefilter("ignore", ConvergenceWarning)  # deprecation notes about `penalty` are not ours
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        res = find_best_reg(X_train=x_train, y_train=y_train, X_test=x_test, y_test=y_test, n_jobs=1,
                            parallel=False, penalty=penalty, seed=seed)
        clf = res.classifier
        pred = np.asarray(clf.predict(x_test))
        score = np.asarray(clf.predict_proba(x_test)[:, 1], dtype=np.float64)
    m = res.metrics
    return {"test_accuracy": m.test_acc, "test_auc": m.test_auc, "test_f1": m.test_f1, "val_auc": m.val_auc,
            "correct": (pred == np.asarray(y_test)), "score": score, "C": float(getattr(clf, "C", math.nan))}


def sae_codes(sae: SAE, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``sae.encode`` of ``x [n, d_in]`` in batches on the SAE's device: ``[n, d_sae]`` float32 (CPU)."""
    dev = next(sae.parameters()).device
    dtype = next(sae.parameters()).dtype
    with torch.no_grad():
        parts = [sae.encode(x[i:i + batch_size].to(device=dev, dtype=dtype)).float().cpu()
                 for i in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, sae.d_sae)


def ranked_latents(f_train: torch.Tensor, y_train: np.ndarray, normalization: str) -> torch.Tensor:
    """Latents by decreasing ``|class-mean difference|`` of the (normalised) training codes (the
    package's ``get_sorted_indices`` with ``mean_act_normalization``)."""
    from sae_probes.run_sae_evals import get_sorted_indices, mean_act_normalization

    norm = mean_act_normalization if normalization == "mean" else None
    return get_sorted_indices(f_train, torch.as_tensor(y_train), norm)


def score_dataset(sae: SAE, split: DatasetSplit, cfg: Config) -> tuple[list[tuple], dict[int, list[int]]]:
    """The sparse-probe fits of one dataset as joblib-ready ``(key, args)`` jobs and the chosen latents.

    Each job is ``(k, (x_train, y_train, x_test, y_test, penalty, seed))`` for :func:`_fit`.
    """
    f_train = sae_codes(sae, split.x_train, cfg.sae_batch_size)
    f_test = sae_codes(sae, split.x_test, cfg.sae_batch_size)
    order = ranked_latents(f_train, split.y_train, cfg.normalization)
    jobs, chosen = [], {}
    for k in cfg.ks:
        top = order[:k]
        a, b = f_train[:, top], f_test[:, top]
        if cfg.binarize:
            a, b = a != 0, b != 0
        jobs.append((k, (a.numpy(), split.y_train, b.numpy(), split.y_test, cfg.reg_type, cfg.seed)))
        chosen[k] = [int(i) for i in top]
    return jobs, chosen


def _run_jobs(jobs: list[tuple[Any, tuple]], n_jobs: int, quiet: bool, label: str) -> list[dict[str, Any]]:
    """``_fit`` over every job (joblib processes; progress as jobs finish), results in job order."""
    from joblib import Parallel, delayed

    out: list[dict[str, Any]] = []
    with progress_bar(quiet, unit="probe") as bar:
        task = bar.add_task(label, total=len(jobs))
        par = Parallel(n_jobs=n_jobs, return_as="generator")
        for res in par(delayed(_fit)(*args) for _, args in jobs):
            out.append(res)
            bar.update(task, advance=1)
    return out


# -- bootstrap ------------------------------------------------------------------------------------
def bootstrap_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n]`` multiplicities of a with-replacement resample of ``n`` items per replicate."""
    idx = rng.integers(0, n, size=(n_boot, n))
    flat = idx + (np.arange(n_boot) * n)[:, None]
    return np.bincount(flat.ravel(), minlength=n_boot * n).reshape(n_boot, n)


def weighted_auc(score: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC of ``score [n]`` for labels ``y [n]`` with per-item weights ``w [B, n]`` (ties count ½):
    ``Σ_pos w_i (W_neg(s < s_i) + ½ W_neg(s = s_i)) / (W_pos W_neg)`` → ``[B]`` (NaN where a class is empty)."""
    order = np.argsort(score, kind="stable")
    s, yy, ww = score[order], np.asarray(y)[order].astype(bool), w[:, order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    neg = np.add.reduceat(ww * ~yy, starts, axis=1)
    pos = np.add.reduceat(ww * yy, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))


def _replicates(fit: dict[str, Any], y_test: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    n = counts.shape[1]
    return {"test_accuracy": counts @ fit["correct"].astype(np.float64) / n,
            "test_auc": weighted_auc(fit["score"], y_test, counts)}


def _interval(reps: np.ndarray) -> tuple[float, float]:
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return float(lo), float(hi)


# -- the evaluation -------------------------------------------------------------------------------
def _acts(ctx: EvalContext, name: str, cfg: Config) -> torch.Tensor:
    from sae_probes.utils_data import read_numbered_dataset_df

    def compute() -> torch.Tensor:
        prompts = [str(p) for p in read_numbered_dataset_df(name)["prompt"].tolist()]
        return last_token_acts(ctx, prompts, cfg.max_seq_len, cfg.llm_batch_tokens, name)

    return ctx.cached(("sae_probes_acts", name, cfg.max_seq_len), compute, persist=True, memory=False)


def _baselines(ctx: EvalContext, splits: list[DatasetSplit], cfg: Config) -> dict[str, dict[str, Any]]:
    """The dense-activation probe of every dataset (SAE-independent: kept in the evaluation cache per
    dataset; the missing ones fitted in parallel)."""
    key = ("sae_probes_baselines", cfg.max_seq_len, cfg.seed, MAX_AMT)
    memo: dict[str, dict[str, Any]] = ctx.cached(key, dict, persist=True)
    todo = [sp for sp in splits if sp.name not in memo]
    if todo:
        jobs = [(sp.name, (sp.x_train.numpy(), sp.y_train, sp.x_test.numpy(), sp.y_test, "l2", cfg.seed))
                for sp in todo]
        for sp, res in zip(todo, _run_jobs(jobs, cfg.n_jobs, ctx.quiet, "sae-probes dense baselines"), strict=True):
            memo[sp.name] = res
        ctx.persist(key)
    return {sp.name: memo[sp.name] for sp in splits}


def probe_fits(sae: SAE, splits: list[DatasetSplit], cfg: Config, quiet: bool = True
               ) -> tuple[dict[tuple[str, int], dict[str, Any]], dict[str, dict[str, list[int]]]]:
    """Every sparse probe of ``sae``: ``({(dataset, k): fit}, {dataset: {k: chosen latents}})``; a fit has
    ``test_accuracy``, ``test_auc``, ``test_f1``, ``val_auc``, ``C`` and per-test-prompt ``correct``/``score``."""
    jobs: list[tuple[Any, tuple]] = []
    chosen: dict[str, dict[str, list[int]]] = {}
    for sp in splits:
        ds_jobs, ds_chosen = score_dataset(sae, sp, cfg)
        jobs.extend(((sp.name, k), args) for k, args in ds_jobs)
        chosen[sp.name] = {str(k): v for k, v in ds_chosen.items()}
    fits = dict(zip([key for key, _ in jobs], _run_jobs(jobs, cfg.n_jobs, quiet, "sae-probes sparse probes"),
                    strict=True))
    return fits, chosen


def run(sae: SAE, ctx: EvalContext, cfg: Config) -> EvalOutput:
    """sae-probes k-sparse probing of ``sae`` (module doc) on ``cfg.datasets``."""
    names = resolve_datasets(cfg.datasets, ctx.model.device.type)
    sae = sae.to(ctx.model.device)
    splits = [split_dataset(name, _acts(ctx, name, cfg), cfg.seed) for name in names]
    base = _baselines(ctx, splits, cfg) if cfg.include_llm_baseline else {}
    fits, chosen = probe_fits(sae, splits, cfg, ctx.quiet)
    rng = np.random.default_rng(cfg.seed)
    details: list[dict[str, Any]] = []
    reps_by_key: dict[str, list[np.ndarray]] = {}
    for sp in splits:
        counts = bootstrap_counts(len(sp.y_test), cfg.n_bootstrap, rng) if cfg.n_bootstrap else None
        row: dict[str, Any] = {"dataset_name": sp.name, "n_train": len(sp.y_train), "n_test": len(sp.y_test)}
        cis: dict[str, float] = {}
        parts: list[tuple[str, dict[str, Any]]] = []
        if cfg.include_llm_baseline:
            parts.append(("llm", base[sp.name]))
        parts.extend((f"sae_top_{k}", fits[(sp.name, k)]) for k in cfg.ks)
        by_k: dict[int, dict[str, float]] = {}
        for prefix, fit in parts:
            for metric in ("test_accuracy", "test_auc", "test_f1"):
                row[f"{prefix}_{metric}"] = float(fit[metric])
            if prefix.startswith("sae_top_"):
                by_k[int(prefix.rsplit("_", 1)[1])] = {m: float(fit[m]) for m in ("test_accuracy", "test_auc",
                                                                                   "test_f1")}
            if counts is not None:
                for metric, reps in _replicates(fit, sp.y_test, counts).items():
                    key = f"{prefix}_{metric}"
                    reps_by_key.setdefault(key, []).append(reps)
                    cis[f"{key}_ci_low"], cis[f"{key}_ci_high"] = _interval(reps)
        row["sae_metrics_by_k"] = by_k
        row["confidence_intervals"] = cis
        details.append(row)
    keys = [k for k in details[0] if k.startswith(("llm_", "sae_top_"))]
    means = {k: float(np.mean([d[k] for d in details])) for k in keys}
    intervals: dict[str, float] = {}
    for key, per_ds in reps_by_key.items():  # each replicate: one resample of every dataset, then the mean
        intervals[f"{key}_ci_low"], intervals[f"{key}_ci_high"] = _interval(np.mean(np.stack(per_ds), axis=0))
    metrics = {"llm": {k: v for k, v in means.items() if k.startswith("llm_")},
               "sae": {k: v for k, v in means.items() if k.startswith("sae_top_")},
               "confidence_intervals": intervals}
    by_k_mean = {k: {m: means[f"sae_top_{k}_{m}"] for m in ("test_accuracy", "test_auc", "test_f1")}
                 for k in cfg.ks}
    from sae_probes import __version__ as probes_version

    eval_config = {**asdict(cfg), "dataset_names": names, "setting": "normal", "model_name": ctx.model.model_id,
                   "hook_name": ctx.hook_name, "baseline_method": "logreg", "random_seed": cfg.seed,
                   "n_datasets": len(names), "sae_probes_version": probes_version}
    unstructured = {"sae_top_k_latents": chosen,
                    "chosen_C": {f"{n}/{k}": fits[(n, k)]["C"] for n, k in fits},
                    "val_auc": {f"{n}/{k}": fits[(n, k)]["val_auc"] for n, k in fits}}
    return EvalOutput(metrics, details, eval_config, unstructured, {"sae_metrics_by_k": by_k_mean})
