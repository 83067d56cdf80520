"""Sweeps: many SAE configurations trained from one pass over the store.

Configurations that share the data stream (:data:`~sae.train.run.DATA_KEYS`) are trained
together by :func:`~sae.train.run.train_many`: each batch is read and decompressed once and fed to
every SAE. With ``workers`` (a local dask cluster) or ``scheduler`` (an existing
``dask.distributed`` cluster) the configurations are split into groups (:mod:`sae.train.distributed`),
and each group is one task that makes its own single pass on its worker.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..cluster import check_scheduler, dask_client, resolve_workers
from ..errors import ConfigError
from ..rundir.metrics import read_metrics
from ..rundir.sae import SAE
from ..store import ActivationStore
from ..tracking import TrackingConfig
from .config import TrainConfig
from .distributed import check_before_submit, data_key, memory_budget, plan_groups, run_groups
from .run import train_many
from .variants import make_config, variant_names


def parse_grid(items: list[str]) -> dict[str, dict[str, list[str]]]:
    """``["adaptive.alpha=0.01,0.05", "lr=1e-3,3e-4"]`` → ``{"adaptive": {"alpha": [...]}, "*": {"lr": [...]}}``.

    A key without a variant prefix is a training option applied to every variant. Raises
    ``ValueError`` on malformed items.
    """
    grid: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"--grid {item!r} must look like VARIANT.PARAM=V1,V2 or OPTION=V1,V2")
        variant, dot, param = key.strip().rpartition(".")
        grid[variant if dot else "*"][param] = [v.strip() for v in values.split(",")]
    return dict(grid)


def _typed(cfg: TrainConfig, name: str, value: str) -> Any:
    field = next((f for f in dataclasses.fields(TrainConfig) if f.name == name), None)
    if field is None:
        raise ConfigError(f"--grid: unknown training option {name!r}")
    current = getattr(cfg, name)
    if current is None:  # an optional option (``int | None``...): parse by its declared type
        kind = str(field.type)
        current = 0 if "int" in kind else 0.0 if "float" in kind else current
    try:
        if isinstance(current, bool):
            return value.lower() in ("1", "true", "yes")
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
    except ValueError:
        raise ConfigError(f"--grid {name}={value!r}: expected {type(current).__name__}") from None
    return value


def expand(base: TrainConfig, variants: list[str], grid: dict[str, dict[str, list[str]]], out: str | Path,
           tables: dict[str, dict[str, Any]] | None = None) -> list[TrainConfig]:
    """One :class:`TrainConfig` per (variant × its grid × global grid), run dirs under ``out``.

    ``tables``: per-variant parameters (a ``--config`` file's ``[<variant>]`` tables), below the grid.
    Run directory names: ``<variant>`` (``none``: the base architecture, e.g. ``topk``, unless ``arch`` is
    gridded) plus ``-<param>=<value>`` for every gridded parameter.
    """
    if not variants:
        raise ConfigError("--variants is empty: name at least one variant")
    known = variant_names()
    for v in [*variants, *(k for k in grid if k != "*")]:
        if v not in known:
            raise ConfigError(f"unknown variant {v!r}: choose from {', '.join(known)}")
    cfgs = []
    glob = grid.get("*", {})
    for v in variants:
        own = grid.get(v, {})
        axes = [(("v", k), vals) for k, vals in own.items()] + [(("g", k), vals) for k, vals in glob.items()]
        for combo in itertools.product(*(vals for _, vals in axes)) if axes else [()]:
            params = dict((tables or {}).get(v, {}))
            if v == base.variant:
                params.update(base.variant_params)
            overrides: dict[str, Any] = {}
            tags = []
            for ((kind, key), _), value in zip(axes, combo, strict=True):
                tags.append(f"{key}={value}")
                if kind == "v":
                    params[key] = value
                else:
                    overrides[key] = _typed(base, key, value)
            make_config(v, params)  # validate
            # no penalty: named after the base architecture (as `--variants topk` always was), unless gridded
            head = (base.arch or "topk") if v == "none" and "arch" not in overrides else v
            name = "-".join([head, *tags])
            cfgs.append(dataclasses.replace(base, variant=v, variant_params=params, out=str(Path(out) / name),
                                            **overrides))
    return cfgs


def run_sweep(cfgs: list[TrainConfig], workers: int | str | None = None, scheduler: str | None = None,
              quiet: bool = False, group_size: int | None = None, tracking: TrackingConfig | None = None
              ) -> list[Path]:
    """Train all ``cfgs``; one store pass per group of configs sharing a data stream.

    ``workers`` (a count, or ``auto``: one per visible GPU) starts a local dask cluster; ``scheduler``
    connects to an existing one. Then the groups are dask tasks (:mod:`sae.train.distributed`: sizing,
    resume after a worker dies, failure isolation, progress); ``group_size`` overrides their size.

    Raises:
        ConfigError, RunDirError: before anything runs. SweepError: some distributed groups failed.
    """
    for c in cfgs:
        c.validate()  # every config before any cluster starts or any run directory is made
    if tracking is not None:
        tracking.check_runs(len(cfgs))  # all of them: a distributed sweep's groups may hold one each
    n = resolve_workers(workers) if workers not in (None, 0, "0") else None
    if n is None and not scheduler:
        if group_size is not None:
            raise ConfigError("--group-size applies to a distributed sweep: add --workers N or --scheduler ADDRESS")
        streams: dict[tuple, list[TrainConfig]] = defaultdict(list)
        for c in cfgs:
            streams[data_key(c)].append(c)
        out = []
        for group in streams.values():
            out += train_many(group, quiet=quiet, label=f"sweep ({len(group)} SAEs)", tracking=tracking)
        return out
    check_before_submit(cfgs)
    check_scheduler(scheduler)
    d_in = ActivationStore(cfgs[0].store, storage_options=cfgs[0].storage_options).d_model
    # run directories were checked above: a task may resume whatever exists (a retry after its worker died)
    tasks = [c if c.overwrite else dataclasses.replace(c, resume=True) for c in cfgs]
    with dask_client(n, scheduler) as client:
        count = n or max(len(client.scheduler_info()["workers"]), 1)
        groups = plan_groups(tasks, count, d_in, group_size, memory_budget(cfgs[0].device, n or 1))
        threads = max(1, torch.get_num_threads() // count) if n else None
        return run_groups(client, groups, threads, quiet, tracking=tracking)


def max_decoder_cosines(W_dec: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Per-latent maximum |cos| to any other decoder row, ``[d_sae]``, computed in row chunks."""
    d = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = torch.empty(d.shape[0])
    for s in range(0, d.shape[0], chunk):
        c = (d[s:s + chunk] @ d.T).abs()
        c[torch.arange(c.shape[0]), torch.arange(s, s + c.shape[0])] = 0
        out[s:s + chunk] = c.max(dim=1).values
    return out


def summarize(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """Final loss, L0, explained variance, dead fraction, penalty and mean max decoder cosine per run."""
    rows = []
    for d in run_dirs:
        last = read_metrics(d)[-1]
        sae = SAE.load(d)
        rows.append({"run": Path(d).name, "variant": sae.cfg.get("variant"), "loss": last["loss"],
                     "l0": last["l0"], "explained_variance": last["explained_variance"],
                     "dead_fraction": last["dead_fraction"], "penalty": last.get("penalty/penalty", 0.0),
                     "mean_max_cos": float(max_decoder_cosines(sae.W_dec.detach()).mean())})
    return rows


def print_summary(rows: list[dict[str, Any]], out: Path | None = None) -> None:
    """Rich table of :func:`summarize` rows (and ``summary.json`` in ``out``)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="sweep summary (final training batch)")
    cols = ("loss", "l0", "explained_variance", "dead_fraction", "penalty", "mean_max_cos")
    t.add_column("run")
    for col in cols:
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["run"], *(f"{r[c]:.4f}" if c != "l0" else f"{r[c]:.1f}" for c in cols))
    import sys

    Console(width=None if sys.stdout.isatty() else 160).print(t)
    if out is not None:
        (Path(out) / "summary.json").write_text(json.dumps(rows, indent=2))
