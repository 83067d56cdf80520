"""Progress without a terminal: plain lines at a steady interval, done/total, rate and ETA."""

from __future__ import annotations

from sae import progress


def test_plain_progress_lines_when_stdout_is_not_a_terminal(capsys, monkeypatch) -> None:
    monkeypatch.setattr(progress, "PLAIN_STEP", 0.25)
    with progress.progress_bar(unit="tok") as bar:
        task = bar.add_task("train topk", total=1000)
        for i in range(0, 1000, 50):
            bar.update(task, completed=i + 50)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("train topk: 50/1,000 tok (5.0 %), ")
    assert lines[-1].startswith("train topk: 1,000/1,000 tok (100.0 %)")
    assert all("tok/s since this loop started, ETA " in ln for ln in lines)
    assert 4 <= len(lines) <= 6  # every 25 % (and the end), not every update


def test_quiet_prints_nothing(capsys) -> None:
    with progress.progress_bar(quiet=True) as bar:
        task = bar.add_task("x", total=10)
        bar.update(task, completed=10)
    assert capsys.readouterr().out == ""
