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
  from the weights with :func:`sae.latents.pairwise_cosine_stats`);
* ``training.png``: loss / explained variance / L0 of the training batches vs tokens;
  ``stability.png``: the pair-selection Jaccard series of ``topk_pairs`` runs, when logged.

Tables: run configurations, headline metrics, the last training record, and per evaluation every
scalar metric (``category.metric`` rows × run columns); ``metrics.csv`` holds the same flattened
metrics, one row per run. A section whose inputs are missing says "not evaluated" instead of failing.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import SaeError
from ..outputs import REPORT_MARKER, build_output, check_output_location, is_sae_report
from .figures import (
    plot_absorption,
    plot_density,
    plot_frontier,
    plot_max_cos,
    plot_probing,
    plot_stability,
    plot_training,
    run_colors,
)
from .runs import NOT_EVALUATED, RunInfo, load_run, metric_value, resolve_run_dirs, unique_labels
from .seeds import (
    difference_rows,
    difference_table_markdown,
    flags_note,
    grouped,
    plot_seed_means,
    seed_rows,
    seed_table_markdown,
)
from .tables import (
    all_metrics_section,
    figure_html,
    headline_markdown,
    headline_section,
    missing_html,
    runs_section,
    table_html,
    training_table,
    write_csv,
)

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


SEEDS_INTRO = ("Mean ± 95 % t-interval over seeds; ▲/▼: the 95 % Welch interval of the difference from the "
               "configuration's base (the architecture a penalty is added to, else topk) excludes 0 and the "
               "difference exceeds the metric's noise floor.")
DIFF_INTRO = ("Differences from the base (95 % Welch; * = excludes 0 and exceeds the noise floor; \"within noise\" = "
              "|Δ| at most the noise floor, the minimum detectable difference at 95 % for this many seeds, from "
              "the seed variance pooled over configurations — last row).")

