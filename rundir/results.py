"""Evaluation result files: ``RUN_DIR/eval_results/<eval_type_id>.json`` in SAEBench's output shape.

Every evaluation (core, sparse_probing, absorption, ...) writes one file per run with the
top-level keys of SAEBench's ``BaseEvalOutput``::

    eval_type_id, eval_config, eval_id (uuid4), datetime_epoch_millis,
    eval_result_metrics   {category: {metric: number}}
    eval_result_details   [per-item dicts, e.g. one per latent]
    eval_result_unstructured, sae_bench_commit_hash (None), sae_lens_id (None),
    sae_lens_release_id (None), sae_lens_version (None), sae_cfg_dict (the run's cfg.json),
    sae_version (this package's version)

Non-finite floats (a score whose denominator is 0) are written as ``null``, since JSON has no NaN
(SAEBench writes -1 instead).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..outputs import write_json_atomic

RESULTS_DIR = "eval_results"
REQUIRED_KEYS = ("eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics",
                 "eval_result_details", "eval_result_unstructured", "sae_bench_commit_hash", "sae_lens_id",
                 "sae_cfg_dict", "sae_version")


class ResultSchemaError(ValueError):
    """A result dict or file does not have the expected shape."""


def result_path(run_dir: str | Path, eval_type_id: str) -> Path:
    """``run_dir/eval_results/<eval_type_id>.json``."""
    return Path(run_dir) / RESULTS_DIR / f"{eval_type_id}.json"


def _package_version() -> str:
    from .. import __version__

    return __version__


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: NaN/inf → None, tensors/NumPy scalars → Python numbers, tuples → lists."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # torch / numpy scalars and arrays
        return _jsonable(obj.tolist())
    return str(obj)


def build_result(eval_type_id: str, eval_config: Mapping, metrics: Mapping[str, Mapping[str, Any]],
                 details: list | None = None, sae_cfg: Mapping | None = None,
                 unstructured: Any = None, extra: Mapping[str, Any] | None = None) -> dict:
    """A validated, JSON-ready result dict (see the module doc for the keys).

    ``metrics`` is ``{category: {metric: value}}`` (SAEBench's ``eval_result_metrics``); ``extra``:
    further top-level keys an evaluation's SAEBench output has (e.g. ``sae_metrics_by_k``), never
    replacing the common ones.

    Raises:
        ResultSchemaError: ``metrics`` is not a dict of dicts.
    """
    result = _jsonable({
        "eval_type_id": eval_type_id,
        "eval_config": dict(eval_config),
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": dict(metrics),
        "eval_result_details": list(details or []),
        "eval_result_unstructured": unstructured if unstructured is not None else {},
        "sae_bench_commit_hash": None,
        "sae_lens_id": None,
        "sae_lens_release_id": None,
        "sae_lens_version": None,
        "sae_cfg_dict": dict(sae_cfg or {}),
        "sae_version": _package_version(),
        **{k: v for k, v in (extra or {}).items() if k not in REQUIRED_KEYS and k != "sae_lens_release_id"
           and k != "sae_lens_version"},
    })
    validate_result(result)
    return result


def write_result(run_dir: str | Path, eval_type_id: str, eval_config: Mapping,
                 metrics: Mapping[str, Mapping[str, Any]], details: list | None = None,
                 sae_cfg: Mapping | None = None, unstructured: Any = None, file_stem: str | None = None,
                 extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``run_dir/eval_results/<file_stem or eval_type_id>.json`` atomically (replacing one); return
    the path. (``core_saebench.json`` holds the ``--compat saebench`` core result beside ours.)

    Raises:
        ResultSchemaError: see :func:`build_result`.
    """
    result = build_result(eval_type_id, eval_config, metrics, details, sae_cfg, unstructured, extra)
    path = result_path(run_dir, file_stem or eval_type_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result, allow_nan=False)
    return path


def read_result(run_dir: str | Path, eval_type_id: str) -> dict:
    """Load and validate ``run_dir/eval_results/<eval_type_id>.json``.

    Raises:
        FileNotFoundError: no such result (with the command that makes it).
        ResultSchemaError: not valid JSON or not a result.
    """
    path = result_path(run_dir, eval_type_id)
    if not path.exists():
        raise FileNotFoundError(f"no {eval_type_id} result for {run_dir} ({path}): run "
                                f"`sae evaluate {run_dir} --eval {eval_type_id}` first")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResultSchemaError(f"{path} is not valid JSON ({e}): delete it and re-run the evaluation") from e
    validate_result(result, source=str(path))
    return result


def validate_result(d: Any, source: str = "result") -> None:
    """Raise :class:`ResultSchemaError` unless ``d`` has every top-level key with the right type.

    Checks: a dict with :data:`REQUIRED_KEYS`; ``eval_type_id`` and ``eval_id`` strings;
    ``datetime_epoch_millis`` an int; ``eval_config``, ``sae_cfg_dict`` dicts;
    ``eval_result_metrics`` a dict of dicts; ``eval_result_details`` a list.
    """
    if not isinstance(d, dict):
        raise ResultSchemaError(f"{source} is a {type(d).__name__}, not a dict")
    missing = [k for k in REQUIRED_KEYS if k not in d]
    if missing:
        raise ResultSchemaError(f"{source} lacks {', '.join(missing)}: not an evaluation result (re-run it)")
    checks = {"eval_type_id": str, "eval_id": str, "datetime_epoch_millis": int, "eval_config": dict,
              "sae_cfg_dict": dict, "eval_result_metrics": dict, "eval_result_details": list}
    for key, typ in checks.items():
        if not isinstance(d[key], typ) or (typ is int and isinstance(d[key], bool)):
            raise ResultSchemaError(f"{source}: {key} is a {type(d[key]).__name__}, expected {typ.__name__}")
    bad = [k for k, v in d["eval_result_metrics"].items() if not isinstance(v, dict)]
    if bad:
        raise ResultSchemaError(f"{source}: eval_result_metrics[{bad[0]!r}] is not a dict of metrics")


def get_metric(result: Mapping, name: str, category: str | None = None) -> Any:
    """Metric ``name`` from ``result["eval_result_metrics"]`` (first category that has it), or None."""
    groups = result.get("eval_result_metrics", {})
    if category is not None:
        return groups.get(category, {}).get(name)
    for group in groups.values():
        if isinstance(group, Mapping) and name in group:
            return group[name]
    return None


def feature_densities(result: Mapping) -> list[float]:
    """Per-latent firing rates from a core result's ``eval_result_details`` (for density histograms)."""
    return [float(row["feature_density"]) for row in result.get("eval_result_details", [])]
