"""``sae evaluate --log-to``: each evaluation's metrics added to the SAE's tracker runs.

The tracker runs are the ones its training opened (``cfg.json`` → ``tracking``, see
:mod:`sae.tracking`); an SAE without them (imported, or trained without ``--log-to``, or without that
tracker) gets new runs, whose refs are kept in ``tracking.json`` beside its ``eval_results/`` (``cfg.json``
is never rewritten) so that later evaluations go to the same runs.
Every numeric metric of ``eval_results/<evaluation>.json`` (``eval_result_metrics``, interval bounds
included) is logged as ``eval/<evaluation>/<group>/<metric>`` (SAEBench's metric groups) at the SAE's last
training step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..rundir.format import CFG_FILE
from ..tracking import RunTrackers, TrackingConfig

EVAL_TRACKING_FILE = "tracking.json"
"""``{backend: ref}`` of the tracker runs ``sae evaluate --log-to`` opened for an SAE whose ``cfg.json``
records none for that backend (beside ``eval_results/``)."""


def _read_refs(path: Path) -> dict[str, Any]:
    try:
        refs = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return refs if isinstance(refs, dict) else {}


def _write_refs(path: Path, refs: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(refs, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _tags(cfg: dict[str, Any]) -> dict[str, Any]:
    """The tags training gives its tracker runs (arch, variant, seed, hook), from a ``cfg.json`` (ours, or
    an imported one, which has fewer)."""
    settings = cfg.get("run_settings") or {}
    seed = settings.get("init_seed") if settings.get("init_seed") is not None else settings.get("seed")
    return {"arch": cfg.get("trained_architecture") or cfg.get("architecture"), "variant": cfg.get("variant"),
            "seed": seed, "hook": cfg.get("hook_name")}


def attach_results(run_dirs: list[Path], evaluated: list[str], tracking: TrackingConfig,
                   results_dir: Path | None = None) -> None:
    """Log the results of ``evaluated`` (evaluation ids) of each run to its tracker runs (never raises for
    a tracker failure: one ``warning:`` line, see :class:`~sae.tracking.RunTrackers`). All runs are sent
    first and then finished together: the trackers get ``tracking.timeout_s`` in all."""
    opened: list[tuple[RunTrackers, dict[str, Any], Path]] = []
    for run in run_dirs:
        run = Path(run)
        cfg = json.loads((run / CFG_FILE).read_text())
        home = results_dir / run.name if results_dir is not None else run
        where = home / "eval_results"
        metrics: dict[str, float] = {}
        for ev in evaluated:
            path = where / f"{ev}.json"
            if not path.is_file():
                continue
            groups = json.loads(path.read_text()).get("eval_result_metrics", {})
            for gname, group in groups.items():
                for name, value in group.items() if isinstance(group, dict) else ():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        metrics[f"eval/{ev}/{gname}/{name}"] = float(value)
        if not metrics:
            continue
        trained = cfg.get("tracking") or {}
        earlier = _read_refs(home / EVAL_TRACKING_FILE)
        tags = {key: str(value) for key, value in _tags(cfg).items() if value is not None}
        trackers = RunTrackers.reopen(tracking, {**earlier, **trained}, run.name, config=cfg, tags=tags)
        trackers.log(metrics, int(cfg.get("training_steps") or 0))
        trackers.close()
        opened.append((trackers, {**earlier, **trained}, home))
    for trackers, known, home in opened:
        refs = trackers.finish()
        new = {name: ref for name, ref in refs.items() if name not in known}
        if new:
            _write_refs(home / EVAL_TRACKING_FILE, {**_read_refs(home / EVAL_TRACKING_FILE), **new})


__all__ = ["EVAL_TRACKING_FILE", "attach_results"]
