"""Static HTML report comparing SAE runs: tables of every evaluation result, plots, feature browser.

:func:`build_report` reads, for each run directory, ``cfg.json``, ``metrics.jsonl`` (training
curves) and every ``eval_results/<eval>.json``, and writes ``OUT/index.html`` — one self-contained
page (inline CSS, no scripts) — next to the PNG figures it references by relative path
(matplotlib's object API with the Agg canvas; no global pyplot state):

* ``frontier.png``: L0 vs explained variance (core result; one point per run, labelled by variant,
  runs of one variant joined in order of L0);
* ``absorption.png``: mean absorption score vs explained variance (absorption + core results);
* ``probing.png``: sparse-probing test accuracy of the top-k SAE latents vs k
  (``sae_top_{k}_test_accuracy``; dashed: the LLM's ``llm_top_{k}_test_accuracy``);
* ``density.png``: histograms of log10 feature density (core details, else geometry details);
* ``max_cos.png``: histograms of the per-latent max decoder |cos| (geometry details, else computed
  from the weights with :func:`sae.evaluate.geometry.pairwise_cosine_stats`);
* ``training.png``: loss / explained variance / L0 of the training batches vs tokens;
  ``stability.png``: the pair-selection Jaccard series of ``topk_pairs`` runs, when logged.

Tables: run configurations, headline metrics, the last training record, and per evaluation every
scalar metric (``category.metric`` rows × run columns); ``metrics.csv`` holds the same flattened
metrics, one row per run. A section whose inputs are missing says "not evaluated" instead of failing.
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .results import RESULTS_DIR, ResultSchemaError, read_result

__all__ = ["RunInfo", "build_report", "flatten_metrics", "load_run", "resolve_run_dirs"]

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
    ("probe top-1", "sparse_probing", None, ("sae_top_1_test_accuracy",)),
    ("absorption", "absorption", None, ("mean_absorption_fraction_score", "mean_full_absorption_score",
                                        "mean_absorption_score")),
    ("SCR (thr 20)", "scr", None, ("scr_metric_threshold_20", "scr_dir1_threshold_20")),
    ("TPP (thr 20)", "tpp", None, ("tpp_threshold_20_total_metric",)),
    ("unlearning", "unlearning", None, ("unlearning_score",)),
)
ABSORPTION_KEYS = ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_absorption_score")
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263248;color:#fff;padding:1em 2em}header h1{margin:0 0 .2em;font-size:1.5em}
header p{margin:0;color:#c9d3e6;font-size:.9em}
nav{background:#eef1f6;padding:.5em 2em;font-size:.9em;position:sticky;top:0;border-bottom:1px solid #d5dbe5}
nav a{margin-right:1.1em;color:#263248;text-decoration:none}nav a:hover{text-decoration:underline}
main{padding:0 2em 3em;max-width:1400px}
section{margin-top:1.6em}h2{border-bottom:2px solid #263248;padding-bottom:.2em;font-size:1.25em}
h3{font-size:1.05em;margin:1.1em 0 .4em}
table{border-collapse:collapse;font-size:.85em;background:#fff;margin:.4em 0}
th,td{border:1px solid #d9d9d9;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f6}
td.num{text-align:right;font-family:monospace}td.na{color:#aaa;text-align:center}
tr:nth-child(even) td{background:#f7f8fa}
.scroll{overflow-x:auto}
figure{margin:.6em 0;background:#fff;border:1px solid #ddd;padding:.5em;display:inline-block;max-width:100%}
figure img{max-width:100%;height:auto}figcaption{font-size:.85em;color:#555;margin-top:.3em}
.note{color:#666;font-size:.9em}.missing{color:#a33;font-style:italic}
details{margin:.4em 0}summary{cursor:pointer;font-weight:600;padding:.2em 0}
code{background:#f0f0f0;padding:0 3px;border-radius:3px}
"""


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
        return str(self.cfg.get("variant") or self.cfg.get("architecture") or "?")


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


