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
  to the same tracker run, found through the ``tracking`` field of the run's ``cfg.json`` (an SAE without
  one gets a new run, kept in ``tracking.json`` for the next evaluation: :mod:`sae.evaluate.track`).
* a resumed training run goes on in the tracker runs its checkpoint recorded, without sending again the
  steps the killed process had already logged.

Every backend of a run works on its own background thread, in order (:class:`RunTrackers`): a step
never waits for a tracker, so a slow or unreachable server costs the training loop nothing. (MLflow's
client retries a refused request for about four minutes with its default
``MLFLOW_HTTP_REQUEST_MAX_RETRIES``/``…_BACKOFF_FACTOR``; W&B queues on its own.) At the end of a run the
trackers get ``timeout_s`` (default 60 s, the ``[log]`` table's ``timeout_s``) to finish what is queued;
one still busy then is left behind with one ``warning:`` line.

A tracker that fails mid-run (server gone, disk full) prints one ``warning:`` line and is dropped;
training goes on and nothing in the run directory is lost. A tracker whose library is missing is one
``error:`` line naming the extra (``pip install 'sae[tracking]'``) before anything runs.
"""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

TRACKERS = ("wandb", "mlflow", "tensorboard")
_MODULE = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard"}


@dataclass
class TrackingConfig:
    """Where runs go. ``project``: W&B project, and MLflow experiment unless ``experiment`` names another
    (default ``sae``); ``name``: the tracker run's name for one ``sae train`` run (default: the run
    directory's name; a sweep names each run by its configuration); ``group``: W&B
    group / MLflow parent run name (a sweep's ``--out`` name); ``tags``: extra tags; ``dir``: TensorBoard
    log root and W&B directory (default ``runs/tracking``); ``mlflow_uri``: tracking server (default
    ``$MLFLOW_TRACKING_URI``, else a SQLite store ``dir/mlflow.db``); ``timeout_s``: seconds the trackers
    of a run (all runs of a sweep together) get at its end to finish what is queued."""

    backends: list[str] = field(default_factory=list)
    project: str = "sae"
    experiment: str | None = None
    name: str | None = None
    group: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    dir: str = "runs/tracking"
    mlflow_uri: str | None = None
    timeout_s: float = 60.0

    @classmethod
    def parse(cls, log_to: str | None, table: dict[str, Any] | None = None) -> TrackingConfig | None:
        """``--log-to`` (comma-separated) and a ``[log]`` TOML table (``to``, ``project``, ``experiment``,
        ``name``, ``group``, ``tags``, ``dir``, ``mlflow_uri``, ``timeout_s``) → settings, or None when nothing
        is tracked.

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
        unknown = set(table) - {"project", "experiment", "name", "group", "tags", "dir", "mlflow_uri", "timeout_s"}
        if unknown:
            raise ConfigError(f"[log] table: unknown key {sorted(unknown)[0]!r} (project, experiment, name, group, "
                              "tags, dir, mlflow_uri, timeout_s, to)")
        for key in ("project", "experiment", "name", "group", "dir", "mlflow_uri"):
            if key in table and (not isinstance(table[key], str) or not table[key].strip()):
                raise ConfigError(f"[log] table: {key} = {table[key]!r} must be a non-empty string")
        tags = table.get("tags", {})
        if not isinstance(tags, dict) or not all(isinstance(v, str | int | float) for v in tags.values()):
            raise ConfigError(f"[log] table: tags = {tags!r} must be a table of names to strings, e.g. "
                              "tags = {team = \"interp\"}")
        table["tags"] = {str(k): str(v) for k, v in tags.items()}
        t = table.get("timeout_s", 60.0)
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < math.inf:
            raise ConfigError(f"[log] table: timeout_s = {t!r} must be a number of seconds ≥ 0")
        return cls(backends=list(dict.fromkeys(names)), **table)

    def check_runs(self, n_runs: int) -> None:
        """Refuse ``name`` when ``n_runs`` > 1 SAEs are trained: one name cannot name them all.

        Raises:
            ConfigError: naming ``group`` as what names a sweep.
        """
        if self.name and n_runs > 1:
            raise ConfigError(f"[log] name = {self.name!r} names one tracker run, but {n_runs} SAEs are trained: "
                              "each is named by its configuration; set [log] group to name the sweep")


def run_tags(arch: object, variant: object, seed: object, hook: object) -> dict[str, str]:
    """The tags every tracker run of an SAE gets (``arch``, ``variant``, ``seed``, ``hook``), the unknown ones
    (``None``) left out."""
    tags = {"arch": arch, "variant": variant, "seed": seed, "hook": hook}
    return {k: str(v) for k, v in tags.items() if v is not None}


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

    def finish(self, ok: bool = True) -> None:
        """Close the run; ``ok=False``: the training stopped early (interrupted, diverged)."""

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

    def finish(self, ok: bool = True) -> None:
        self.w.close()

    def ref(self) -> dict[str, Any]:
        return {"log_dir": str(Path(self.log_dir).resolve())}


class MlflowTracker(Tracker):
    name = "mlflow"
    _parents: dict[tuple[str, str, str], str] = {}
    _parents_lock = threading.Lock()

    def __init__(self, cfg: TrackingConfig, run_name: str, config: dict[str, Any], tags: dict[str, str],
                 run_id: str | None = None, uri: str | None = None) -> None:
        from mlflow import MlflowClient

        self.uri = uri or cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or _local_mlflow(cfg.dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:  # evaluate, or a resumed training run: the same run, running again
            self.run_id = run_id
            if self.client.get_run(run_id).info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            return
        with self._parents_lock:  # the runs of a sweep start on their own threads: one experiment, one parent
            exp_id = self._experiment(cfg.experiment or cfg.project)
        all_tags = dict(tags)
        if cfg.group:
            key = (self.uri, exp_id, cfg.group)
            with self._parents_lock:
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

    def _experiment(self, name: str) -> str:
        """The id of experiment ``name``, created if missing (another process may create it at the same
        moment: then it is read again)."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except Exception:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return str(exp.experiment_id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "KILLED")

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

    def finish(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)

    def ref(self) -> dict[str, Any]:
        return {"run_id": self.run.id, "project": self.project, "dir": str(Path(self.run.dir).resolve())}


_CLASSES: dict[str, type] = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


class _Lane:
    """One backend of one run: its calls (start, logs, finish) run in order on a daemon thread. The first
    exception prints one ``warning:`` line and drops the backend; a lane given up at the deadline stays
    silent afterwards."""

    def __init__(self, name: str, label: str, make: Callable[[], Tracker], what: str) -> None:
        self.name, self.label = name, label
        self.tracker: Tracker | None = None
        self.ref: dict[str, Any] | None = None
        self.dead = self.abandoned = False
        self.done = threading.Event()
        self.jobs: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.jobs.put(("start", (make, what)))
        threading.Thread(target=self._work, name=f"sae-tracker-{name}", daemon=True).start()

    def _work(self) -> None:
        while True:
            kind, arg = self.jobs.get()
            if kind == "stop":
                self.done.set()
                return
            if self.dead:
                continue
            what = "failed"
            try:
                if kind == "start":
                    make, what = arg
                    self.tracker = make()
                    self.ref = self.tracker.ref()
                elif kind == "log" and self.tracker is not None:
                    self.tracker.log(*arg)
                elif kind == "finish" and self.tracker is not None:
                    what = "failed to close"
                    self.tracker.finish(arg)
            except Exception as e:  # noqa: BLE001 - a tracker must never stop training
                self.dead = True
                if not self.abandoned:
                    _warn(self.name, self.label, what, e)


def _opener(name: str, cfg: TrackingConfig, run_name: str, config: dict[str, Any], tags: dict[str, str],
            ref: dict[str, Any] | None) -> Callable[[], Tracker]:
    """What opens backend ``name``'s run: the run ``ref`` names (a ``cfg.json``/checkpoint ``tracking``
    entry) if given, else a new one."""
    if not ref:
        return functools.partial(_CLASSES[name], cfg, run_name, config, tags)
    if name == "tensorboard":
        return functools.partial(TensorBoardTracker, cfg, run_name, {}, {}, log_dir=ref.get("log_dir"))
    if name == "mlflow":
        return functools.partial(MlflowTracker, cfg, run_name, {}, {}, run_id=ref.get("run_id"),
                                 uri=ref.get("tracking_uri"))
    return functools.partial(WandbTracker, cfg, run_name, {}, {}, run_id=ref.get("run_id"), project=ref.get("project"))


class RunTrackers:
    """The trackers of one SAE run, each on its own background thread (:class:`_Lane`): ``log`` only
    queues, so a step never waits for a tracker. A tracker that raises prints one ``warning:`` line and
    is dropped; training and ``metrics.jsonl`` are never affected."""

    def __init__(self, lanes: list[_Lane], label: str, timeout_s: float, replayed_through: int = -1) -> None:
        self.lanes, self.label, self.timeout_s = lanes, label, timeout_s
        self.replayed_through = replayed_through
        self.deadline: float | None = None

    @classmethod
    def start(cls, cfg: TrackingConfig, run_name: str, config: dict[str, Any], tags: dict[str, str],
              resume: dict[str, Any] | None = None, replayed_through: int = -1) -> RunTrackers:
        """Open one tracker run per backend of ``cfg`` (in the background; returns at once).

        A resumed training run passes ``resume`` (the refs its checkpoint recorded, :meth:`refs`): those
        backends go on in the same tracker runs (W&B resumed by id, MLflow set running again, the same
        TensorBoard directory), and records up to step ``replayed_through`` (which the killed process
        already logged; resume is bit-identical, so they are the same values) are not sent again."""
        all_tags = {**tags, **cfg.tags}
        resume = resume or {}
        lanes = [_Lane(name, run_name, _opener(name, cfg, run_name, config, all_tags, resume.get(name)),
                       "could not resume" if resume.get(name) else "could not start") for name in cfg.backends]
        return cls(lanes, run_name, cfg.timeout_s, replayed_through)

    @classmethod
    def reopen(cls, cfg: TrackingConfig, refs: dict[str, Any], run_name: str,
               config: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> RunTrackers:
        """The runs ``refs`` (a ``cfg.json`` ``tracking`` field) name, for ``sae evaluate --log-to``; a
        backend without a ref gets a new run with ``config`` and ``tags`` (plus ``cfg.tags``)."""
        all_tags = {**(tags or {}), **cfg.tags}
        lanes = [_Lane(name, run_name, _opener(name, cfg, run_name, config or {}, all_tags, refs.get(name)),
                       "could not reopen" if refs.get(name) else "could not start") for name in cfg.backends]
        return cls(lanes, run_name, cfg.timeout_s)

    def log(self, record: dict[str, Any], step: int) -> None:
        """Queue the numeric fields of ``record`` at ``step`` for every tracker (returns at once)."""
        if step <= self.replayed_through:
            return
        metrics = numeric(record)
        for lane in self.lanes:
            lane.jobs.put(("log", (metrics, step)))

    def refs(self) -> dict[str, Any]:
        """``{backend: ref}`` of the tracker runs started so far and not failed (for a checkpoint)."""
        return {lane.name: lane.ref for lane in self.lanes if not lane.dead and lane.ref is not None}

    def close(self, ok: bool = True) -> None:
        """Queue the end of every tracker run (``ok=False``: the training stopped early; MLflow marks the
        run KILLED, W&B exits 1) and start the ``timeout_s`` clock (idempotent). Closing the runs of a
        sweep first and then :meth:`finish`-ing them waits ``timeout_s`` at most in all."""
        if self.deadline is None:
            self.deadline = time.monotonic() + self.timeout_s
            for lane in self.lanes:
                lane.jobs.put(("finish", ok))
                lane.jobs.put(("stop", None))

    def finish(self, ok: bool = True) -> dict[str, Any]:
        """Close every run (see :meth:`close`) and wait (until the deadline) for the queued work; returns
        ``{backend: ref}`` for ``cfg.json`` of every tracker that started and did not fail (one still busy at
        the deadline is left behind with a ``warning:`` line, its ref kept)."""
        self.close(ok)
        assert self.deadline is not None
        for lane in self.lanes:
            if not lane.done.wait(max(0.0, self.deadline - time.monotonic())):
                lane.abandoned = True
                print(f"warning: {lane.name} tracker for {self.label} did not finish within {self.timeout_s:g} s "
                      "(server slow or gone?); its dashboard may miss the last records, metrics.jsonl has "
                      "everything", file=sys.stderr, flush=True)
        refs = self.refs()
        self.lanes = []
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
