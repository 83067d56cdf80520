"""Sweeps spread over a dask cluster (``sae sweep --workers N|auto`` or ``--scheduler ADDRESS``).

The grid is split into **groups**; each group is one dask task, :func:`train_group`, that trains its
configurations from one pass over the store on its worker, exactly as a local sweep trains its
configurations (:func:`~sae.train.run.train_many`): so every run's weights equal a local sweep's at
the same intra-op thread count and device (floating-point reductions are ordered by thread count).

How groups are sized (:func:`plan_groups`): configurations that share a data stream are dealt
round-robin into ``ceil(m / workers)`` per group, one pass per worker, then capped by memory so that
the SAEs of one group (weights, gradients, Adam's two moments, and the batch's pre-activations:
:func:`sae_bytes`) fit half of the worker's memory: the smallest visible GPU's when training on CUDA,
else host RAM ÷ workers. ``--group-size`` overrides it.

Failures: a worker that dies (killed, out of memory) has its task rescheduled by dask on a surviving
or restarted worker; every run resumes from its last checkpoint (the coordinator checked the run
directories first, so tasks run with ``resume`` on: a run directory that exists is one of this
sweep's). An ``--overwrite`` run restarts from scratch instead, in a fresh staging copy (the old
output stays until it finishes), with the same final weights. A group that fails for a real error
(non-finite loss, a bad store) fails alone: the other groups finish, then one ``error:`` line names
each failed run. Progress travels as dask worker events (``Worker.log_event`` → ``subscribe_topic``)
to one display: runs done and SAE-tokens/s over the whole sweep.

Run directories are written by the workers, so ``--out`` must be a filesystem path that every worker
reaches (a shared mount); object-store URLs are refused.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..cluster import worker_device
from ..errors import ConfigError, SaeError
from ..progress import progress_bar
from ..rundir.format import CHECKPOINT_FILE
from ..tracking import TrackingConfig
from .config import TrainConfig
from .run import DATA_KEYS, check_run_dir, train_many

TEST_DELAY_ENV = "SAE_SWEEP_STEP_DELAY_S"
"""Test hook: seconds each training step of a dask task sleeps (lets a test kill a busy worker)."""
EVENT_INTERVAL_S = 1.0
"""How often a task reports its progress to the coordinator."""
MEMORY_FRACTION = 0.5
"""Share of a worker's memory the SAEs of one group may take (the rest: the loader, buffers, the store)."""


class SweepError(SaeError):
    """One or more groups of a distributed sweep failed (the others finished)."""


def data_key(cfg: TrainConfig) -> tuple:
    """Configurations with equal keys share one pass over the store (:data:`~sae.train.run.DATA_KEYS`)."""
    import json

    return tuple(json.dumps(v, sort_keys=True) if isinstance(v, dict) else v
                 for v in (getattr(cfg, k) for k in DATA_KEYS))


def sae_bytes(cfg: TrainConfig, d_in: int) -> int:
    """Bytes one SAE takes while training, float32: 4 copies (weights, gradients, Adam's m and v) of
    ``2·d_in·d_sae + d_sae + d_in`` parameters, plus two ``[batch, d_sae]`` buffers (pre-activations and
    their gradient)."""
    d_sae = cfg.d_sae or cfg.expansion * d_in
    return 4 * (4 * (2 * d_in * d_sae + d_sae + d_in) + 2 * cfg.batch_size * d_sae)


def memory_budget(device: str, workers: int) -> int:
    """Bytes the SAEs of one group may take on a worker (:data:`MEMORY_FRACTION` of it): on CUDA the
    smallest visible GPU's memory, else this machine's RAM ÷ ``workers``."""
    if (device in ("auto", "cuda") or device.startswith("cuda:")) and torch.cuda.is_available():
        total = min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
        return int(MEMORY_FRACTION * total)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(MEMORY_FRACTION * ram / max(workers, 1))


