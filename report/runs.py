"""Loading run directories for the report: ``cfg.json``, ``metrics.jsonl``, every result file,
and reading metric values out of them (no metric is computed here)."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SaeError
from ..rundir.format import METRICS_FILE
from ..rundir.metrics import read_metrics
from ..rundir.results import RESULTS_DIR, ResultSchemaError, read_result

NOT_EVALUATED = "not evaluated"


HEADLINE: tuple[tuple[str, str, str | None, tuple[str, ...]], ...] = (
    # (column title, eval, category or None = any, metric names tried in order; () = first numeric metric)
    ("L0", "core", None, ("l0",)),
    ("expl. var.", "core", None, ("explained_variance",)),
    ("CE score", "core", None, ("ce_loss_score",)),
    ("KL score", "core", None, ("kl_div_score",)),
    ("frac dead", "core", None, ("frac_dead",)),
    ("mean max cos", "geometry", "decoder", ("mean_max_cos",)),
    ("pairs |cos|>0.5", "geometry", "decoder", ("frac_pairs_above_0p5",)),
    ("median κ", "geometry", "groups", ("median_kappa",)),
    ("Jaccard", "geometry", "stability", ("mean_jaccard",)),
    ("sae-probes top-1", "sae_probes", "sae", ("sae_top_1_test_accuracy",)),
    ("offline probe top-1", "sparse_probing", None, ("sae_top_1_test_accuracy",)),
    ("absorption", "absorption", None, ("mean_absorption_fraction_score", "mean_full_absorption_score",
                                        "mean_absorption_score")),
    ("SCR (thr 20) †", "scr", None, ("scr_metric_threshold_20", "scr_dir1_threshold_20")),
    ("TPP (thr 20) †", "tpp", None, ("tpp_threshold_20_total_metric",)),
    ("unlearning", "unlearning", None, ("unlearning_score",)),
)

UNRELIABLE = {"scr": "unreliable at canonical settings (arXiv 2605.18229)",
              "tpp": "unreliable at canonical settings (arXiv 2605.18229)"}
"""Evaluations an audit of SAE benchmarks (Chanin, arXiv 2605.18229) found unreliable at their canonical
settings: still computed and shown, their columns marked † with this note."""

UNRELIABLE_NOTE = ("† SCR and TPP: unreliable at canonical settings (arXiv 2605.18229) — read them as hints; "
                   "sae-probes is the probing metric that audit found most reliable.")


ABSORPTION_KEYS = ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_absorption_score")


@dataclass
class RunInfo:
    """Everything the report reads from one run directory.

    ``label``: unique display name; ``cfg``: ``cfg.json``; ``results``: ``{eval_type_id: result}``
    for every valid ``eval_results/*.json``; ``bad_results``: ``{file name: error}`` for the others;
    ``records``: ``metrics.jsonl`` records (empty when absent).
    """

    path: Path
    label: str
    cfg: dict[str, Any]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    bad_results: dict[str, str] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def variant(self) -> str:
        v = self.cfg.get("variant")
        return str(v) if v and v != "none" else self.arch  # no penalty: the base architecture names it

    @property
    def arch(self) -> str:
        """The training architecture (``trained_architecture``; older runs: from ``architecture``)."""
        a = self.cfg.get("trained_architecture")
        if a:
            return str(a)
        return {"standard": "relu"}.get(str(self.cfg.get("architecture")), str(self.cfg.get("architecture") or "?"))


# -- loading --------------------------------------------------------------------------------------
def resolve_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories (holding ``cfg.json``) from ``paths``; a path without one (a sweep's output
    folder) contributes its immediate subdirectories that have one, sorted.

    Raises:
        FileNotFoundError: a path that is neither a run nor holds runs.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "cfg.json").exists():
            out.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if (d / "cfg.json").exists()) if p.is_dir() else []
        if not subs:
            raise FileNotFoundError(f"{p} is not an SAE run directory (no cfg.json) and holds none: "
                                    "pass directories written by `sae train`")
        out.extend(subs)
    return out


def read_cfg(run_dir: Path) -> dict[str, Any]:
    """A run's ``cfg.json`` as a dict ({} when absent).

    Raises:
        SaeError: the file cannot be read or is not a JSON object (the message names the file).
    """
    path = Path(run_dir) / "cfg.json"
    if not path.exists():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SaeError(f"{path} is not valid JSON ({str(e).splitlines()[0]}): restore it from the run's "
                       "checkpoint or leave the run out of the report") from None
    if not isinstance(cfg, dict):
        raise SaeError(f"{path} holds a {type(cfg).__name__}, not a JSON object: restore it or leave the "
                       "run out of the report")
    return cfg


def load_run(run_dir: str | Path, label: str | None = None) -> RunInfo:
    """Read ``cfg.json``, ``metrics.jsonl`` and all ``eval_results/*.json`` of one run (bad result files
    are listed in ``bad_results``; cut ``metrics.jsonl`` lines are skipped).

    Raises:
        SaeError: an unreadable ``cfg.json`` or ``metrics.jsonl`` (the message names the file).
    """
    run_dir = Path(run_dir)
    cfg = read_cfg(run_dir)
    info = RunInfo(path=run_dir, label=label or run_dir.name, cfg=cfg)
    for f in sorted((run_dir / RESULTS_DIR).glob("*.json")):
        try:
            r = read_result(run_dir, f.stem)
            info.results[f.stem] = r  # <eval_type_id>.json; core_saebench.json (--compat saebench) stays apart
        except (ResultSchemaError, ValueError, OSError) as e:
            info.bad_results[f.name] = str(e)
    try:
        info.records = read_metrics(run_dir)  # lines cut by an interrupted run are skipped
    except (OSError, UnicodeDecodeError) as e:
        raise SaeError(f"{run_dir / METRICS_FILE} cannot be read ({e.__class__.__name__}): restore it or leave the "
                       "run out of the report") from None
    return info


def unique_labels(dirs: list[Path]) -> list[str]:
    """Unique short labels: the directory name, extended with parents until unique."""
    labels = [d.name for d in dirs]
    depth = 1
    while len(set(labels)) < len(labels) and depth < 6:
        depth += 1
        labels = ["/".join(d.parts[-depth:]) for d in dirs]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} #{i}" for i, lab in enumerate(labels)]
    return labels


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def flatten_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """``{"category.metric": value}`` of a result's scalar ``eval_result_metrics`` (numbers, None, strings)."""
    out: dict[str, Any] = {}
    for cat, ms in result.get("eval_result_metrics", {}).items():
        if not isinstance(ms, dict):
            continue
        for m, v in ms.items():
            if v is None or is_number(v) or isinstance(v, str | bool):
                out[f"{cat}.{m}"] = v
    return out


def metric_value(run: RunInfo, eval_id: str, category: str | None, name: str | None) -> Any:
    """A metric of one evaluation (first category holding ``name``; ``name=None`` → first numeric metric)."""
    r = run.results.get(eval_id)
    if r is None:
        return None
    groups = r.get("eval_result_metrics", {})
    if name is None:
        for ms in groups.values():
            for v in ms.values() if isinstance(ms, dict) else ():
                if is_number(v):
                    return v
        return None
    if category is not None:
        return groups.get(category, {}).get(name)
    for ms in groups.values():
        if isinstance(ms, dict) and name in ms:
            return ms[name]
    return None


def metric_ci(run: RunInfo, eval_id: str, name: str) -> tuple[float, float] | None:
    """The 95 % interval ``(low, high)`` a result stores for ``name`` (``<name>_ci_low/_ci_high``), if any."""
    lo, hi = metric_value(run, eval_id, None, f"{name}_ci_low"), metric_value(run, eval_id, None, f"{name}_ci_high")
    return (float(lo), float(hi)) if is_number(lo) and is_number(hi) else None


def absorption_value(run: RunInfo) -> tuple[str | None, float | None]:
    """(metric name, value) of the run's mean absorption score, preferring :data:`ABSORPTION_KEYS`."""
    r = run.results.get("absorption")
    if r is None:
        return None, None
    flat = {k.split(".", 1)[1]: v for k, v in flatten_metrics(r).items() if is_number(v)}
    for k in ABSORPTION_KEYS:
        if k in flat:
            return k, float(flat[k])
    for k, v in flat.items():
        if "absorption" in k and "std" not in k:
            return k, float(v)
    return None, None


# -- formatting -----------------------------------------------------------------------------------
def fmt_value(v: Any) -> str:
    """A table cell: numbers to 4 significant digits, None → an en dash, text escaped."""
    if v is None:
        return '<td class="na">–</td>'
    if isinstance(v, bool):
        return f"<td>{v}</td>"
    if isinstance(v, int):
        return f'<td class="num">{v:,}</td>'
    if isinstance(v, float):
        if not math.isfinite(v):
            return f'<td class="num">{v}</td>'
        return f'<td class="num">{v:.4g}</td>'
    if isinstance(v, dict | list):
        v = json.dumps(v, separators=(",", ":"))
    return f"<td>{html.escape(str(v))}</td>"
