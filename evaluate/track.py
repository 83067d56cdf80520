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
from pathlib import Path
from typing import Any

from ..outputs import write_json_atomic
from ..rundir.format import CFG_FILE
from ..tracking import RunTrackers, TrackingConfig, run_tags

EVAL_TRACKING_FILE = "tracking.json"
"""``{backend: ref}`` of the tracker runs ``sae evaluate --log-to`` opened for an SAE whose ``cfg.json``
records none for that backend (beside ``eval_results/``)."""


def _read_refs(path: Path) -> dict[str, Any]:
    try:
        refs = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return refs if isinstance(refs, dict) else {}


def _tags(cfg: dict[str, Any]) -> dict[str, str]:
    """The tags training gives its tracker runs, from a ``cfg.json`` (ours, or an imported one, which has
    fewer)."""
    settings = cfg.get("run_settings") or {}
    seed = settings.get("init_seed") if settings.get("init_seed") is not None else settings.get("seed")
    return run_tags(cfg.get("trained_architecture") or cfg.get("architecture"), cfg.get("variant"), seed,
                    cfg.get("hook_name"))


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
        known = {**_read_refs(home / EVAL_TRACKING_FILE), **(cfg.get("tracking") or {})}
        trackers = RunTrackers.reopen(tracking, known, run.name, config=cfg, tags=_tags(cfg))
        trackers.log(metrics, int(cfg.get("training_steps") or 0))
        trackers.close()
        opened.append((trackers, known, home))
    for trackers, known, home in opened:
        new = {name: ref for name, ref in trackers.finish().items() if name not in known}
        if new:
            write_json_atomic(home / EVAL_TRACKING_FILE, {**_read_refs(home / EVAL_TRACKING_FILE), **new},
                              sort_keys=True)


__all__ = ["EVAL_TRACKING_FILE", "attach_results"]