def plan_groups(cfgs: list[TrainConfig], workers: int, d_in: int, group_size: int | None = None,
                budget: int | None = None) -> list[list[TrainConfig]]:
    """Split ``cfgs`` into dask tasks (see the module doc). Order within a data stream is kept
    round-robin: group ``i`` holds configurations ``i, i + n, …``.

    Raises:
        ConfigError: ``group_size`` < 1, or one SAE alone exceeds ``budget``.
    """
    if group_size is not None and group_size < 1:
        raise ConfigError(f"--group-size {group_size} must be >= 1")
    streams: dict[tuple, list[TrainConfig]] = defaultdict(list)
    for c in cfgs:
        streams[data_key(c)].append(c)
    out: list[list[TrainConfig]] = []
    for group in streams.values():
        size = group_size or math.ceil(len(group) / max(workers, 1))
        if group_size is None and budget is not None:
            biggest = max(sae_bytes(c, d_in) for c in group)
            if biggest > budget:
                raise ConfigError(f"one SAE of {Path(group[0].out).name}… needs ~{biggest / 2**30:.1f} GiB to train, "
                                  f"more than the {budget / 2**30:.1f} GiB a worker has for it: lower --batch-size "
                                  "or the width, or use fewer workers per machine")
            size = max(1, min(size, budget // biggest))
        parts = math.ceil(len(group) / size)
        out += [group[i::parts] for i in range(parts)]
    return out


def train_group(index: int, topic: str, cfg_dicts: list[dict[str, Any]], threads: int | None,
                tracking: TrackingConfig | None = None) -> list[str]:
    """One dask task: train the configurations ``cfg_dicts`` (``TrainConfig.to_dict``) from one pass,
    on this worker's device, resuming any run that has a checkpoint; report progress on ``topic``.
    Returns the run directories."""
    if threads:
        torch.set_num_threads(threads)
    cfgs = [TrainConfig(**{**d, "adam_betas": tuple(d["adam_betas"])}) for d in cfg_dicts]
    device = worker_device(cfgs[0].device)
    cfgs = [dataclasses.replace(c, device=device) for c in cfgs]
    try:
        from distributed import get_worker

        worker: Any = get_worker()
    except (ImportError, ValueError):
        worker = None

    def event(msg: dict[str, Any]) -> None:
        if worker is not None:
            worker.log_event(topic, {"group": index, **msg})

    for c in cfgs:
        if (Path(c.out) / CHECKPOINT_FILE).exists():
            event({"resumed": Path(c.out).name, "worker": str(worker.name) if worker is not None else ""})
    delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    last = [0.0]

    def report(rows: int) -> None:
        if delay:
            time.sleep(delay)
        now = time.monotonic()
        if now - last[0] >= EVENT_INTERVAL_S:
            last[0] = now
            event({"rows": rows})

    return [str(p) for p in train_many(cfgs, quiet=True, on_progress=report, tracking=tracking)]


def check_before_submit(cfgs: list[TrainConfig]) -> None:
    """What a distributed sweep checks before any task runs: every config valid, ``--out`` a filesystem
    path, and every run directory absent, or resumable/replaceable as asked.

    Raises:
        ConfigError, RunDirError: naming the first problem.
    """
    for c in cfgs:
        c.validate()
        if "://" in str(c.out):
            raise ConfigError(f"--out {c.out}: a distributed sweep writes run directories from every worker, so "
                              "--out must be a filesystem path they all reach (a shared mount), not a URL")
        check_run_dir(c)


def run_groups(client: Any, groups: list[list[TrainConfig]], threads: int | None, quiet: bool,
               echo: Callable[[str], None] | None = None, tracking: TrackingConfig | None = None) -> list[Path]:
    """Submit one :func:`train_group` task per group and wait for all, with one progress display (runs
    done, SAE-tokens/s over the sweep). Returns the run directories in ``groups`` order.

    Raises:
        SweepError: after every other group finished, naming each failed run and why.
    """
    from distributed import wait

    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    topic = f"sae-sweep-{uuid.uuid4().hex[:8]}"
    rows: dict[int, int] = defaultdict(int)
    lock = threading.Lock()
    lines: list[str] = []

    def on_event(event: Any) -> None:
        msg = event[1] if isinstance(event, tuple) else event
        with lock:
            if "rows" in msg:
                rows[msg["group"]] = max(rows[msg["group"]], int(msg["rows"]))
            if "resumed" in msg:
                lines.append(f"sweep: {msg['resumed']} resumes from its last checkpoint on worker {msg['worker']}")

    client.subscribe_topic(topic, on_event)
    try:
        futures = [client.submit(train_group, i, topic, [c.to_dict() for c in g], threads, tracking, pure=False,
                                 key=f"sae-sweep-{topic[-8:]}-{i}") for i, g in enumerate(groups)]
        index = {f.key: i for i, f in enumerate(futures)}
        n_runs = sum(len(g) for g in groups)
        total = sum(len(g) * (g[0].tokens // g[0].batch_size) * g[0].batch_size for g in groups)
        done: dict[int, list[str]] = {}
        failed: dict[int, str] = {}
        pending = set(futures)
        with progress_bar(quiet, unit="SAE-tok") as bar:
            task = bar.add_task(f"sweep (0/{n_runs} runs)", total=total)
            while pending:
                try:
                    finished, pending = wait(pending, timeout=EVENT_INTERVAL_S, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    finished = set()
                for f in finished:
                    i = index[f.key]
                    if f.status == "finished":
                        done[i] = f.result()
                    else:
                        failed[i] = _why(f.exception(), groups[i])
                with lock:
                    for line in lines:
                        echo(line)
                    lines.clear()
                    completed = sum(len(g) * ((g[0].tokens // g[0].batch_size) * g[0].batch_size
                                              if i in done or i in failed else rows[i]) for i, g in enumerate(groups))
                runs_done = sum(len(groups[i]) for i in done)
                bar.update(task, completed=completed, description=f"sweep ({runs_done}/{n_runs} runs)")
    finally:
        client.unsubscribe_topic(topic)
        with lock:
            for line in lines:
                echo(line)
    if failed:
        ok = sum(len(groups[i]) for i in done)
        raise SweepError(f"{len(failed)} of {len(groups)} groups failed ({ok} runs finished): "
                         + "; ".join(failed[i] for i in sorted(failed)))
    return [Path(p) for i in range(len(groups)) for p in done[i]]


def _why(exc: BaseException | None, group: list[TrainConfig]) -> str:
    names = ", ".join(Path(c.out).name for c in group)
    if isinstance(exc, SaeError):
        return str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    if exc is not None and exc.__class__.__name__ == "KilledWorker":
        return f"runs {names}: their worker died repeatedly (out of memory?); finish them with --resume"
    return f"runs {names}: unexpected {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


__all__ = ["SweepError", "check_before_submit", "data_key", "memory_budget", "plan_groups", "run_groups",
           "sae_bytes", "train_group"]
