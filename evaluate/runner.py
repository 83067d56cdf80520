"""``sae evaluate``: run the requested evaluations over SAE run directories (:func:`evaluate_runs`)
and print a comparison table (:func:`print_comparison`)."""


from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..rundir.identity import IncompatibleSAEError, canonical_model_id, check_compatible
from ..rundir.results import get_metric, read_result, write_result
from ..rundir.sae import SAE
from .common import model_fingerprints, model_hook_names
from .core import COMPAT_MODES, DEFAULT_CONTEXT_SIZE, EVAL_TYPE_ID, CoreConfig
from .rates import cache_dir, print_plan, record_rate
from .registry import EvalContext, available_evals, eval_module

__all__ = ["AVAILABLE_EVALS", "COMPARISON_COLUMNS", "evaluate_runs", "print_comparison"]

AVAILABLE_EVALS = tuple(available_evals())
COMPARISON_COLUMNS = ("l0", "explained_variance", "mse", "cossim", "l2_ratio", "ce_loss_score",
                      "kl_div_score", "frac_dead", "frac_dense")


def evaluate_runs(run_dirs: Sequence[str | Path], store: str | Path | None = None,
                  evals: Sequence[str] | None = ("core",), n_tokens: int = 16384, device: str = "auto",
                  quiet: bool = False, results_dir: str | Path | None = None,
                  storage_options: dict | None = None, allow_other_store: bool = False,
                  compat: str = "ours", eval_params: dict[str, dict[str, str]] | None = None,
                  use_cache: bool = True) -> list[dict]:
    """Evaluate each SAE run directory; write ``eval_results/<eval>.json`` there; return the result dicts.

    The model id is the store's ``model_id`` when ``store`` is given, else the run's ``model_name``
    (an HF id, a local directory, or the embedded default). Each model is loaded once (float32,
    on ``device``) and reused across runs; every run's ``cfg.json`` is checked against the store
    (when given) and the loaded model before the first forward pass of any run. The
    SAE-independent clean/ablated pass (:class:`~sae.evaluate.core.CoreReference`) is computed
    once per (model, hook, dataset, context size), shared, and freed after the last run that
    needs it. Held-out text comes from the store's dataset (else the run's ``dataset_path``) and
    context size (else the run's).

    Before any model loads, every run's SAE files are loaded and validated (``SAE.load``: readable,
    consistent, finite) and every results location is checked for writability. ``results_dir``
    writes ``results_dir/<run name>/eval_results/`` instead of into the run directories (for runs
    you cannot write to, e.g. a teammate's).

    ``eval_params``: ``{eval name: {Config field: value}}`` overrides of an evaluation's settings
    (``sae evaluate -p absorption.ranking=l1_probe``), validated before anything loads.

    ``n_tokens`` and ``compat`` are the core evaluation's ``n_eval_tokens`` and ``compat`` (``-p core.…``
    overrides them like any other setting); ``compat="saebench"`` computes the core metrics by
    SAEBench's / SAELens' definitions (see :class:`~sae.evaluate.core.CoreConfig`).

    Every evaluation follows one contract (:mod:`.registry`): ``run_many(saes, ctxs, cfg)`` when the
    module has it (core: one shared reference pass per model and hook), else ``run`` per SAE. Before
    the first one runs, the plan is printed: evaluations, SAEs, and the time each took per SAE the
    last time on this machine (:mod:`.rates`).

    Work that depends only on the model, the hook and an evaluation's settings (core's reference
    pass, probing's per-text activations, absorption's word activations and ground-truth probes,
    unlearning's corpus activations) is kept in
    ``<cache>/artifacts/`` (:func:`.rates.cache_dir`) and reused by later calls; ``use_cache=False``
    (``--no-cache``) computes everything afresh and writes nothing there.

    ``store`` (path or URL, with ``storage_options``) must be the very store a run was trained on:
    a different ``content_digest`` than the run's ``cfg.json`` records is refused unless
    ``allow_other_store`` (e.g. a re-encoded copy of it).

    ``evals=None``: every evaluation that applies — on a synthetic store (``sae store synth``) those
    that need no language model (``ground_truth``, ``geometry``), elsewhere all but ``ground_truth``.
    A language-model evaluation asked for on a synthetic store is refused (it has no model or text).

    Returns one SAEBench-shaped result dict per (run, eval), in order.

    Raises:
        ValueError: an unknown eval name. IncompatibleSAEError: a run does not fit the store/model.
        FileNotFoundError: a run directory without an SAE. StoreError: a bad store.
    """
    evals = _applicable(evals, store, storage_options)
    configs = _settings(evals, n_tokens, device, compat, eval_params)
    saes, out_dirs = _load_runs([Path(r) for r in run_dirs], results_dir)
    ctxs = _contexts(saes, out_dirs, store, storage_options, allow_other_store, device, quiet,
                     needs_model=any(getattr(eval_module(e), "NEEDS_MODEL", True) for e in evals),
                     disk_cache=cache_dir() if use_cache else None)
    if not quiet:
        print_plan(list(evals), list(saes))
    written: dict[tuple[str, str], dict] = {}
    for name in evals:
        written.update(_run_evaluation(name, configs[name], saes, ctxs, quiet))
    return [written[(run, name)] for run in saes for name in evals if (run, name) in written]