def _browser_section(runs: list[RunInfo], store: Path | None, n_latents: int, browse_runs: int | None,
                     browse_tokens: int, decode: Callable[[Sequence[int]], str] | None,
                     max_cos: dict[int, np.ndarray]) -> str:
    """One collapsible feature browser per run (the first open); failures become notes."""
    import torch

    from ..rundir.sae import SAE
    from ..store import ActivationStore
    from .browser import BROWSER_CSS, browse, load_decode

    parts = [f"<style>{BROWSER_CSS}</style>"]
    decoders: dict[str, Callable[[Sequence[int]], str]] = {}
    limit = len(runs) if browse_runs is None else min(browse_runs, len(runs))
    if limit == 0:
        return missing_html("feature browser disabled")
    for i, r in enumerate(runs[:limit]):
        src = store if store is not None else r.cfg.get("store_path")
        head = f"{r.label} ({r.variant})"
        if not src or not Path(str(src)).exists():
            body = missing_html(f"no activation store (pass --store; the run's store_path {src!r} does not exist)")
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
                body = missing_html(f"feature browser failed: {e.__class__.__name__}: {e}")
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

    ``out`` is built beside the old report and swapped into place at the end (``outputs.build_output``):
    an existing ``out`` is replaced only when it is a report of ours (``outputs.is_sae_report``), and a
    failure leaves the old report, or nothing, behind. Every run's ``cfg.json`` and ``metrics.jsonl`` is
    read before anything is written.

    Raises:
        SaeError: a path that holds no run; an unreadable ``cfg.json``/``metrics.jsonl`` (the message
            names the file); ``out`` exists, is not empty and is not a report of ours, or is a file.
    """
    try:
        dirs = resolve_run_dirs(run_dirs)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
        raise SaeError(str(e)) from None
    runs = [load_run(d, lab) for d, lab in zip(dirs, unique_labels(dirs), strict=True)]  # all read before writing
    out = Path(out)
    check_output_location(out, "--out")
    with build_output(out, overwrite=True, is_ours=is_sae_report, what="a report written by `sae report`") as target:
        target.mkdir(parents=True, exist_ok=True)
        (target / REPORT_MARKER).write_text(json.dumps({"sae_version": __version__, "created": time.time()}))
        _write_report(runs, target, store, n_browse_latents, browse_runs=browse_runs, browse_tokens=browse_tokens,
                      decode=decode, title=title)
    return out / "index.html"


def _write_report(runs: list[RunInfo], out: Path, store: Path | None, n_browse_latents: int, *,
                  browse_runs: int | None, browse_tokens: int, decode: Callable[[Sequence[int]], str] | None,
                  title: str) -> Path:
    colors = run_colors(len(runs))
    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)

    sections.append(("runs", "Runs", runs_section(runs)))
    sections.append(("headline", "Headline metrics", headline_section(runs)))

    figs = []
    f = plot_frontier(runs, colors, out)
    figs.append(figure_html(f, "L0 vs explained variance, one point per run (label: variant)") if f
                else missing_html(f"L0 / explained-variance frontier: {NOT_EVALUATED} (no core results)"))
    f, key = plot_absorption(runs, colors, out)
    figs.append(figure_html(f, f"{key} vs explained variance") if f
                else missing_html(f"absorption vs explained variance: {NOT_EVALUATED} "
                                  "(needs absorption + core results)"))
    f = plot_probing(runs, colors, out)
    figs.append(figure_html(f, "sparse probing: accuracy of a probe on the top-k latents vs k") if f
                else missing_html(f"sparse probing vs k: {NOT_EVALUATED}"))
    sections.append(("frontier", "Trade-offs", "".join(figs)))

    f, notes = plot_density(runs, colors, out)
    dens = (figure_html(f, "log10 feature density per run") + f'<p class="note">{html.escape("; ".join(notes))}</p>'
            if f else missing_html(f"feature density: {NOT_EVALUATED} (no core or geometry results with densities)"))
    f, notes, max_cos = plot_max_cos(runs, colors, out)
    geo = (figure_html(f, "per-latent max decoder |cos| per run") + f'<p class="note">source: '
           f'{html.escape("; ".join(notes))}</p>' if f else missing_html(f"max decoder cosine: {NOT_EVALUATED}"))
    g_rows = [[r.label, r.variant, metric_value(r, "geometry", "groups", "n_groups"),
               metric_value(r, "geometry", "groups", "median_kappa"),
               metric_value(r, "geometry", "groups", "max_kappa"),
               metric_value(r, "geometry", "learned_groups", "median_kappa"),
               (r.results.get("geometry", {}).get("eval_result_unstructured") or {}).get("group_source")]
              for r in runs if "geometry" in r.results]
    geo += (table_html(["run", "variant", "k-means groups", "median κ", "max κ", "learned-group median κ",
                        "group source"], g_rows) if g_rows
            else missing_html(f"group condition numbers: {NOT_EVALUATED} (run `sae evaluate RUN --eval geometry`)"))
    f = plot_stability(runs, colors, out)
    geo += (figure_html(f, "pair-selection stability (Jaccard of kept-pair sets between consecutive logs)") if f
            else '<p class="note">Pair-selection stability: not logged by these runs (topk_pairs logs it).</p>')
    sections.append(("density", "Feature density", dens))
    sections.append(("geometry", "Feature geometry", geo))

    f = plot_training(runs, colors, out)
    train_html = (figure_html(f, "training batches: loss, explained variance, L0 vs tokens") if f
                  else missing_html(f"training curves: {NOT_EVALUATED} (no metrics.jsonl)"))
    train_html += "<h3>Last training record</h3>" + training_table(runs)
    sections.append(("training", "Training", train_html))

    all_html, flat = all_metrics_section(runs)
    write_csv(out / "metrics.csv", runs, flat)
    (out / "headline.md").write_text(headline_markdown([r.path for r in runs]) if runs else "")
    paths = [r.path for r in runs]
    if any(len(g) > 1 for g in grouped(paths).values()):  # seeds of one configuration: mean ± 95 % t
        seed_head, seed_body = seed_rows(paths)
        diff_head, diff_body = difference_rows(paths)
        note = flags_note(seed_head)
        (out / "seeds.md").write_text(
            SEEDS_INTRO + "\n\n" + seed_table_markdown(paths) + "\n" + DIFF_INTRO + "\n\n"
            + difference_table_markdown(paths) + (f"\n{note}\n" if note else ""))
        sections.append(("seeds", "Seeds", f'<p class="note">{html.escape(SEEDS_INTRO)}</p>'
                         + table_html(seed_head, seed_body) + f'<p class="note">{html.escape(DIFF_INTRO)}</p>'
                         + table_html(diff_head, diff_body)
                         + (f'<p class="note">{html.escape(note)}</p>' if note else "")))
        for x, y, name in (("mean max cos", "expl. var.", "seeds_maxcos_ev.png"),
                           ("expl. var.", "absorption", "seeds_ev_absorption.png"),
                           ("mean max cos", "CE score", "seeds_maxcos_ce.png"),
                           ("GT L0", "GT F1", "seeds_gt_f1_l0.png"),
                           ("GT expl. var.", "GT absorption", "seeds_gt_absorption_ev.png")):
            plot_seed_means(paths, out, x, y, name)
    sections.append(("metrics", "All evaluation metrics",
                     all_html + '<p class="note">Also in <a href="metrics.csv">metrics.csv</a>.</p>'))

    if n_browse_latents > 0:
        sections.append(("browser", "Feature browser",
                         _browser_section(runs, Path(store) if store else None, n_browse_latents, browse_runs,
                                          browse_tokens, decode, max_cos)))
    else:
        sections.append(("browser", "Feature browser", missing_html("feature browser disabled")))

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
