"""The report's PNG figures (matplotlib object API, Agg canvas, no global pyplot state)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from .runs import RunInfo, absorption_value, flatten_metrics, is_number, metric_value


# -- plots ----------------------------------------------------------------------------------------
def run_colors(n: int) -> list[Any]:
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


def plot_frontier(runs: list[RunInfo], colors: list[Any], out: Path) -> str | None:
    pts = [(i, metric_value(r, "core", None, "l0"), metric_value(r, "core", None, "explained_variance"))
           for i, r in enumerate(runs)]
    pts = [(i, x, y) for i, x, y in pts if is_number(x) and is_number(y)]
    if not pts:
        return None
    fig, ax = _new_figure()
    by_variant: dict[str, list[tuple[float, float]]] = {}
    archs = sorted({r.arch for r in runs})
    markers = dict(zip(archs, "osD^vP*X", strict=False))
    for i, x, y in pts:
        name = runs[i].variant if len(archs) == 1 else f"{runs[i].arch}·{runs[i].variant}"
        ax.scatter([x], [y], color=colors[i], s=50, zorder=3, label=runs[i].label,
                   marker=markers.get(runs[i].arch, "o"))
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        by_variant.setdefault(f"{runs[i].arch}/{runs[i].variant}", []).append((x, y))
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


def plot_absorption(runs: list[RunInfo], colors: list[Any], out: Path) -> tuple[str | None, str | None]:
    pts = []
    key = None
    for i, r in enumerate(runs):
        k, a = absorption_value(r)
        ev = metric_value(r, "core", None, "explained_variance")
        if a is not None and is_number(ev):
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
        if m and is_number(v):
            out[m.group(1)][int(m.group(2))] = float(v)
    return out


def plot_probing(runs: list[RunInfo], colors: list[Any], out: Path) -> str | None:
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
        if d and all(is_number(v) for v in d):
            return np.asarray(d, dtype=np.float64), eval_id
    return None, None


def plot_density(runs: list[RunInfo], colors: list[Any], out: Path) -> tuple[str | None, list[str]]:
    from ..latents import DENSITY_EDGES

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
        if v and all(is_number(x) for x in v):
            return np.asarray(v, dtype=np.float64), "geometry eval"
    try:
        from ..latents import pairwise_cosine_stats
        from ..rundir.sae import SAE

        sae = SAE.load(run.path)
        return pairwise_cosine_stats(sae.W_dec.detach()).max_abs_cos.numpy().astype(np.float64), "weights"
    except (FileNotFoundError, OSError, KeyError, ValueError) as e:
        return None, f"unavailable ({e.__class__.__name__})"


def plot_max_cos(runs: list[RunInfo], colors: list[Any], out: Path
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
        if is_number(v) and math.isfinite(v):
            xs.append(float(r.get("tokens", r.get("step", len(xs)))))
            ys.append(float(v))
    return xs, ys


def plot_training(runs: list[RunInfo], colors: list[Any], out: Path) -> str | None:
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


def plot_stability(runs: list[RunInfo], colors: list[Any], out: Path) -> str | None:
    from ..rundir.metrics import jaccard_series

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
