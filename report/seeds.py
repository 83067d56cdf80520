"""Seed-aggregated results: runs that differ only in their initialisation seed (``sae sweep --seeds``
names them ``<config>-init_seed=<n>``) become one row, mean ± the 95 % t-interval over the seeds.

Each configuration is also compared with a baseline configuration (default ``topk``): the 95 %
Welch interval of the difference of means (Welch–Satterthwaite degrees of freedom). A cell is marked
``▲``/``▼`` only when that interval excludes 0 *and* the difference exceeds the metric's noise
floor — the rule the docs use to call a difference a result; every unmarked difference is a hint
at most.

Noise floor (:func:`noise_floor`): per metric, the minimum detectable difference at 95 % of two
configurations with ``n`` seeds each, ``t_{0.975, df} · s_p · √(2/n)``, where ``s_p²`` is the seed
variance pooled over every configuration of the table (``Σ (n_i − 1) s_i² / Σ (n_i − 1)``, ``df`` =
``Σ (n_i − 1)``) and ``n`` the median number of seeds per configuration: the half-width a
two-sample t interval of a difference has at this seed count. A difference no larger is printed
"within noise", never as a finding (this does not include power: a true difference of that size
is found only half the time; × ≈ 1.5 for 80 % power at 3 seeds).

SCR and TPP columns carry † (:data:`~sae.report.runs.UNRELIABLE`): unreliable at their canonical
settings (arXiv 2605.18229). The seeds share the data order and the
held-out set, so these intervals measure initialisation noise only; the core result files also
carry a document-bootstrap interval for the held-out sample (shown separately).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from scipy import stats

from .runs import UNRELIABLE, UNRELIABLE_NOTE, RunInfo, absorption_value, load_run, metric_value, resolve_run_dirs

SEED_RE = re.compile(r"(^|-)init_seed=(\d+)")

METRICS: tuple[tuple[str, str, str | None, str], ...] = (
    # (column, eval, category, metric); "absorption" is resolved by absorption_value
    ("L0", "core", None, "l0"),
    ("expl. var.", "core", None, "explained_variance"),
    ("CE score", "core", None, "ce_loss_score"),
    ("KL score", "core", None, "kl_div_score"),
    ("mean max cos", "geometry", "decoder", "mean_max_cos"),
    ("median κ (k-means)", "geometry", "groups", "median_kappa"),
    ("sae-probes top-1", "sae_probes", "sae", "sae_top_1_test_accuracy"),
    ("sae-probes top-16", "sae_probes", "sae", "sae_top_16_test_accuracy"),
    ("offline probe top-1", "sparse_probing", None, "sae_top_1_test_accuracy"),
    ("absorption", "absorption", None, "absorption"),
    ("full absorption", "absorption", "mean", "mean_full_absorption_score"),
    ("split features", "absorption", "mean", "mean_num_split_features"),
    ("SCR (thr 20) †", "scr", None, "scr_metric_threshold_20"),
    ("TPP (thr 20) †", "tpp", None, "tpp_threshold_20_total_metric"),
    ("unlearning", "unlearning", "unlearning", "unlearning_score"),
    # ground truth on a synthetic store (sae store synth; evaluate/ground_truth.py)
    ("GT L0", "ground_truth", "sparsity", "sae_l0"),
    ("GT F1", "ground_truth", "classification", "f1_score"),
    ("GT MCC", "ground_truth", "recovery", "mcc"),
    ("GT uniqueness", "ground_truth", "recovery", "uniqueness"),
    ("GT expl. var.", "ground_truth", "reconstruction", "explained_variance"),
    ("GT absorption", "ground_truth", "absorption", "absorption_rate"),
    ("GT dead", "ground_truth", "sparsity", "dead_latents"),
)


def config_of(run_dir: Path) -> tuple[str, int | None]:
    """``(configuration label, seed)`` from a run directory's name (seed None when it has none)."""
    m = SEED_RE.search(run_dir.name)
    if not m:
        return run_dir.name, None
    label = (run_dir.name[:m.start()] + run_dir.name[m.end():]).strip("-")
    return label or run_dir.name, int(m.group(2))


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, half-width)`` of the 95 % Student-t interval; half-width NaN for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def welch_interval(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``(mean(a) − mean(b), half-width)`` of the 95 % Welch interval (NaN with < 2 values per side;
    0 when both sides have no spread)."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return sum(a) / na - sum(b) / nb, math.nan
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((v - ma) ** 2 for v in a) / (na - 1) / na
    vb = sum((v - mb) ** 2 for v in b) / (nb - 1) / nb
    se = math.sqrt(va + vb)
    if se == 0:
        return ma - mb, 0.0
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    return ma - mb, float(stats.t.ppf(0.975, df)) * se


def _value(run: RunInfo, eval_id: str, category: str | None, name: str) -> float | None:
    v = absorption_value(run)[1] if name == "absorption" else metric_value(run, eval_id, category, name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def grouped(run_dirs: Sequence[str | Path]) -> dict[str, list[RunInfo]]:
    """Runs grouped by configuration (name without its seed), in first-seen order."""
    out: dict[str, list[RunInfo]] = {}
    for d in resolve_run_dirs(run_dirs):
        out.setdefault(config_of(d)[0], []).append(load_run(d))
    return out


def baseline_of(label: str, labels: Sequence[str], default: str = "topk") -> str:
    """The configuration ``label`` is compared with: the longest other label it starts with followed by
    ``-`` (``batchtopk-ortsae`` → ``batchtopk``; a sweep's penalty-free run is named after its
    architecture), else ``default``."""
    prefixes = [b for b in labels if b != label and label.startswith(b + "-")]
    return max(prefixes, key=len) if prefixes else default


def noise_floor(groups: dict[str, list[RunInfo]], eval_id: str, category: str | None, name: str
                ) -> tuple[float, int] | None:
    """``(minimum detectable difference at 95 %, seeds per configuration)`` of one metric over
    ``groups`` (module doc); None when no configuration has two seeds of it."""
    ss, df, counts = 0.0, 0, []
    for runs in groups.values():
        vals = [v for v in (_value(r, eval_id, category, name) for r in runs) if v is not None]
        if len(vals) >= 2:
            m = sum(vals) / len(vals)
            ss += sum((v - m) ** 2 for v in vals)
            df += len(vals) - 1
            counts.append(len(vals))
    if df == 0:
        return None
    n = sorted(counts)[len(counts) // 2]
    return float(stats.t.ppf(0.975, df)) * math.sqrt(ss / df) * math.sqrt(2 / n), n


def _columns(groups: dict[str, list[RunInfo]], labels: Sequence[str]) -> list[tuple[str, str, str | None, str]]:
    return [(title, e, c, n) for title, e, c, n in METRICS
            if any(_value(r, e, c, n) is not None for lab in labels for r in groups.get(lab, []))]


def seed_rows(run_dirs: Sequence[str | Path], baseline: str = "topk", digits: int = 4
              ) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the seed table: one row per configuration, ``mean ± half-width`` (95 % t over
    seeds) per metric, ``▲``/``▼`` where the Welch interval of the difference from its base excludes 0
    and the difference exceeds the noise floor. Metrics no run of the table has are left out."""
    groups = grouped(run_dirs)
    cols = _columns(groups, list(groups))
    floors = {(e, c, n): noise_floor(groups, e, c, n) for _t, e, c, n in cols}
    rows = []
    for label, runs in groups.items():
        ref = baseline_of(label, list(groups), baseline)
        base = groups.get(ref)
        cells = [label, str(len(runs))]
        for _title, e, c, n in cols:
            vals = [v for v in (_value(r, e, c, n) for r in runs) if v is not None]
            if not vals:
                cells.append("–")
                continue
            mean, half = t_interval(vals)
            cell = f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")
            if len(vals) < len(runs):
                cell += f" (n={len(vals)})"
            if base is not None and label != ref:
                bvals = [v for v in (_value(r, e, c, n) for r in base) if v is not None]
                if bvals:
                    d, h = welch_interval(vals, bvals)
                    floor = floors[(e, c, n)]
                    if not math.isnan(h) and abs(d) > h and (floor is None or abs(d) > floor[0]):
                        cell += " ▲" if d > 0 else " ▼"
            cells.append(cell)
        rows.append(cells)
    return ["configuration", "seeds", *[c[0] for c in cols]], rows


def difference_rows(run_dirs: Sequence[str | Path], baseline: str = "topk", digits: int = 4
                    ) -> tuple[list[str], list[list[str]]]:
    """Header and rows of each configuration's difference from its base (:func:`baseline_of`):
    ``Δ ± half-width`` (95 % Welch) per metric, ``*`` where it excludes 0 and exceeds the noise floor,
    "within noise" where ``|Δ|`` is at most the floor; the last row gives each metric's noise floor."""
    groups = grouped(run_dirs)
    refs = {label: baseline_of(label, list(groups), baseline) for label in groups}
    cols = _columns(groups, sorted(set(refs.values())))
    if not cols:
        return [], []
    floors = [noise_floor(groups, e, c, n) for _t, e, c, n in cols]
    rows = []
    for label, runs in groups.items():
        base = groups.get(refs[label])
        if label == refs[label] or base is None:
            continue
        cells = [label, refs[label]]
        for (_title, e, c, n), floor in zip(cols, floors, strict=True):
            vals = [v for v in (_value(r, e, c, n) for r in runs) if v is not None]
            bvals = [v for v in (_value(r, e, c, n) for r in base) if v is not None]
            if not vals or not bvals:
                cells.append("–")
                continue
            d, h = welch_interval(vals, bvals)
            cell = f"{d:+.{digits}f}" + ("" if math.isnan(h) else f" ± {h:.{digits}f}")
            if floor is not None and abs(d) <= floor[0]:
                cell += " (within noise)"
            elif not math.isnan(h) and abs(d) > h:
                cell += " *"
            cells.append(cell)
        rows.append(cells)
    seeds = sorted({f[1] for f in floors if f is not None})
    label = f"noise floor (95 %, {'/'.join(map(str, seeds)) or '?'} seeds)"
    rows.append([label, "", *["–" if f is None else f"{f[0]:.{digits}f}" for f in floors]])
    return ["configuration", "vs", *[f"Δ {c[0]}" for c in cols]], rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    if not header:
        return ""
    lines = ["| " + " | ".join(header) + " |", "| --- | " + ("--- |" if header[1] == "vs" else "---: |")
             + " ---: |" * (len(header) - 2)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def seed_table_markdown(run_dirs: Sequence[str | Path], baseline: str = "topk", digits: int = 4) -> str:
    """:func:`seed_rows` as a markdown table."""
    return _markdown(*seed_rows(run_dirs, baseline, digits))


def difference_table_markdown(run_dirs: Sequence[str | Path], baseline: str = "topk", digits: int = 4) -> str:
    """:func:`difference_rows` as a markdown table (its last row: the noise floors)."""
    return _markdown(*difference_rows(run_dirs, baseline, digits))


def flags_note(header: Sequence[str]) -> str:
    """The † note when a column of ``header`` belongs to an unreliable evaluation, else ''."""
    titles = {t for t, e, _c, _n in METRICS if e in UNRELIABLE}
    return UNRELIABLE_NOTE if any(h in titles or h.removeprefix("Δ ") in titles for h in header) else ""


def plot_seed_means(run_dirs: Sequence[str | Path], out: Path, x: str, y: str, name: str) -> str | None:
    """Scatter of configuration means with 95 % t error bars on both axes (columns ``x``, ``y`` of
    :data:`METRICS`), saved as ``out/name``; None when fewer than two configurations have both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = {title: (e, c, n) for title, e, c, n in METRICS}
    pts = []
    for label, runs in grouped(run_dirs).items():
        xs = [v for v in (_value(r, *spec[x]) for r in runs) if v is not None]
        ys = [v for v in (_value(r, *spec[y]) for r in runs) if v is not None]
        if xs and ys:
            pts.append((label, len(runs), *t_interval(xs), *t_interval(ys)))
    if len(pts) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, n, mx, hx, my, hy in pts:
        ax.errorbar([mx], [my], xerr=None if math.isnan(hx) else [hx], yerr=None if math.isnan(hy) else [hy],
                    fmt="o", capsize=3, label=f"{label} ({n} seeds)")
        ax.annotate(label, (mx, my), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{y} vs {x}: mean ± 95 % t-interval over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return name
