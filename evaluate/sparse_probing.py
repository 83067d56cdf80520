"""Sparse probing (SAEBench ``sparse_probing``): how well do a few SAE latents linearly encode
known binary concepts, compared with the model's own residual dimensions?

Data: the binary tasks of :mod:`sae.evaluate.datasets.tasks` (default: Shakespeare histories vs the other
genres, asyncio and email code vs code of four other standard-library packages, verse vs prose
speeches — a spread of difficulties like SAEBench's datasets; ``n_train`` + ``n_train`` training and
``n_test`` + ``n_test`` test snippets per task, document-disjoint), plus optional
one-vs-rest tasks of Hugging Face datasets (``hf_datasets``, e.g. SAEBench's
``LabHC/bias_in_bios``) when ``datasets`` and network are available.

For every task (mean-pooled activations over non-special tokens, :mod:`sae.evaluate.probing`):

* ``llm_test_accuracy`` — a logistic-regression probe on the pooled LLM activation ``[d_model]``;
* ``llm_top_{k}_test_accuracy`` — a probe on the k residual dimensions with the largest
  ``|class-mean difference|`` on the training set;
* ``sae_test_accuracy`` — a probe on all pooled SAE latents ``[d_sae]``;
* ``sae_top_{k}_test_accuracy`` — a probe on the top-k latents by ``|class-mean difference|``,

for k ∈ ``k_values`` (SAEBench: 1, 2, 5, 10, 20, 50). ``eval_result_metrics`` holds the means over
tasks in SAEBench's categories ``llm`` and ``sae``; ``eval_result_details`` one row per task
(``dataset_name`` = task, the same metric names, sizes); ``eval_result_unstructured`` the chosen
latents per task and k and the task descriptions. The LLM numbers do not depend on the SAE and are
recomputed per SAE only from cached activations (probe fits take seconds).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..rundir.sae import SAE
from .datasets import tasks as T
from .intervals import accuracy_ci
from .probing import ProbeSettings, corpus_unavailable_reason, pooled_texts, probe_scores
from .registry import EvalContext, EvalOutput

EVAL_TYPE_ID = "sparse_probing"

__all__ = ["EVAL_TYPE_ID", "Config", "available", "build_tasks", "run", "score_task"]


@dataclass
class Config(ProbeSettings):
    """Settings of the sparse-probing evaluation (recorded as ``eval_config``)."""

    tasks: tuple[str, ...] = ("genre_histories", "package_asyncio", "package_email", "verse_vs_prose")
    """Embedded tasks (names of :data:`sae.evaluate.datasets.tasks.TASKS`)."""
    hf_datasets: tuple[str, ...] = ()
    """Optional ``hf:<id>[:<text col>:<label col>]`` datasets; each adds one-vs-rest tasks of its classes."""
    hf_max_classes: int = 5
    n_train: int = 150
    """Training snippets per class (the probe trains on ``2 · n_train``; SAEBench: 2000 per class)."""
    n_test: int = 50
    """Test snippets per class (SAEBench: 500 per class)."""
    k_values: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    ranges = {**ProbeSettings.ranges, "hf_max_classes": ">=2", "n_train": ">=2", "n_test": ">=1", "k_values": ">=1"}


def available(ctx: EvalContext, cfg: Config | None = None) -> str | None:
    """None when the embedded corpus (and every requested HF dataset) can be used."""
    cfg = cfg or Config()
    if cfg.tasks:
        reason = corpus_unavailable_reason()
        if reason:
            return reason
    for spec in cfg.hf_datasets:
        reason = T.hf_unavailable_reason(spec)
        if reason:
            return reason
    if not cfg.tasks and not cfg.hf_datasets:
        return "no probing tasks configured"
    return None


def build_tasks(cfg: Config) -> list[T.BinaryDataset]:
    """The configured binary tasks (embedded first, then HF one-vs-rest classes)."""
    out = [T.binary_task(name, cfg.n_train, cfg.n_test, cfg.seed, cfg.test_fraction, cfg.min_chars, cfg.max_chars,
                         cfg.split_by)
           for name in cfg.tasks]
    for spec in cfg.hf_datasets:
        mc = T.hf_multiclass_dataset(spec, cfg.n_train, cfg.n_test, cfg.hf_max_classes, cfg.seed)
        out.extend(mc.one_vs_rest(c) for c in mc.classes)
    return out


def score_task(x_train: np.ndarray, y_train: list[int], x_test: np.ndarray, y_test: list[int], prefix: str,
               cfg: Config) -> tuple[dict[str, float], dict[int, list[int]]]:
    """Full-width and top-k probe accuracies of one task on one representation (``prefix`` = llm/sae)."""
    return probe_scores(x_train, y_train, x_test, y_test, cfg.k_values, prefix, cfg.probe_C, cfg.probe_max_iter,
                        cfg.standardize, cfg.seed)


def run(sae: SAE, ctx: EvalContext, cfg: Config) -> EvalOutput:
    """Sparse probing of ``sae`` on every configured task (module doc)."""
    sae = sae.to(ctx.model.device)
    task_sets = build_tasks(cfg)
    texts = [t for ds in task_sets for t in ds.train_texts + ds.test_texts]
    pooled = pooled_texts(ctx, sae, texts, cfg.context_length, cfg.llm_batch_size, cfg.sae_batch_tokens,
                          cfg.store_dtype)
    details, chosen = [], {}
    for ds in task_sets:
        row: dict = {"dataset_name": ds.name}
        llm, _ = score_task(pooled.llm_of(ds.train_texts), ds.train_labels, pooled.llm_of(ds.test_texts),
                            ds.test_labels, "llm", cfg)
        sae_scores, sae_chosen = score_task(pooled.sae_of(ds.train_texts), ds.train_labels,
                                            pooled.sae_of(ds.test_texts), ds.test_labels, "sae", cfg)
        row.update(llm)
        row.update(sae_scores)
        row.update(ds.counts())
        details.append(row)
        chosen[ds.name] = {str(k): v for k, v in sae_chosen.items()}
    names = [k for k in details[0] if k.startswith(("llm_", "sae_"))]
    means = {k: float(np.mean([d[k] for d in details])) for k in names}
    sizes = [int(d["n_test"]) for d in details]
    intervals = {}
    for k in names:  # 95 % Wilson intervals on the pooled test snippets (evaluate/intervals.py)
        lo, hi = accuracy_ci([float(d[k]) for d in details], sizes)
        intervals[f"{k}_ci_low"], intervals[f"{k}_ci_high"] = lo, hi
    metrics = {"llm": {k: v for k, v in means.items() if k.startswith("llm_")},
               "sae": {k: v for k, v in means.items() if k.startswith("sae_")},
               "confidence_intervals": intervals}
    eval_config = {**asdict(cfg), "model_name": ctx.model.model_id, "hook_name": ctx.hook_name,
                   "effective_context_length": min(cfg.context_length, ctx.context_size),
                   "n_tasks": len(task_sets)}
    unstructured = {"run_dir": str(ctx.run_dir), "task_descriptions": {ds.name: ds.description for ds in task_sets},
                    "sae_top_k_latents": chosen}
    return EvalOutput(metrics, details, eval_config, unstructured)