def _applicable(evals: Sequence[str] | None, store: str | Path | None, storage_options: dict | None) -> list[str]:
    """The evaluations to run: ``evals``, or the default for this store (see :func:`evaluate_runs`)."""
    from ..errors import ConfigError
    from ..store import ActivationStore
    from ..synth.store import is_synthetic

    synthetic = store is not None and is_synthetic(ActivationStore(store, storage_options=storage_options).attrs)
    if evals is None:
        if synthetic:
            return [e for e in AVAILABLE_EVALS if not getattr(eval_module(e), "NEEDS_MODEL", True)]
        return [e for e in AVAILABLE_EVALS if e != "ground_truth" and not _missing_package(e)]
    needs = [e for e in evals if synthetic and getattr(eval_module(e), "NEEDS_MODEL", True)]
    if needs:
        raise ConfigError(f"--eval {','.join(needs)}: {store} is a synthetic store (no language model or text); "
                          "evaluate it with --eval ground_truth,geometry")
    return list(evals)


def _missing_package(name: str) -> str | None:
    """What evaluation ``name`` needs installed, or None (its optional ``requires()``)."""
    mod = eval_module(name)
    return mod.requires() if hasattr(mod, "requires") else None


def _settings(evals: Sequence[str], n_tokens: int, device: str, compat: str,
              eval_params: dict[str, dict[str, str]] | None) -> dict[str, object]:
    """Every requested evaluation's settings, validated (names, -p values, ranges) before anything loads."""
    from ..errors import ConfigError
    from ..model import check_device, resolve_device

    if not evals:
        raise ConfigError("--eval is empty: name at least one evaluation")
    for e in evals:
        eval_module(e)  # ValueError naming the choices for an unknown evaluation
    for name in eval_params or {}:
        if name not in evals:
            raise ConfigError(f"-p {name}.…: {name!r} is not one of the evaluations run here ({', '.join(evals)})")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ConfigError(f"--tokens {n_tokens!r} must be a positive integer")
    if compat not in COMPAT_MODES:
        raise ConfigError(f"--compat {compat!r}: choose {' or '.join(COMPAT_MODES)}")
    check_device(device)
    bases = {EVAL_TYPE_ID: CoreConfig(n_eval_tokens=n_tokens, device=device, compat=compat)}
    configs = {name: eval_settings(name, (eval_params or {}).get(name, {}), base=bases.get(name)) for name in evals}
    for name, cfg in configs.items():  # a missing package or a bad setting: refused before anything loads
        mod = eval_module(name)
        if hasattr(mod, "check"):
            mod.check(cfg, str(resolve_device(device).type))
    return configs


def _load_runs(run_dirs: list[Path], results_dir: str | Path | None) -> tuple[dict[str, SAE], dict[str, Path]]:
    """Every SAE loaded and validated, and every results location checked writable — before any model."""
    from ..errors import ConfigError, SaeError
    from ..outputs import check_output_location

    if not run_dirs:
        raise ConfigError("no run directories given")
    saes = {str(r): SAE.load(r) for r in run_dirs}
    out_dirs: dict[str, Path] = {}
    for run_dir in run_dirs:
        out = Path(results_dir) / run_dir.name if results_dir is not None else run_dir
        if results_dir is not None and out in out_dirs.values():
            raise ConfigError(f"two runs are named {run_dir.name!r}: with --results-dir, evaluate them separately")
        try:
            check_output_location(out / "eval_results", "--results-dir" if results_dir is not None else "run dir")
        except SaeError:
            raise SaeError(f"cannot write {out / 'eval_results'}: it is not writable (a teammate's run?); "
                           "pass --results-dir DIR to write the results elsewhere") from None
        out_dirs[str(run_dir)] = out
    return saes, out_dirs


