"""``benchmarks/loader_ab.py`` end to end on a tiny store: both versions are measured, the
temporary worktree it adds is removed again, and a bad revision or store is one ``error:`` line
before anything is created. Speeds are printed, never asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import planted_features, write_store

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "loader_ab.py"


def _worktrees() -> list[str]:
    out = subprocess.run(["git", "-C", str(ROOT), "worktree", "list", "--porcelain"], capture_output=True, text=True)
    return [ln for ln in out.stdout.splitlines() if ln.startswith("worktree ")]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env)


def test_loader_ab_measures_both_versions_and_removes_its_worktree(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    x, _ = planted_features(4096, d_in=16, n_features=32, seed=0)
    store = write_store(tmp_path / "tiny.zarr", x, chunk_tokens=1024)
    before = _worktrees()
    proc = _run("--base", "HEAD", "--store", str(store), "--threads", "1", "--rounds", "1",
                "--batch", "256", "--batches", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("tiny.zarr, 1 decode thread(s)")]
    assert len(line) == 1
    m = re.search(r"base ([\d,]+) .*this ([\d,]+) .*this / base ([\d.]+)x", line[0])
    assert m and all(float(g.replace(",", "")) > 0 for g in m.groups())
    assert _worktrees() == before  # the worktree it added is gone, nothing else changed


def test_loader_ab_bad_input_is_one_error_line(tmp_path):
    before = _worktrees()
    for args, what in ((["--base", "no-such-rev-xyz"], "is not a commit"),
                       (["--base", "HEAD", "--store", str(tmp_path / "missing.zarr")], "no store at")):
        proc = _run(*args)
        assert proc.returncode != 0
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and what in lines[0], proc.stderr
    assert _worktrees() == before
