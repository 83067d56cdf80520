"""CI smoke test of ``benchmarks/scale.py --small``: every part runs end to end on the CPU and
reports finite, positive numbers. Speeds are reported, never asserted (they belong to the
benchmark); what is asserted is what does not depend on the machine."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scale_benchmark_small_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # one smaller step shape than --small's two (the step part was half of this test's 95 s); the shape
    # changes no code path the test checks
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--small", "--step-shape",
                           "2304,2048,32,1024", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "small" and res["device"] in ("cpu", "cuda")
    h = res["harvest"]
    assert h["harvest_tokens_per_s"] > 0 and 0 < h["ratio_to_bare"] < 2
    r = res["read"]
    rates = r["tokens_per_s"]
    assert r["d_model"] == 2304 and "1" in rates and all(v > 0 for v in rates.values())
    for w, v in rates.items():  # the reported rate is the median of the interleaved rounds
        assert len(r["tokens_per_s_rounds"][w]) == r["rounds"] >= 3
        assert v == statistics.median(r["tokens_per_s_rounds"][w])
    top = r["tokens_per_s_rounds"][str(r["max_threads"])]
    paired = [a / b for a, b in zip(top, r["tokens_per_s_rounds"]["1"], strict=True)]
    assert r["speedup_max_vs_1_rounds"] == paired and r["speedup_max_vs_1"] == statistics.median(paired)
    for row in res["step"]:
        assert row["tokens_per_s"] > 0 and 0 < row["executed_flop_ratio"] < 1.5
        assert math.isclose(row["flops_per_s"], row["tokens_per_s"] / row["batch"] * (
            2 * row["batch"] * row["d_in"] * row["d_sae"] + 10 * row["batch"] * row["k"] * row["d_in"]), rel_tol=1e-9)
        for key in ("executed_flop_ratio", "auxk_cost_ratio"):  # a median of paired per-round values
            assert len(row[f"{key}_rounds"]) == row["rounds"] >= 3
            assert row[key] == statistics.median(row[f"{key}_rounds"])
    sw = res["sweep"]
    assert sw["n_saes"] == 8
    # one stream decodes the store once for all 8 SAEs (up to read-ahead), 8 runs decode it 8 times
    assert sw["separate_bytes_read"] >= 6 * sw["sweep_bytes_read"] > 0
    assert "read rate / training demand" in proc.stdout