def _contexts(saes: dict[str, SAE], out_dirs: dict[str, Path], store: str | Path | None,
              storage_options: dict | None, allow_other_store: bool, device: str, quiet: bool,
              needs_model: bool, disk_cache: Path | None = None) -> dict[str, EvalContext]:
    """Each run's :class:`EvalContext`: its cfg.json checked against the store (same data, or a grown
    store whose prefix it trained on) and the model (loaded once per model), before any forward pass."""
    from ..model import LoadedModel, is_embedded, load_model
    from ..store import ActivationStore

    opened = ActivationStore(store, storage_options=storage_options) if store is not None else None
    attrs = opened.attrs if opened is not None else {}
    models: dict[tuple[str | None, bool], LoadedModel] = {}
    shared_cache: dict[tuple, object] = {}
    ctxs = {}
    for run, sae in saes.items():
        sae_cfg = sae.cfg
        if opened is not None and not allow_other_store:
            want, have = sae_cfg.get("content_digest"), opened.content_digest
            if want and have and not opened.accepts_digest(want, sae_cfg.get("hook_name"), sae_cfg.get("hook_digest")):
                raise IncompatibleSAEError(
                    f"{run} was trained on a store with content digest {want[:16]}…, but {store} has "
                    f"{have[:16]}…: pass the store it was trained on ({sae_cfg.get('store_url')}), or "
                    "--allow-other-store to evaluate against this one anyway")
        if opened is not None:
            check_compatible(sae_cfg, attrs.get("model_id"), attrs.get("model_fingerprint"), int(attrs["d_model"]),
                             list(attrs["hook_names"]), against="store", run_dir=run)
            model_id, weights = attrs.get("model_id"), attrs.get("model_weights")
        else:
            model_id, weights = sae_cfg.get("model_name"), sae_cfg.get("model_weights")
        lm = None  # every requested evaluation reads only the SAE (and its run directory)
        if needs_model:
            key = (canonical_model_id(model_id), is_embedded(model_id, weights))
            if key not in models:
                models[key] = load_model(model_id, device, dtype=torch.float32, model_weights=weights)
            lm = models[key]
            check_compatible(sae_cfg, lm.model_id, model_fingerprints(lm), lm.d_model, model_hook_names(lm),
                             run_dir=run)
        ctxs[run] = EvalContext(
            lm=lm, hook_name=str(sae_cfg["hook_name"]), layer=int(sae_cfg["hook_layer"]),
            dataset=str(attrs.get("dataset") or sae_cfg.get("dataset_path") or "embedded"),
            context_size=int(attrs.get("context_size") or sae_cfg.get("context_size") or DEFAULT_CONTEXT_SIZE),
            run_dir=Path(run), store_path=str(store) if store is not None else None, device=device, quiet=quiet,
            cache=shared_cache, results_dir=out_dirs[run], disk_cache=disk_cache)
    return ctxs


def _run_evaluation(name: str, cfg: object, saes: dict[str, SAE], ctxs: dict[str, EvalContext],
                    quiet: bool) -> dict[tuple[str, str], dict]:
    """One evaluation over every run that it can evaluate: ``run_many`` when the module has one, else
    ``run`` per SAE; each result written (per SAE, as soon as it is computed), read back and returned
    under ``(run, name)``."""
    mod = eval_module(name)
    runs = []
    for run, ctx in ctxs.items():
        reason = mod.available(ctx) if hasattr(mod, "available") else None
        if reason:
            if not quiet:
                print(f"skipping {name} for {run}: {reason}")
            continue
        runs.append(run)
    if not runs:
        return {}
    stem = mod.result_stem(cfg) if hasattr(mod, "result_stem") else mod.EVAL_TYPE_ID
    written: dict[tuple[str, str], dict] = {}

    def write(r: str, out: Any, secs: float) -> None:
        res_dir = ctxs[r].results_dir or Path(r)
        eval_config = {**out.eval_config, "wall_time_s": round(secs, 2)}
        write_result(res_dir, mod.EVAL_TYPE_ID, eval_config, out.metrics, out.details, saes[r].cfg, out.unstructured,
                     file_stem=stem, extra=out.extra)
        written[(r, name)] = read_result(res_dir, stem)

    t0 = time.perf_counter()
    if hasattr(mod, "run_many"):
        outs = mod.run_many([saes[r] for r in runs], [ctxs[r] for r in runs], cfg)
        per_sae = (time.perf_counter() - t0) / len(runs)
        for r, out in zip(runs, outs, strict=True):
            write(r, out, per_sae)
    else:  # each SAE's result is written as soon as it is computed: an interrupted call keeps the finished ones
        for r in runs:
            t1 = time.perf_counter()
            out = mod.run(saes[r], ctxs[r], cfg)
            write(r, out, time.perf_counter() - t1)
    record_rate(name, (time.perf_counter() - t0) / len(runs))
    return written


