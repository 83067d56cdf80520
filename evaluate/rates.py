"""What ``sae evaluate`` is about to do, and how long it took here before: the plan printed first.

After each evaluation the seconds it took per SAE are recorded in ``<cache>/eval_rates.json``
(``$SAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/sae``, else ``~/.cache/sae``), keyed by evaluation and
host; the plan multiplies them by the number of SAEs. An evaluation never timed on this machine is
shown as "not yet timed here". The time depends on the settings (tokens, words, questions), so the
estimate is the last run's, not a promise.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path

from ..model import cache_dir
from ..outputs import write_json_atomic


def _rates_file() -> Path:
    return cache_dir() / "eval_rates.json"


def _read() -> dict:
    try:
        data = json.loads(_rates_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_rate(name: str, seconds_per_sae: float) -> None:
    """Remember that evaluation ``name`` took ``seconds_per_sae`` per SAE on this host (best effort:
    an unwritable cache only loses the estimate)."""
    data = _read()
    data.setdefault(socket.gethostname(), {})[name] = {"seconds_per_sae": round(float(seconds_per_sae), 2),
                                                      "measured": time.strftime("%Y-%m-%d")}
    path = _rates_file()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data, indent=1, sort_keys=True)


def estimate(name: str) -> float | None:
    """Seconds per SAE that ``name`` took here last time, or None."""
    rec = _read().get(socket.gethostname(), {}).get(name)
    return float(rec["seconds_per_sae"]) if isinstance(rec, dict) and "seconds_per_sae" in rec else None


def _fmt(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def plan_lines(evals: list[str], runs: list[str]) -> list[str]:
    """The plan as text lines: one per evaluation with its estimate, and the total."""
    lines = [f"plan: {len(evals)} evaluation(s) × {len(runs)} SAE(s): {', '.join(evals)}"]
    total, known = 0.0, True
    for name in evals:
        per = estimate(name)
        if per is None:
            known = False
            lines.append(f"  {name}: not yet timed here")
        else:
            total += per * len(runs)
            lines.append(f"  {name}: ~{_fmt(per)} per SAE here last time → ~{_fmt(per * len(runs))}")
    lines.append(f"  estimated total: ~{_fmt(total)}" + ("" if known else " plus the evaluations not yet timed"))
    return lines


def print_plan(evals: list[str], runs: list[str]) -> None:
    """Print :func:`plan_lines` (the first thing ``sae evaluate`` says)."""
    for line in plan_lines(evals, runs):
        print(line, flush=True)
