"""``sae evaluate --log-to``: each evaluation's metrics added to the SAE's tracker runs.

The tracker runs are the ones its training opened (``cfg.json`` → ``tracking``, see
:mod:`sae.tracking`); an SAE without them (imported, or trained without ``--log-to``) gets new runs.
Every numeric metric of ``eval_results/<evaluation>.json`` (``eval_result_metrics``, interval bounds
included) is logged as ``eval/<evaluation>/<group>/<metric>`` (SAEBench's metric groups) at the SAE's last
training step.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..rundir.format import CFG_FILE
from ..tracking import RunTrackers, TrackingConfig


def attach_results(run_dirs: list[Path], evaluated: list[str], tracking: TrackingConfig,
                   results_dir: Path | None = None) -> None:
    """Log the results of ``evaluated`` (evaluation ids) of each run to its tracker runs (never raises for
    a tracker failure: one ``warning:`` line, see :class:`~sae.tracking.RunTrackers`). All runs are sent
    first and then finished together: the trackers get ``tracking.timeout_s`` in all."""
    opened: list[RunTrackers] = []
    for run in run_dirs:
        run = Path(run)
        cfg = json.loads((run / CFG_FILE).read_text())
        where = (results_dir / run.name if results_dir is not None else run) / "eval_results"
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
        trackers = RunTrackers.reopen(tracking, cfg.get("tracking") or {}, run.name)
        trackers.log(metrics, int(cfg.get("training_steps") or 0))
        trackers.close()
        opened.append(trackers)
    for trackers in opened:
        trackers.finish()


__all__ = ["attach_results"]
