"""The report's HTML tables (run configurations, headline metrics, training, every evaluation) and
``metrics.csv``."""

from __future__ import annotations

import csv
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runs import (
    HEADLINE,
    NOT_EVALUATED,
    UNRELIABLE,
    UNRELIABLE_NOTE,
    RunInfo,
    absorption_value,
    flatten_metrics,
    fmt_value,
    is_number,
    load_run,
    metric_ci,
    metric_value,
    resolve_run_dirs,
    unique_labels,
)


def table_html(header: Sequence[str], rows: Sequence[Sequence[Any]], first_col_text: bool = True) -> str:
    """An HTML table; the first column of each row is a label (escaped), the rest go through :func:`fmt_value`."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = [f"<td>{html.escape(str(row[0]))}</td>" if first_col_text else fmt_value(row[0])]
        cells += [fmt_value(v) for v in row[1:]]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def missing_html(text: str) -> str:
    return f'<p class="missing">{html.escape(text)}</p>'


def figure_html(name: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


# -- sections -------------------------------------------------------------------------------------
def runs_section(runs: list[RunInfo]) -> str:
    header = ["run", "variant", "variant config", "arch", "saved as", "k", "d_in", "d_sae", "hook", "training tokens",
              "model", "path"]
    rows = []
    for r in runs:
        c = r.cfg
        rows.append([r.label, r.variant, c.get("variant_config"), r.arch, c.get("architecture"), c.get("k"),
                     c.get("d_in"), c.get("d_sae"), c.get("hook_name"), c.get("training_tokens"),
                     c.get("model_name"), str(r.path)])
    bad = [f"{r.label}: {name} — {err}" for r in runs for name, err in r.bad_results.items()]
    notes = "".join(missing_html(f"unreadable result skipped: {b}") for b in bad)
    return table_html(header, rows) + notes


def _headline_cols(runs: list[RunInfo]) -> list[tuple]:
    """The :data:`HEADLINE` columns that at least one run has results for."""
    return [h for h in HEADLINE if any(h[1] in r.results for r in runs)]


def _headline_values(r: RunInfo, cols: list[tuple]) -> list[Any]:
    """Run ``r``'s value per headline column (the first of a column's metric names it reports)."""
    out: list[Any] = []
    for _, eval_id, cat, names in cols:
        if eval_id == "absorption":
            out.append(absorption_value(r)[1])
            continue
        vals = [(metric_value(r, eval_id, cat, n), n) for n in names] if names else [
            (metric_value(r, eval_id, cat, None), None)]
        vals = [(v, n) for v, n in vals if v is not None]
        if not vals:
            out.append(None)
            continue
        v, n = vals[0]
        ci = metric_ci(r, eval_id, n) if n else None
        out.append(f"{v:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]" if ci is not None and isinstance(v, float) else v)
    return out


def headline_section(runs: list[RunInfo]) -> str:
    cols = _headline_cols(runs)
    if not cols:
        return missing_html(f"{NOT_EVALUATED}: no run has evaluation results (run `sae evaluate` first)")
    rows = [[r.label, r.variant, *_headline_values(r, cols)] for r in runs]
    note = ('<p class="note">– = not evaluated (or not reported); [a, b] = 95 % interval (bootstrap over held-out '
            'documents). Every metric is in the tables of '
            '<a href="#metrics">All evaluation metrics</a>.</p>')
    if any(h[1] in UNRELIABLE for h in cols):
        note += f'<p class="note">{html.escape(UNRELIABLE_NOTE)}</p>'
    return table_html(["run", "variant", *[h[0] for h in cols]], rows) + note


def headline_markdown(run_dirs: Sequence[str | Path]) -> str:
    """The headline metrics of :data:`HEADLINE` as a Markdown table (one row per run)."""
    dirs = resolve_run_dirs(run_dirs)
    runs = [load_run(d, label) for d, label in zip(dirs, unique_labels(dirs), strict=True)]
    cols = _headline_cols(runs)
    lines = ["| run | variant | " + " | ".join(h[0].replace("|", "\\|") for h in cols) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in cols) + " |"]
    for r in runs:
        cells = ["–" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
                 for v in _headline_values(r, cols)]
        lines.append(f"| {r.label} | {r.variant} | " + " | ".join(cells) + " |")
    if any(h[1] in UNRELIABLE for h in cols):
        lines += ["", UNRELIABLE_NOTE]
    return "\n".join(lines) + "\n"


def training_table(runs: list[RunInfo]) -> str:
    keys: list[str] = []
    for r in runs:
        for k, v in (r.records[-1] if r.records else {}).items():
            if is_number(v) and k not in keys and k not in ("elapsed_s",):
                keys.append(k)
    if not keys:
        return missing_html(f"{NOT_EVALUATED}: no metrics.jsonl in any run")
    rows = [[r.label, *[(r.records[-1].get(k) if r.records else None) for k in keys]] for r in runs]
    return table_html(["run", *keys], rows)


def all_metrics_section(runs: list[RunInfo]) -> tuple[str, dict[str, dict[str, Any]]]:
    """Per evaluation, a ``category.metric`` × run table; also returns ``{run label: {eval.cat.metric: v}}``."""
    evals: list[str] = []
    for r in runs:
        evals += [e for e in r.results if e not in evals]
    flat: dict[str, dict[str, Any]] = {r.label: {} for r in runs}
    if not evals:
        return missing_html(f"{NOT_EVALUATED}: no eval_results/*.json in any run"), flat
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
        note = missing_html(f"{NOT_EVALUATED} for: {', '.join(missing)}") if missing else ""
        parts.append(f"<details open><summary>{html.escape(e)} ({len(keys)} metrics)</summary>"
                     f"{table_html(['metric', *per_run], rows)}{note}</details>")
    return "".join(parts), flat


def write_csv(path: Path, runs: list[RunInfo], flat: dict[str, dict[str, Any]]) -> None:
    keys: list[str] = []
    for m in flat.values():
        keys += [k for k in m if k not in keys]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "variant", "path", *keys])
        for r in runs:
            w.writerow([r.label, r.variant, str(r.path), *[flat[r.label].get(k, "") for k in keys]])