def eval_settings(name: str, params: dict[str, str], base: Any = None) -> Any:
    """``eval_module(name).Config`` (or ``base``, an instance of it) with ``params`` (strings, typed by
    each field's default) applied and checked against the Config's declared ``ranges``.

    Raises:
        ConfigError: an unknown field, or a value that does not parse as the field's type.
    """
    import dataclasses

    from ..errors import ConfigError

    cls = eval_module(name).Config
    base = base if base is not None else cls()
    fields = {f.name: f for f in dataclasses.fields(base)}  # (tests may swap Config for a factory)
    typed: dict[str, object] = {}
    for key, raw in params.items():
        if key not in fields:
            raise ConfigError(f"-p {name}.{key}: unknown setting; {name} has {', '.join(sorted(fields))}")
        cur = getattr(base, key)
        try:
            if isinstance(cur, bool):
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                typed[key] = raw.lower() in ("true", "1", "yes")
            elif isinstance(cur, int):
                typed[key] = int(raw)
            elif isinstance(cur, float):
                typed[key] = float(raw)
            elif isinstance(cur, str) or cur is None:
                typed[key] = raw
            elif isinstance(cur, tuple):  # comma-separated, typed like the default's items (str if empty)
                kind = type(cur[0]) if cur and isinstance(cur[0], (int, float, str)) else str
                items = [x.strip() for x in raw.split(",") if x.strip()]
                if not items:
                    raise ValueError(raw)
                typed[key] = tuple(kind(x) for x in items)
            else:
                raise ConfigError(f"-p {name}.{key}: a {type(cur).__name__} setting cannot be set from the "
                                  "command line")
        except ValueError:
            raise ConfigError(f"-p {name}.{key}={raw!r}: expected {type(cur).__name__}") from None
    from ..params import check_range

    for key, spec in (getattr(cls, "ranges", None) or {}).items():  # declared ranges, as for -p of training
        if key in typed:
            check_range(name, key, typed[key], spec)
    try:
        return dataclasses.replace(base, **typed)
    except ValueError as e:  # a Config's own check of its values (__post_init__)
        raise ConfigError(f"-p {name}: {e}") from None


def _label(result: dict, i: int) -> str:
    un = result.get("eval_result_unstructured") or {}
    run = un.get("run_dir") if isinstance(un, dict) else None
    return Path(run).name if run else str(result.get("sae_cfg_dict", {}).get("run_name", f"run {i}"))


def print_comparison(results: Sequence[dict], console: Any = None) -> None:
    """Print one rich table per evaluation: a row per run. Core uses :data:`COMPARISON_COLUMNS`;
    other evaluations show their scalar metrics (``category.metric``), missing → "–"."""
    import sys

    from rich.console import Console
    from rich.table import Table

    con = console or Console(width=None if sys.stdout.isatty() else 200)
    by_type: dict[str, list[dict]] = {}
    for r in results:
        by_type.setdefault(r.get("eval_type_id", "?"), []).append(r)
    for eval_type, rs in by_type.items():
        if eval_type == EVAL_TYPE_ID:
            cols = list(COMPARISON_COLUMNS)
        else:
            cols = []
            for r in rs:
                for cat, ms in r.get("eval_result_metrics", {}).items():
                    for m, v in ms.items():
                        if isinstance(v, int | float) and f"{cat}.{m}" not in cols:
                            cols.append(f"{cat}.{m}")
            cols = cols[:10]
        table = Table(title=f"{eval_type} evaluation")
        table.add_column("run")
        for col in cols:
            table.add_column(col.split(".")[-1], justify="right")
        for i, r in enumerate(rs):
            cells = []
            for col in cols:
                if eval_type == EVAL_TYPE_ID:
                    v = get_metric(r, col)
                else:
                    cat, _, m = col.partition(".")
                    v = r.get("eval_result_metrics", {}).get(cat, {}).get(m)
                cells.append("–" if v is None else (f"{v:.1f}" if col == "l0" else f"{v:.4g}"))
            table.add_row(_label(r, i), *cells)
        con.print(table)
