"""Reading a run's training log, ``metrics.jsonl``: the one tolerant reader every stage uses."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .format import METRICS_FILE


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` in order; ``[]`` when the file is absent.

    Tolerant: a line that does not parse (a run killed in the middle of writing it) or that is not
    a JSON object is skipped.

    Raises:
        OSError: the file exists but cannot be read.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def last_value(records: list[dict[str, Any]], key: str) -> float | None:
    """The last finite number logged under ``key`` (e.g. ``dead_fraction``), or None."""
    for rec in reversed(records):
        v = rec.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def jaccard_series(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Pair-selection stability over training from ``metrics.jsonl`` records, or None.

    Uses ``penalty/jaccard`` if logged, else the first key containing ``jaccard``. Returns
    ``{"key", "steps", "tokens", "values", "mean", "final", "min"}`` over the records with a
    finite value (the Jaccard overlap |A∩B|/|A∪B| of kept-pair sets at consecutive logged steps).
    """
    keys = [k for r in records for k in r if "jaccard" in k.lower()]
    if not keys:
        return None
    key = "penalty/jaccard" if "penalty/jaccard" in keys else keys[0]
    steps, tokens, values = [], [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(r.get("step"))
            tokens.append(r.get("tokens"))
            values.append(float(v))
    if not values:
        return None
    return {"key": key, "steps": steps, "tokens": tokens, "values": values, "mean": float(np.mean(values)),
            "final": values[-1], "min": float(np.min(values))}
