"""``sae evaluate``: run the requested evaluations over SAE run directories (:func:`evaluate_runs`)
and print a comparison table (:func:`print_comparison`)."""


from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..rundir.identity import IncompatibleSAEError, canonical_model_id, check_compatible
from ..rundir.results import get_metric, read_result, write_result
from .common import model_fingerprints, model_hook_names
from .core import (
    EVAL_TYPE_ID,
    CoreConfig,
    compute_reference,
    reference_key,
    resolve_config,
    run_core_many,
)
from .registry import EvalContext, available_evals, eval_module

__all__ = ["AVAILABLE_EVALS", "COMPARISON_COLUMNS", "evaluate_runs", "print_comparison"]

AVAILABLE_EVALS = tuple(available_evals())
COMPARISON_COLUMNS = ("l0", "explained_variance", "mse", "cossim", "l2_ratio", "ce_loss_score",
                      "kl_div_score", "frac_dead", "frac_dense")


def evaluate_runs(run_dirs: Sequence[str | Path], store: str | Path | None = None,
                  evals: Sequence[str] = ("core",), n_tokens: int = 16384, device: str = "auto",
                  quiet: bool = False, results_dir: str | Path | None = None,
                  storage_options: dict | None = None, allow_other_store: bool = False,
                  compat: str = "ours", eval_params: dict[str, dict[str, str]] | None = None) -> list[dict]:
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

    ``compat="saebench"`` computes the core metrics by SAEBench's / SAELens' definitions (see
    :class:`~sae.evaluate.core.CoreConfig`); the default is ours.

    ``store`` (path or URL, with ``storage_options``) must be the very store a run was trained on:
    a different ``content_digest`` than the run's ``cfg.json`` records is refused unless
    ``allow_other_store`` (e.g. a re-encoded copy of it).

    Returns one SAEBench-shaped result dict per (run, eval), in order.

    Raises:
        ValueError: an unknown eval name. IncompatibleSAEError: a run does not fit the store/model.
        FileNotFoundError: a run directory without an SAE. StoreError: a bad store.
    """
    from ..errors import ConfigError, SaeError
    from ..model import LoadedModel, check_device, is_embedded, load_model
    from ..outputs import check_output_location
    from ..rundir.sae import SAE
    from ..store import ActivationStore

    if not evals:
        raise ConfigError("--eval is empty: name at least one evaluation")
    from .core import COMPAT_MODES

    if compat not in COMPAT_MODES:
        raise ConfigError(f"--compat {compat!r}: choose {' or '.join(COMPAT_MODES)}")
    for e in evals:
        eval_module(e)  # ValueError naming the choices for an unknown evaluation
    for name in eval_params or {}:
        if name not in evals or name == EVAL_TYPE_ID:
            others = ", ".join(e for e in evals if e != EVAL_TYPE_ID) or "none"
            raise ConfigError(f"-p {name}.…: {name!r} is not one of the evaluations run here ({others}; "
                              "core takes --tokens/--compat)")
    configs = {name: eval_settings(name, (eval_params or {}).get(name, {})) for name in evals if name != EVAL_TYPE_ID}
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ConfigError(f"--tokens {n_tokens!r} must be a positive integer")
    check_device(device)
    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ConfigError("no run directories given")
    # pass 0: every SAE loads and validates, every results location is writable — before any model
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
    needs_model = any(getattr(eval_module(e), "NEEDS_MODEL", True) for e in evals)
    opened = ActivationStore(store, storage_options=storage_options) if store is not None else None
    attrs = opened.attrs if opened is not None else None
    models: dict[tuple[str | None, bool], LoadedModel] = {}
    # pass 1: every run's cfg.json against the store and its model, before any forward pass
    plan: list[tuple[Path, LoadedModel | None, CoreConfig, str]] = []
    for run_dir in run_dirs:
        sae_cfg = saes[str(run_dir)].cfg
        if opened is not None and not allow_other_store:
            want, have = sae_cfg.get("content_digest"), opened.content_digest
            if want and have and not opened.accepts_digest(want, sae_cfg.get("hook_name"), sae_cfg.get("hook_digest")):
                raise IncompatibleSAEError(
                    f"{run_dir} was trained on a store with content digest {want[:16]}…, but {store} has "
                    f"{have[:16]}…: pass the store it was trained on ({sae_cfg.get('store_url')}), or "
                    "--allow-other-store to evaluate against this one anyway")
        if attrs is not None:
            check_compatible(sae_cfg, attrs.get("model_id"), attrs.get("model_fingerprint"),
                             int(attrs["d_model"]), list(attrs["hook_names"]), against="store",
                             run_dir=run_dir)
            model_id, weights = attrs.get("model_id"), attrs.get("model_weights")
        else:
            model_id, weights = sae_cfg.get("model_name"), sae_cfg.get("model_weights")
        if needs_model:
            key = (canonical_model_id(model_id), is_embedded(model_id, weights))
            if key not in models:
                models[key] = load_model(model_id, device, dtype=torch.float32, model_weights=weights)
            lm = models[key]
            check_compatible(sae_cfg, lm.model_id, model_fingerprints(lm), lm.d_model, model_hook_names(lm),
                             run_dir=run_dir)
        else:
            lm = None  # every requested evaluation reads only the SAE (and its run directory)
        cfg = resolve_config(CoreConfig(n_eval_tokens=n_tokens, device=device, compat=compat,
                                        dataset=attrs.get("dataset") if attrs else None,
                                        context_size=int(attrs["context_size"]) if attrs else None), sae_cfg)
        plan.append((run_dir, lm, cfg, str(sae_cfg["hook_name"])))
    # pass 2: core for all runs of one (model, hook, data) together — one shared clean/ablated
    # reference and one clean forward per batch for all of them (run_core_many), dropped when done
    keys = [reference_key(lm, hook, cfg) if lm is not None else (str(run_dir),) for run_dir, lm, cfg, hook in plan]
    core_files: dict[int, tuple[Path, str]] = {}
    if EVAL_TYPE_ID in evals:
        stem = EVAL_TYPE_ID if compat == "ours" else f"{EVAL_TYPE_ID}_{compat}"
        for rkey in dict.fromkeys(keys):
            group = [i for i, k in enumerate(keys) if k == rkey]
            _, lm, cfg, hook = plan[group[0]]
            reference = compute_reference(lm, hook, cfg, quiet=quiet)
            outs = run_core_many([saes[str(plan[i][0])] for i in group], lm, cfg, reference=reference,
                                 quiet=quiet, run_dirs=[str(plan[i][0]) for i in group])
            del reference
            for i, out in zip(group, outs, strict=True):
                res_dir = out_dirs[str(plan[i][0])]
                write_result(res_dir, EVAL_TYPE_ID, out["eval_config"], out["metric_categories"], out["details"],
                             saes[str(plan[i][0])].cfg, out["unstructured"], file_stem=stem)
                core_files[i] = (res_dir, stem)
    shared_cache: dict[tuple, object] = {}
    results: list[dict] = []
    for i, (run_dir, lm, cfg, hook) in enumerate(plan):
        sae = saes[str(run_dir)]
        res_dir = out_dirs[str(run_dir)]
        if i in core_files:
            results.append(read_result(*core_files[i]))
        ctx = EvalContext(lm=lm, hook_name=hook, layer=int(sae.cfg["hook_layer"]), dataset=str(cfg.dataset),
                          context_size=int(cfg.context_size), run_dir=run_dir,
                          store_path=str(store) if store is not None else None, device=device, quiet=quiet,
                          cache=shared_cache, results_dir=res_dir)
        for name in evals:
            if name == EVAL_TYPE_ID:
                continue
            mod = eval_module(name)
            reason = mod.available(ctx) if hasattr(mod, "available") else None
            if reason:
                if not quiet:
                    print(f"skipping {name} for {run_dir}: {reason}")
                continue
            t0 = time.perf_counter()
            out = mod.run(sae, ctx, configs[name])
            eval_config = {**out.eval_config, "wall_time_s": round(time.perf_counter() - t0, 2)}
            write_result(res_dir, mod.EVAL_TYPE_ID, eval_config, out.metrics, out.details, sae.cfg,
                         out.unstructured)
            results.append(read_result(res_dir, mod.EVAL_TYPE_ID))
    return results


def eval_settings(name: str, params: dict[str, str]) -> object:
    """``eval_module(name).Config`` with ``params`` (strings, typed by each field's default) applied.

    Raises:
        ConfigError: an unknown field, or a value that does not parse as the field's type.
    """
    import dataclasses

    from ..errors import ConfigError

    cls = eval_module(name).Config
    base = cls()
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


def print_comparison(results: Sequence[dict], console: object | None = None) -> None:
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