def load_run(run_dir: str | Path, label: str | None = None) -> RunInfo:
    """Read ``cfg.json``, ``metrics.jsonl`` and all ``eval_results/*.json`` of one run (bad files listed)."""
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "cfg.json").read_text()) if (run_dir / "cfg.json").exists() else {}
    info = RunInfo(path=run_dir, label=label or run_dir.name, cfg=cfg)
    for f in sorted((run_dir / RESULTS_DIR).glob("*.json")):
        try:
            r = read_result(run_dir, f.stem)
            info.results[str(r.get("eval_type_id", f.stem))] = r
        except (ResultSchemaError, ValueError, OSError) as e:
            info.bad_results[f.name] = str(e)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                if line.strip():
                    info.records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run
    return info


def _labels(dirs: list[Path]) -> list[str]:
    """Unique short labels: the directory name, extended with parents until unique."""
    labels = [d.name for d in dirs]
    depth = 1
    while len(set(labels)) < len(labels) and depth < 6:
        depth += 1
        labels = ["/".join(d.parts[-depth:]) for d in dirs]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} #{i}" for i, lab in enumerate(labels)]
    return labels


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def flatten_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """``{"category.metric": value}`` of a result's scalar ``eval_result_metrics`` (numbers, None, strings)."""
    out: dict[str, Any] = {}
    for cat, ms in result.get("eval_result_metrics", {}).items():
        if not isinstance(ms, dict):
            continue
        for m, v in ms.items():
            if v is None or _is_num(v) or isinstance(v, str | bool):
                out[f"{cat}.{m}"] = v
    return out


def _metric(run: RunInfo, eval_id: str, category: str | None, name: str | None) -> Any:
    """A metric of one evaluation (first category holding ``name``; ``name=None`` → first numeric metric)."""
    r = run.results.get(eval_id)
    if r is None:
        return None
    groups = r.get("eval_result_metrics", {})
    if name is None:
        for ms in groups.values():
            for v in ms.values() if isinstance(ms, dict) else ():
                if _is_num(v):
                    return v
        return None
    if category is not None:
        return groups.get(category, {}).get(name)
    for ms in groups.values():
        if isinstance(ms, dict) and name in ms:
            return ms[name]
    return None


def _absorption(run: RunInfo) -> tuple[str | None, float | None]:
    """(metric name, value) of the run's mean absorption score, preferring :data:`ABSORPTION_KEYS`."""
    r = run.results.get("absorption")
    if r is None:
        return None, None
    flat = {k.split(".", 1)[1]: v for k, v in flatten_metrics(r).items() if _is_num(v)}
    for k in ABSORPTION_KEYS:
        if k in flat:
            return k, float(flat[k])
    for k, v in flat.items():
        if "absorption" in k and "std" not in k:
            return k, float(v)
    return None, None


