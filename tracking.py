"""Experiment trackers (``--log-to wandb,mlflow,tensorboard``): the same metrics as ``metrics.jsonl``,
which stays the source of truth, sent to the dashboards researchers already use.

Each tracker is the library's own client behind one small interface (:class:`Tracker`): W&B's
``wandb.init``/``Run.log``, MLflow's ``MlflowClient`` (``create_run``/``log_batch``; a sweep is a
parent run with one nested run per configuration, tag ``mlflow.parentRunId``), TensorBoard's
``torch.utils.tensorboard.SummaryWriter`` (one log directory per run). Per SAE run a tracker receives:

* the full run settings as its config (MLflow: params, values cut to 500 characters), the store URL
  and content digest;
* tags ``arch``, ``variant``, ``seed``, ``hook``;
* at every log step the numeric fields of the ``metrics.jsonl`` record, under the same names, at
  ``step`` (the values were already read to the host for ``metrics.jsonl``: no extra device sync);
* ``sae evaluate --log-to`` adds each evaluation's metrics (``eval/<evaluation>/<group>/<metric>``)
  to the same tracker run, found through the ``tracking`` field of the run's ``cfg.json``.

A tracker that fails mid-run (server gone, disk full) prints one ``warning:`` line and is dropped;
training goes on and nothing in the run directory is lost. A tracker whose library is missing is one
``error:`` line naming the extra (``pip install 'sae[tracking]'``) before anything runs.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

TRACKERS = ("wandb", "mlflow", "tensorboard")
_MODULE = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard"}


@dataclass
class TrackingConfig:
    """Where runs go. ``project``: W&B project and MLflow experiment (default ``sae``); ``group``: W&B
    group / MLflow parent run name (a sweep's ``--out`` name); ``tags``: extra tags; ``dir``: TensorBoard
    log root and W&B directory (default ``runs/tracking``); ``mlflow_uri``: tracking server (default
    ``$MLFLOW_TRACKING_URI``, else a SQLite store ``dir/mlflow.db``)."""

    backends: list[str] = field(default_factory=list)
    project: str = "sae"
    group: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    dir: str = "runs/tracking"
    mlflow_uri: str | None = None

    @classmethod
    def parse(cls, log_to: str | None, table: dict[str, Any] | None = None) -> TrackingConfig | None:
        """``--log-to`` (comma-separated) and a ``[log]`` TOML table (``to``, ``project``, ``group``,
        ``tags``, ``dir``, ``mlflow_uri``) → settings, or None when nothing is tracked.

        Raises:
            ConfigError: an unknown tracker, a missing library (naming the extra), a bad ``[log]`` key.
        """
        table = dict(table or {})
        spec = log_to if log_to is not None else table.pop("to", None)
        table.pop("to", None)
        names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec or []) if n.strip()]
        if not names:
            return None
        for n in names:
            if n not in TRACKERS:
                raise ConfigError(f"--log-to {n!r}: choose from {', '.join(TRACKERS)}")
            try:
                __import__(_MODULE[n])
            except ImportError:
                raise ConfigError(f"--log-to {n}: the {n} library is not installed; pip install 'sae[tracking]'"
                                  ) from None
        unknown = set(table) - {"project", "group", "tags", "dir", "mlflow_uri"}
        if unknown:
            raise ConfigError(f"[log] table: unknown key {sorted(unknown)[0]!r} (project, group, tags, dir, "
                              "mlflow_uri, to)")
        return cls(backends=list(dict.fromkeys(names)), **table)


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """The finite numeric fields of a ``metrics.jsonl`` record (booleans as 0/1), ``step`` excluded."""
    out = {}
    for k, v in record.items():
        if k == "step" or isinstance(v, str) or v is None:
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


class Tracker:
    """One backend's run for one SAE. Subclasses call their library; :class:`RunTrackers` guards them."""

    name = ""

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Close the run (idempotent)."""

    def ref(self) -> dict[str, Any]:
        """What finds this run again (recorded in ``cfg.json`` → ``tracking``)."""
        return {}


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, cfg: TrackingConfig, run_name: str, config: dict[str, Any], tags: dict[str, str],
                 log_dir: str | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir or str(Path(cfg.dir) / "tensorboard" / (cfg.group or "") / run_name)
        self.w = SummaryWriter(log_dir=self.log_dir)
        if config:
            self.w.add_text("config", "```json\n" + json.dumps(config, indent=1, default=str) + "\n```")
            self.w.add_text("tags", json.dumps(tags))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()

    def finish(self) -> None:
        self.w.close()

    def ref(self) -> dict[str, Any]:
        return {"log_dir": str(Path(self.log_dir).resolve())}


class MlflowTracker(Tracker):
    name = "mlflow"
    _parents: dict[tuple[str, str, str], str] = {}

    def __init__(self, cfg: TrackingConfig, run_name: str, config: dict[str, Any], tags: dict[str, str],
                 run_id: str | None = None, uri: str | None = None) -> None:
        from mlflow import MlflowClient

        self.uri = uri or cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or _local_mlflow(cfg.dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:
            self.run_id = run_id
            return
        exp = self.client.get_experiment_by_name(cfg.project)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(cfg.project)
        all_tags = dict(tags)
        if cfg.group:
            key = (self.uri, exp_id, cfg.group)
            if key not in self._parents:
                parent = self.client.create_run(exp_id, run_name=cfg.group, tags={"sae.sweep": cfg.group})
                self._parents[key] = parent.info.run_id
            all_tags["mlflow.parentRunId"] = self._parents[key]
        run = self.client.create_run(exp_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        flat = _flatten(config)
        params = [Param(k, str(v)[:500]) for k, v in flat.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)

    def ref(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri}


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, cfg: TrackingConfig, run_name: str, config: dict[str, Any], tags: dict[str, str],
                 run_id: str | None = None, project: str | None = None) -> None:
        import wandb

        Path(cfg.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project or cfg.project, name=run_name, group=cfg.group, config=config,
                              tags=[f"{k}:{v}" for k, v in tags.items()], dir=cfg.dir, reinit="create_new",
                              id=run_id, resume="allow" if run_id else None)
        self.project = project or cfg.project

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()

    def ref(self) -> dict[str, Any]:
        return {"run_id": self.run.id, "project": self.project, "dir": str(Path(self.run.dir).resolve())}


_CLASSES: dict[str, type] = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


class RunTrackers:
    """The trackers of one SAE run. Every call is guarded: a tracker that raises prints one ``warning:``
    line and is dropped, so training and ``metrics.jsonl`` are never affected."""

    def __init__(self, trackers: list[Tracker], label: str) -> None:
        self.trackers, self.label = trackers, label

    @classmethod
    def start(cls, cfg: TrackingConfig, run_name: str, config: dict[str, Any], tags: dict[str, str]) -> RunTrackers:
        out: list[Tracker] = []
        for name in cfg.backends:
            try:
                out.append(_CLASSES[name](cfg, run_name, config, {**tags, **cfg.tags}))
            except Exception as e:  # noqa: BLE001 - a tracker must never stop training
                _warn(name, run_name, "could not start", e)
        return cls(out, run_name)

    @classmethod
    def reopen(cls, cfg: TrackingConfig, refs: dict[str, Any], run_name: str) -> RunTrackers:
        """The runs ``refs`` (a ``cfg.json`` ``tracking`` field) name, for ``sae evaluate --log-to``; a
        backend without a ref gets a new run."""
        out: list[Tracker] = []
        for name in cfg.backends:
            ref = refs.get(name) or {}
            try:
                if name == "tensorboard":
                    out.append(TensorBoardTracker(cfg, run_name, {}, {}, log_dir=ref.get("log_dir")))
                elif name == "mlflow":
                    out.append(MlflowTracker(cfg, run_name, {}, {}, run_id=ref.get("run_id"),
                                             uri=ref.get("tracking_uri")))
                else:
                    out.append(WandbTracker(cfg, run_name, {}, {}, run_id=ref.get("run_id"),
                                            project=ref.get("project")))
            except Exception as e:  # noqa: BLE001
                _warn(name, run_name, "could not reopen", e)
        return cls(out, run_name)

    def log(self, record: dict[str, Any], step: int) -> None:
        metrics = numeric(record)
        for t in list(self.trackers):
            try:
                t.log(metrics, step)
            except Exception as e:  # noqa: BLE001
                _warn(t.name, self.label, "failed", e)
                self.trackers.remove(t)

    def finish(self) -> dict[str, Any]:
        """Close every run; returns ``{backend: ref}`` for ``cfg.json``."""
        refs = {}
        for t in self.trackers:
            try:
                refs[t.name] = t.ref()
                t.finish()
            except Exception as e:  # noqa: BLE001
                _warn(t.name, self.label, "failed to close", e)
        self.trackers = []
        return refs


def _local_mlflow(root: str) -> str:
    """A local MLflow store under ``root``: SQLite (MLflow 3 no longer accepts new file stores)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def _warn(name: str, run: str, what: str, e: BaseException) -> None:
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    print(f"warning: {name} tracker for {run} {what} ({e.__class__.__name__}: {msg}); training goes on, "
          "metrics.jsonl has everything", file=sys.stderr, flush=True)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


__all__ = ["TRACKERS", "RunTrackers", "Tracker", "TrackingConfig", "numeric"]
