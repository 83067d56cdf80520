"""Seed-aggregated tables: t-intervals over seeds, Welch intervals of differences, markers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from sae.report.seeds import (
    config_of,
    difference_table_markdown,
    plot_seed_means,
    seed_table_markdown,
    t_interval,
    welch_interval,
)
from sae.rundir.results import write_result


def test_t_interval_matches_the_textbook_formula() -> None:
    vals = [0.80, 0.83, 0.86]
    mean, half = t_interval(vals)
    # mean ± t_{0.975, n−1} · s / √n with t_{0.975, 2} = 4.302652729911275 (tables)
    s = math.sqrt(((0.80 - 0.83) ** 2 + 0 + (0.86 - 0.83) ** 2) / 2)
    assert mean == pytest.approx(0.83) and half == pytest.approx(4.302652729911275 * s / math.sqrt(3))
    assert math.isnan(t_interval([0.5])[1])


def test_welch_interval_matches_scipy_welch_test() -> None:
    a, b = [0.86, 0.865, 0.861, 0.870], [0.880, 0.879, 0.885]
    d, half = welch_interval(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert d == pytest.approx(np.mean(a) - np.mean(b))
    assert d - half == pytest.approx(ci.low) and d + half == pytest.approx(ci.high)


def _run(root, name, ev, l0=32.0):
    d = root / name
    d.mkdir(parents=True)
    (d / "cfg.json").write_text(json.dumps({"variant": name.split("-")[0], "architecture": "topk"}))
    write_result(d, "core", {}, {"reconstruction_quality": {"explained_variance": ev},
                                 "sparsity": {"l0": l0}})


def test_seed_table_groups_seeds_and_marks_only_separated_differences(tmp_path) -> None:
    assert config_of(tmp_path / "ortsae-init_seed=2") == ("ortsae", 2)
    assert config_of(tmp_path / "topk-arch=batchtopk-init_seed=0") == ("topk-arch=batchtopk", 0)
    for s, ev in enumerate([0.880, 0.881, 0.879]):
        _run(tmp_path, f"topk-init_seed={s}", ev)
    for s, ev in enumerate([0.864, 0.865, 0.866]):   # clearly lower
        _run(tmp_path, f"ortsae-init_seed={s}", ev)
    for s, ev in enumerate([0.870, 0.890, 0.880]):   # same mean, wide: not separated
        _run(tmp_path, f"temporal-init_seed={s}", ev)
    table = seed_table_markdown([tmp_path])
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert set(rows) == {"topk", "ortsae", "temporal"}
    assert "| 3 |" in rows["ortsae"] and "0.8650 ± 0.0025 ▼" in rows["ortsae"]
    assert "▲" not in rows["temporal"] and "▼" not in rows["temporal"]
    assert "32.0000 ± 0.0000" in rows["topk"]  # L0 identical across seeds
    diff = difference_table_markdown([tmp_path])
    drows = {line.split(" | ")[0].strip("| "): line for line in diff.splitlines()[2:]}
    assert "-0.0150 ± " in drows["ortsae"] and drows["ortsae"].count(" *") == 1  # EV only (L0 Δ = 0 ± 0)
    assert " *" not in drows["temporal"] and "topk" not in drows
    assert plot_seed_means([tmp_path], tmp_path / "fig", "L0", "expl. var.", "f.png") == "f.png"
    assert (tmp_path / "fig" / "f.png").stat().st_size > 1000


def test_noise_floor_follows_the_pooled_t_formula_and_gates_findings(tmp_path) -> None:
    from sae.report.page import build_report
    from sae.report.seeds import grouped, noise_floor

    for s, ev in enumerate([0.880, 0.881, 0.879]):
        _run(tmp_path, f"topk-init_seed={s}", ev)
    for s, ev in enumerate([0.864, 0.865, 0.866]):   # Δ −0.015: above the floor, a finding
        _run(tmp_path, f"ortsae-init_seed={s}", ev)
    for s, ev in enumerate([0.870, 0.890, 0.880]):   # wide seeds: they set the pooled variance
        _run(tmp_path, f"temporal-init_seed={s}", ev)
    for s, ev in enumerate([0.8835, 0.8845, 0.8840]):  # Δ +0.004: Welch alone would call it, the floor does not
        _run(tmp_path, f"static-init_seed={s}", ev)
    # by hand: s_p² = Σ (n_i − 1) s_i² / Σ (n_i − 1) over the four configurations, df = 8, n = 3
    var = [np.var(v, ddof=1) for v in ([0.880, 0.881, 0.879], [0.864, 0.865, 0.866], [0.870, 0.890, 0.880],
                                       [0.8835, 0.8845, 0.8840])]
    ref = 2.306004135204166 * math.sqrt(sum(2 * v for v in var) / 8) * math.sqrt(2 / 3)  # t_{0.975, 8}
    floor, n = noise_floor(grouped([tmp_path]), "core", None, "explained_variance")
    assert n == 3 and floor == pytest.approx(ref)
    d, h = welch_interval([0.8835, 0.8845, 0.8840], [0.880, 0.881, 0.879])
    assert abs(d) > h and abs(d) < floor  # the case the floor exists for
    diff = difference_table_markdown([tmp_path])
    drows = {line.split(" | ")[0].strip("| "): line for line in diff.splitlines()[2:]}
    assert "(within noise)" in drows["static"] and " *" not in drows["static"]
    assert drows["ortsae"].count(" *") == 1
    assert f"{floor:.4f}" in drows["noise floor (95 %, 3 seeds)"]
    rows = {line.split(" | ")[0].strip("| "): line for line in seed_table_markdown([tmp_path]).splitlines()[2:]}
    assert "▲" not in rows["static"] and "▼" in rows["ortsae"]
    for s in range(3):  # SCR results: the column and the note carry the reliability flag
        for cfg in ("topk", "ortsae"):
            write_result(tmp_path / f"{cfg}-init_seed={s}", "scr", {}, {"scr_metrics": {"scr_metric_threshold_20":
                                                                                         0.1 + 0.01 * s}})
    build_report([tmp_path], tmp_path / "report", n_browse_latents=0)
    md = (tmp_path / "report" / "seeds.md").read_text()
    assert "SCR (thr 20) †" in md and "unreliable at canonical settings (arXiv 2605.18229)" in md
    page = (tmp_path / "report" / "index.html").read_text()
    assert 'id="seeds"' in page and "within noise" in page and "noise floor (95 %, 3 seeds)" in page
    assert "unreliable at canonical settings" in page