# -- formatting -----------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
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


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], first_col_text: bool = True) -> str:
    """An HTML table; the first column of each row is a label (escaped), the rest go through :func:`_fmt`."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = [f"<td>{html.escape(str(row[0]))}</td>" if first_col_text else _fmt(row[0])]
        cells += [_fmt(v) for v in row[1:]]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _missing(text: str) -> str:
    return f'<p class="missing">{html.escape(text)}</p>'


def _figure(name: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


# -- plots ----------------------------------------------------------------------------------------
def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig: Any, out: Path, name: str) -> str:
    fig.savefig(out / name, dpi=110, bbox_inches="tight")
    return name


def _new_figure(w: float = 6.4, h: float = 4.4, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols if ncols > 1 else w, h))
    axes = fig.subplots(1, ncols) if ncols > 1 else fig.subplots()
    return fig, axes


def _plot_frontier(runs: list[RunInfo], colors: list[Any], out: Path) -> str | None:
    pts = [(i, _metric(r, "core", None, "l0"), _metric(r, "core", None, "explained_variance"))
           for i, r in enumerate(runs)]
    pts = [(i, x, y) for i, x, y in pts if _is_num(x) and _is_num(y)]
    if not pts:
        return None
    fig, ax = _new_figure()
    by_variant: dict[str, list[tuple[float, float]]] = {}
    for i, x, y in pts:
        ax.scatter([x], [y], color=colors[i], s=50, zorder=3, label=runs[i].label)
        ax.annotate(runs[i].variant, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        by_variant.setdefault(runs[i].variant, []).append((x, y))
    for xy in by_variant.values():
        if len(xy) > 1:
            xs, ys = zip(*sorted(xy), strict=True)
            ax.plot(xs, ys, color="#999", lw=1, zorder=1)
    xs = [x for _, x, _ in pts]
    if min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale("log")
    ax.set_xlabel("L0 (mean active latents per token, core eval)")
    ax.set_ylabel("explained variance (core eval)")
    ax.set_title("Sparsity vs reconstruction")
    ax.grid(alpha=0.3)
    if len(pts) <= 12:
        ax.legend(fontsize=7, loc="best")
    return _save(fig, out, "frontier.png")


def _plot_absorption(runs: list[RunInfo], colors: list[Any], out: Path) -> tuple[str | None, str | None]:
    pts = []
    key = None
    for i, r in enumerate(runs):
        k, a = _absorption(r)
        ev = _metric(r, "core", None, "explained_variance")
        if a is not None and _is_num(ev):
            pts.append((i, ev, a))
            key = key or k
    if not pts:
        return None, None
    fig, ax = _new_figure()
    for i, x, y in pts:
        ax.scatter([x], [y], color=colors[i], s=50, label=runs[i].label)
        ax.annotate(runs[i].variant, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("explained variance (core eval)")
    ax.set_ylabel(f"{key}\n(absorption eval; lower is better)", fontsize=9)
    ax.set_title("Feature absorption vs reconstruction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out, "absorption.png"), key


_TOPK = re.compile(r"^(sae|llm)_top_(\d+)_test_accuracy$")


def _probing_curves(run: RunInfo) -> dict[str, dict[int, float]]:
    """``{"sae": {k: acc}, "llm": {k: acc}}`` from a sparse_probing result (empty when absent)."""
    out: dict[str, dict[int, float]] = {"sae": {}, "llm": {}}
    r = run.results.get("sparse_probing")
    if r is None:
        return out
    for key, v in flatten_metrics(r).items():
        m = _TOPK.match(key.split(".", 1)[1])
        if m and _is_num(v):
            out[m.group(1)][int(m.group(2))] = float(v)
    return out


def _plot_probing(runs: list[RunInfo], colors: list[Any], out: Path) -> str | None:
    curves = [(i, _probing_curves(r)) for i, r in enumerate(runs)]
    curves = [(i, c) for i, c in curves if c["sae"]]
    if not curves:
        return None
    fig, ax = _new_figure()
    for i, c in curves:
        ks = sorted(c["sae"])
        ax.plot(ks, [c["sae"][k] for k in ks], marker="o", color=colors[i], label=f"{runs[i].label} (SAE)")
    llm = next((c["llm"] for _, c in curves if c["llm"]), None)
    if llm:
        ks = sorted(llm)
        ax.plot(ks, [llm[k] for k in ks], ls="--", color="#555", marker="x", label="LLM top-k neurons")
    ax.set_xscale("log")
    all_ks = sorted({k for _, c in curves for k in c["sae"]} | set(llm or {}))
    ax.set_xticks(all_ks, [str(k) for k in all_ks])
    ax.minorticks_off()
    ax.set_xlabel("k (latents used by the probe)")
    ax.set_ylabel("test accuracy (mean over tasks)")
    ax.set_title("Sparse probing")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out, "probing.png")


def _densities(run: RunInfo) -> tuple[np.ndarray | None, str | None]:
    """Per-latent feature densities and their source (core details, else geometry details)."""
    for eval_id in ("core", "geometry"):
        r = run.results.get(eval_id)
        if r is None:
            continue
        d = [row.get("feature_density") for row in r.get("eval_result_details", []) if isinstance(row, dict)]
        if d and all(_is_num(v) for v in d):
            return np.asarray(d, dtype=np.float64), eval_id
    return None, None


def _plot_density(runs: list[RunInfo], colors: list[Any], out: Path) -> tuple[str | None, list[str]]:
    from .geometry import DENSITY_EDGES

    got = [(i, *_densities(r)) for i, r in enumerate(runs)]
    got = [(i, d, src) for i, d, src in got if d is not None]
    if not got:
        return None, []
    fig, ax = _new_figure(7.2, 4.4)
    edges = np.asarray(DENSITY_EDGES)
    notes = []
    for i, d, src in got:
        alive = d[d > 0]
        n_dead = int((d == 0).sum())
        ax.hist(np.clip(np.log10(alive), edges[0], edges[-1]), bins=edges, histtype="step", lw=1.6,
                color=colors[i], label=f"{runs[i].label} ({n_dead} dead)")
        notes.append(f"{runs[i].label}: {src} eval, {len(d)} latents, {n_dead} dead")
    ax.set_xlabel("log10 feature density (fraction of tokens on which the latent fires)")
    ax.set_ylabel("latents")
    ax.set_title("Feature density (dead latents excluded; rates < 1e-7 in the first bin)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out, "density.png"), notes


def _max_cos(run: RunInfo) -> tuple[np.ndarray | None, str]:
    """Per-latent max decoder |cos|: geometry details, else computed from the saved weights."""
    r = run.results.get("geometry")
    if r is not None:
        v = [row.get("max_decoder_cos") for row in r.get("eval_result_details", []) if isinstance(row, dict)]
        if v and all(_is_num(x) for x in v):
            return np.asarray(v, dtype=np.float64), "geometry eval"
    try:
        from ..train.sae import SAE
        from .geometry import pairwise_cosine_stats

        sae = SAE.load(run.path)
        return pairwise_cosine_stats(sae.W_dec.detach()).max_abs_cos.numpy().astype(np.float64), "weights"
    except (FileNotFoundError, OSError, KeyError, ValueError) as e:
        return None, f"unavailable ({e.__class__.__name__})"


def _plot_max_cos(runs: list[RunInfo], colors: list[Any], out: Path
                  ) -> tuple[str | None, list[str], dict[int, np.ndarray]]:
    got = {i: _max_cos(r) for i, r in enumerate(runs)}
    vals = {i: v for i, (v, _) in got.items() if v is not None}
    notes = [f"{runs[i].label}: {src}" for i, (_, src) in got.items()]
    if not vals:
        return None, notes, {}
    fig, ax = _new_figure(7.2, 4.4)
    for i, v in vals.items():
        ax.hist(v, bins=50, range=(0, 1), histtype="step", lw=1.6, color=colors[i],
                label=f"{runs[i].label} (mean {v.mean():.3f})")
    ax.set_xlabel("max |cos| between a latent's decoder row and any other row")
    ax.set_ylabel("latents")
    ax.set_title("Decoder nearest-neighbour cosine")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out, "max_cos.png"), notes, vals


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if _is_num(v) and math.isfinite(v):
            xs.append(float(r.get("tokens", r.get("step", len(xs)))))
            ys.append(float(v))
    return xs, ys


def _plot_training(runs: list[RunInfo], colors: list[Any], out: Path) -> str | None:
    keys = (("loss", "training loss"), ("explained_variance", "explained variance (batch)"), ("l0", "L0 (batch)"))
    if not any(r.records for r in runs):
        return None
    fig, axes = _new_figure(4.6, 3.8, ncols=3)
    for ax, (key, title) in zip(axes, keys, strict=True):
        positive = True
        for i, r in enumerate(runs):
            xs, ys = _series(r.records, key)
            if xs:
                ax.plot(xs, ys, color=colors[i], lw=1.3, label=r.label)
                positive = positive and min(ys) > 0
        if key == "loss" and positive:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "training.png")


def _plot_stability(runs: list[RunInfo], colors: list[Any], out: Path) -> str | None:
    from .geometry import jaccard_series

    got = [(i, jaccard_series(r.records)) for i, r in enumerate(runs)]
    got = [(i, j) for i, j in got if j is not None]
    if not got:
        return None
    fig, ax = _new_figure()
    for i, j in got:
        xs = [t if t is not None else s for t, s in zip(j["tokens"], j["steps"], strict=True)]
        ax.plot(xs, j["values"], color=colors[i], lw=1.3, label=f"{runs[i].label} ({j['key']})")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("Jaccard overlap of kept pairs, consecutive logs")
    ax.set_title("Pair-selection stability")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out, "stability.png")


# -- sections -------------------------------------------------------------------------------------
def _runs_section(runs: list[RunInfo]) -> str:
    header = ["run", "variant", "variant config", "activation", "k", "d_in", "d_sae", "hook", "training tokens",
              "model", "path"]
    rows = []
    for r in runs:
        c = r.cfg
        rows.append([r.label, r.variant, c.get("variant_config"), c.get("activation_fn_str"), c.get("k"),
                     c.get("d_in"), c.get("d_sae"), c.get("hook_name"), c.get("training_tokens"),
                     c.get("model_name"), str(r.path)])
    bad = [f"{r.label}: {name} — {err}" for r in runs for name, err in r.bad_results.items()]
    notes = "".join(_missing(f"unreadable result skipped: {b}") for b in bad)
    return _table(header, rows) + notes


def _headline_cols(runs: list[RunInfo]) -> list[tuple]:
    """The :data:`HEADLINE` columns that at least one run has results for."""
    return [h for h in HEADLINE if any(h[1] in r.results for r in runs)]


def _headline_values(r: RunInfo, cols: list[tuple]) -> list[Any]:
    """Run ``r``'s value per headline column (the first of a column's metric names it reports)."""
    out: list[Any] = []
    for _, eval_id, cat, names in cols:
        if eval_id == "absorption":
            out.append(_absorption(r)[1])
            continue
        vals = [_metric(r, eval_id, cat, n) for n in names] if names else [_metric(r, eval_id, cat, None)]
        vals = [v for v in vals if v is not None]
        out.append(vals[0] if vals else None)
    return out


def _headline_section(runs: list[RunInfo]) -> str:
    cols = _headline_cols(runs)
    if not cols:
        return _missing(f"{NOT_EVALUATED}: no run has evaluation results (run `sae evaluate` first)")
    rows = [[r.label, r.variant, *_headline_values(r, cols)] for r in runs]
    note = ('<p class="note">– = not evaluated (or not reported). Every metric is in the tables of '
            '<a href="#metrics">All evaluation metrics</a>.</p>')
    return _table(["run", "variant", *[h[0] for h in cols]], rows) + note


def headline_markdown(run_dirs: Sequence[str | Path]) -> str:
    """The headline metrics of :data:`HEADLINE` as a Markdown table (one row per run)."""
    dirs = resolve_run_dirs(run_dirs)
    runs = [load_run(d, label) for d, label in zip(dirs, _labels(dirs), strict=True)]
    cols = _headline_cols(runs)
    lines = ["| run | variant | " + " | ".join(h[0].replace("|", "\\|") for h in cols) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in cols) + " |"]
    for r in runs:
        cells = ["–" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
                 for v in _headline_values(r, cols)]
        lines.append(f"| {r.label} | {r.variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _training_table(runs: list[RunInfo]) -> str:
    keys: list[str] = []
    for r in runs:
        for k, v in (r.records[-1] if r.records else {}).items():
            if _is_num(v) and k not in keys and k not in ("elapsed_s",):
                keys.append(k)
    if not keys:
        return _missing(f"{NOT_EVALUATED}: no metrics.jsonl in any run")
    rows = [[r.label, *[(r.records[-1].get(k) if r.records else None) for k in keys]] for r in runs]
    return _table(["run", *keys], rows)


def _all_metrics_section(runs: list[RunInfo]) -> tuple[str, dict[str, dict[str, Any]]]:
    """Per evaluation, a ``category.metric`` × run table; also returns ``{run label: {eval.cat.metric: v}}``."""
    evals: list[str] = []
    for r in runs:
        evals += [e for e in r.results if e not in evals]
    flat: dict[str, dict[str, Any]] = {r.label: {} for r in runs}
    if not evals:
        return _missing(f"{NOT_EVALUATED}: no eval_results/*.json in any run"), flat
    parts = []
    for e in evals:
        per_run = {r.label: flatten_metrics(r.results[e]) if e in r.results else None for r in runs}
        keys: list[str] = []
        for m in per_run.values():
            keys += [k for k in (m or {}) if k not in keys]
        for lab, m in per_run.items():
            flat[lab].update({f"{e}.{k}": v for k, v in (m or {}).items()})
        missing = [lab for lab, m in per_run.items() if m is None]
        rows = [[k, *[(m or {}).get(k) for m in per_run.values()]] for k in keys]
        note = _missing(f"{NOT_EVALUATED} for: {', '.join(missing)}") if missing else ""
        parts.append(f"<details open><summary>{html.escape(e)} ({len(keys)} metrics)</summary>"
                     f"{_table(['metric', *per_run], rows)}{note}</details>")
    return "".join(parts), flat


def _write_csv(path: Path, runs: list[RunInfo], flat: dict[str, dict[str, Any]]) -> None:
    keys: list[str] = []
    for m in flat.values():
        keys += [k for k in m if k not in keys]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "variant", "path", *keys])
        for r in runs:
            w.writerow([r.label, r.variant, str(r.path), *[flat[r.label].get(k, "") for k in keys]])


def _browser_section(runs: list[RunInfo], store: Path | None, n_latents: int, browse_runs: int | None,
                     browse_tokens: int, decode: Callable[[Sequence[int]], str] | None,
                     max_cos: dict[int, np.ndarray]) -> str:
    """One collapsible feature browser per run (the first open); failures become notes."""
    import torch

    from ..store import ActivationStore
    from ..train.sae import SAE
    from .browser import BROWSER_CSS, browse, load_decode

    parts = [f"<style>{BROWSER_CSS}</style>"]
    decoders: dict[str, Callable[[Sequence[int]], str]] = {}
    limit = len(runs) if browse_runs is None else min(browse_runs, len(runs))
    if limit == 0:
        return _missing("feature browser disabled")
    for i, r in enumerate(runs[:limit]):
        src = store if store is not None else r.cfg.get("store_path")
        head = f"{r.label} ({r.variant})"
        if not src or not Path(str(src)).exists():
            body = _missing(f"no activation store (pass --store; the run's store_path {src!r} does not exist)")
        else:
            try:
                st = ActivationStore(src)
                dec = decode
                if dec is None:
                    key = str(st.attrs.get("model_id"))
                    if key not in decoders:
                        try:
                            decoders[key] = load_decode(st.attrs.get("model_id"), st.attrs.get("tokenizer"))
                        except RuntimeError:
                            decoders[key] = lambda ids: "".join(f"[{t}]" for t in ids)
                    dec = decoders[key]
                sae = SAE.load(r.path)
                mc = torch.from_numpy(max_cos[i]).float() if i in max_cos else None
                res = browse(sae, st, n_latents=n_latents, n_tokens=browse_tokens, decode=dec, max_cos=mc)
                body = f'<p class="note">store <code>{html.escape(str(src))}</code></p>' + res.html
            except Exception as e:  # noqa: BLE001 - one run's browser must not sink the report
                body = _missing(f"feature browser failed: {e.__class__.__name__}: {e}")
        parts.append(f"<details{' open' if i == 0 else ''}><summary>{html.escape(head)}</summary>{body}</details>")
    if limit < len(runs):
        parts.append(f'<p class="note">{len(runs) - limit} more run(s) not browsed.</p>')
    return "".join(parts)


# -- the report -----------------------------------------------------------------------------------
def build_report(run_dirs: list[Path], out: Path, store: Path | None = None, n_browse_latents: int = 12, *,
                 browse_runs: int | None = None, browse_tokens: int = 16384,
                 decode: Callable[[Sequence[int]], str] | None = None, title: str = "SAE comparison report"
                 ) -> Path:
    """Write ``out/index.html`` (+ PNGs and ``metrics.csv``) comparing the runs; return the HTML path.

    Args:
        run_dirs: SAE run directories (or folders of them, see :func:`resolve_run_dirs`).
        out: output folder (created). store: activation store for the feature browser; None → each
            run's ``cfg.json`` ``store_path`` when it exists. n_browse_latents: latents per run in
            the browser (0 disables it). browse_runs: browse only the first N runs (None = all;
            the first is expanded, the others collapsed). browse_tokens: store rows scanned per run.
        decode: token ids → text for the browser (None → the store model's tokenizer).

    Raises:
        FileNotFoundError: a path that holds no run.
    """
    dirs = resolve_run_dirs(run_dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d, lab) for d, lab in zip(dirs, _labels(dirs), strict=True)]
    colors = _colors(len(runs))
    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)

    sections.append(("runs", "Runs", _runs_section(runs)))
    sections.append(("headline", "Headline metrics", _headline_section(runs)))

    figs = []
    f = _plot_frontier(runs, colors, out)
    figs.append(_figure(f, "L0 vs explained variance, one point per run (label: variant)") if f
                else _missing(f"L0 / explained-variance frontier: {NOT_EVALUATED} (no core results)"))
    f, key = _plot_absorption(runs, colors, out)
    figs.append(_figure(f, f"{key} vs explained variance") if f
                else _missing(f"absorption vs explained variance: {NOT_EVALUATED} (needs absorption + core results)"))
    f = _plot_probing(runs, colors, out)
    figs.append(_figure(f, "sparse probing: accuracy of a probe on the top-k latents vs k") if f
                else _missing(f"sparse probing vs k: {NOT_EVALUATED}"))
    sections.append(("frontier", "Trade-offs", "".join(figs)))

    f, notes = _plot_density(runs, colors, out)
    dens = (_figure(f, "log10 feature density per run") + f'<p class="note">{html.escape("; ".join(notes))}</p>'
            if f else _missing(f"feature density: {NOT_EVALUATED} (no core or geometry results with densities)"))
    f, notes, max_cos = _plot_max_cos(runs, colors, out)
    geo = (_figure(f, "per-latent max decoder |cos| per run") + f'<p class="note">source: '
           f'{html.escape("; ".join(notes))}</p>' if f else _missing(f"max decoder cosine: {NOT_EVALUATED}"))
    g_rows = [[r.label, r.variant, _metric(r, "geometry", "groups", "n_groups"),
               _metric(r, "geometry", "groups", "median_kappa"), _metric(r, "geometry", "groups", "max_kappa"),
               (r.results.get("geometry", {}).get("eval_result_unstructured") or {}).get("group_source")]
              for r in runs if "geometry" in r.results]
    geo += (_table(["run", "variant", "groups", "median κ", "max κ", "group source"], g_rows) if g_rows
            else _missing(f"group condition numbers: {NOT_EVALUATED} (run `sae evaluate --evals geometry`)"))
    f = _plot_stability(runs, colors, out)
    geo += (_figure(f, "pair-selection stability (Jaccard of kept-pair sets between consecutive logs)") if f
            else '<p class="note">Pair-selection stability: not logged by these runs (topk_pairs logs it).</p>')
    sections.append(("density", "Feature density", dens))
    sections.append(("geometry", "Feature geometry", geo))

    f = _plot_training(runs, colors, out)
    train_html = (_figure(f, "training batches: loss, explained variance, L0 vs tokens") if f
                  else _missing(f"training curves: {NOT_EVALUATED} (no metrics.jsonl)"))
    train_html += "<h3>Last training record</h3>" + _training_table(runs)
    sections.append(("training", "Training", train_html))

    all_html, flat = _all_metrics_section(runs)
    _write_csv(out / "metrics.csv", runs, flat)
    (out / "headline.md").write_text(headline_markdown([r.path for r in runs]) if runs else "")
    sections.append(("metrics", "All evaluation metrics",
                     all_html + '<p class="note">Also in <a href="metrics.csv">metrics.csv</a>.</p>'))

    if n_browse_latents > 0:
        sections.append(("browser", "Feature browser",
                         _browser_section(runs, Path(store) if store else None, n_browse_latents, browse_runs,
                                          browse_tokens, decode, max_cos)))
    else:
        sections.append(("browser", "Feature browser", _missing("feature browser disabled")))

    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    nav = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{html.escape(t)}</h2>{h}</section>' for a, t, h in sections)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f"<body><header><h1>{html.escape(title)}</h1><p>{len(runs)} run(s) · generated {stamp}</p></header>"
            f"<nav>{nav}</nav><main>{body}</main></body></html>\n")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
