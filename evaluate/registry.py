"""The contract every evaluation module follows, and the registry ``sae evaluate --eval`` reads.

An evaluation is a module ``sae.evaluate.<name>`` defining:

* ``EVAL_TYPE_ID: str`` — its name (= the result file ``eval_results/<EVAL_TYPE_ID>.json``);
* ``Config`` — a dataclass of its settings (defaults = SAEBench's where they exist);
* ``run(sae, ctx, cfg) -> EvalOutput`` — computes metrics for one SAE;
* optionally ``run_many(saes, ctxs, cfg) -> list[EvalOutput]`` — several SAEs at once, when they can
  share work (``core``: one clean/zero-ablated pass per model and hook); without it ``run`` is
  called per SAE;
* optionally ``available(ctx) -> str | None`` — ``None`` when it can run, else the reason it
  cannot (e.g. "no WMDP file"); evaluations that cannot run are skipped with that message;
* optionally ``requires() -> str | None`` — what to install when a package it needs is missing (an
  evaluation asked for by name is then refused in one line; the default set leaves it out) and
  ``check(cfg, device)`` — refuses bad settings (``ConfigError``) before anything loads;
* optionally ``NEEDS_MODEL = False`` (it reads only the SAE and its run directory: no model loads)
  and ``result_stem(cfg) -> str`` (the result file's name when it is not ``EVAL_TYPE_ID``).

Every evaluation, ``core`` included, follows this contract, so ``sae evaluate -p NAME.SETTING=VALUE``
works the same for all (each ``Config`` declares the ``ranges`` of its settings).

Model activations that do not depend on the SAE must be computed through ``ctx.cached(key, fn)``
so that evaluating ten SAEs costs little more than one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..model import LoadedModel
from ..registry import Registry

# Evaluation modules in their default running order.
EVAL_MODULES = ("core", "sae_probes", "sparse_probing", "absorption", "scr", "tpp", "unlearning", "geometry",
                "ground_truth")


@dataclass
class EvalContext:
    """What an evaluation may use besides the SAE.

    Attributes:
        lm: the loaded model (float32); None when every requested evaluation has ``NEEDS_MODEL = False``.
            ``hook_name``/``layer``: where the SAE reads.
        dataset: corpus spec of the store/SAE (``embedded`` by default); ``context_size``: its
            sequence length. ``run_dir``: the SAE's run directory (metrics.jsonl, cfg.json).
        store_path: the store, when given (token ids for feature browsing).
        results_dir: where this run's ``eval_results/`` are written (the run directory unless
            ``sae evaluate --results-dir`` is given).
        cache: shared across all SAEs of one ``evaluate_runs`` call.
    """

    lm: LoadedModel | None
    hook_name: str
    layer: int
    dataset: str
    context_size: int
    run_dir: Path
    store_path: str | None = None
    device: str = "auto"
    quiet: bool = True
    cache: dict[tuple, Any] = field(default_factory=dict)
    results_dir: Path | None = None
    disk_cache: Path | None = None
    """Folder for work worth keeping between ``sae evaluate`` calls (``cached(..., persist=True)``);
    None (``--no-cache``) keeps everything in memory only."""

    @property
    def model(self) -> LoadedModel:
        """The loaded model, for evaluations that need one (``NEEDS_MODEL`` is not False).

        Raises:
            RuntimeError: no model was loaded (the evaluation declared ``NEEDS_MODEL = False``).
        """
        if self.lm is None:
            raise RuntimeError("this evaluation needs the model, but none was loaded (NEEDS_MODEL = False?)")
        return self.lm

    def cached(self, key: tuple, fn: Callable[[], Any], persist: bool = False, memory: bool = True) -> Any:
        """``fn()`` memoised under ``(model fingerprint, hook, *key)`` for this ``evaluate_runs`` call.

        ``persist=True`` also keeps it on disk in ``disk_cache/artifacts/`` (file name: a hash of the
        package version and the full key), so later calls reuse it, as SAEBench keeps its artifacts.
        ``key`` must then name everything the value depends on besides the model and hook. A cache
        file that cannot be read is recomputed and rewritten; one that cannot be written is skipped.
        The files are pickles (``torch.save``): keep the folder private. ``memory=False`` does not
        keep the value in this call's memory (a large value the caller frees itself).
        """
        full = (self.lm.fingerprint if self.lm is not None else None, self.hook_name, *key)
        if full in self.cache:
            return self.cache[full]
        path = _artifact_path(self.disk_cache, full) if persist and self.disk_cache is not None else None
        value = _load_artifact(path) if path is not None else None
        if value is None:
            value = fn()
            if path is not None:
                _save_artifact(path, value)
        if memory:
            self.cache[full] = value
        return value

    def persist(self, key: tuple) -> None:
        """Write the current value of ``cached(key, ...)`` to disk again (after the caller grew it, e.g.
        a memo of per-text activations); nothing without a disk cache."""
        full = (self.lm.fingerprint if self.lm is not None else None, self.hook_name, *key)
        if self.disk_cache is not None and full in self.cache:
            _save_artifact(_artifact_path(self.disk_cache, full), self.cache[full])


ARTIFACT_FORMAT = 1
"""Bumped when a cached artifact's layout changes (old files are then ignored)."""


def _artifact_path(folder: Path, key: tuple) -> Path:
    import hashlib

    from .. import __version__

    digest = hashlib.sha256(repr((ARTIFACT_FORMAT, __version__, key)).encode()).hexdigest()[:32]
    return Path(folder) / "artifacts" / f"{key[2] if len(key) > 2 else 'eval'}-{digest}.pt"


def _load_artifact(path: Path) -> Any:
    import torch

    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - a truncated or foreign file: recompute it
        return None


def _save_artifact(path: Path, value: Any) -> None:
    import contextlib
    import os

    import torch

    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        torch.save(value, tmp)
        os.replace(tmp, path)


@dataclass
class EvalOutput:
    """What ``run`` returns: SAEBench-shaped pieces of the result file.

    ``metrics``: ``{category: {metric: value}}`` (``eval_result_metrics``); ``details``: list of
    dicts (``eval_result_details``); ``eval_config``: the settings used; ``unstructured``: anything else;
    ``extra``: further top-level keys of the evaluation's SAEBench output.
    """

    metrics: dict[str, dict[str, Any]]
    details: list[dict[str, Any]] = field(default_factory=list)
    eval_config: dict[str, Any] = field(default_factory=dict)
    unstructured: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


EVALUATIONS: Registry[ModuleType] = Registry("evaluation", "--eval", __package__ or "sae.evaluate", EVAL_MODULES,
                                             entries_are_modules=True)
"""The evaluations: each is its module (the contract above), imported when first asked for."""


def eval_module(name: str) -> ModuleType:
    """The module of evaluation ``name``.

    Raises:
        ConfigError (a ``ValueError``): an unknown name, naming the choices.
    """
    return EVALUATIONS.get(name)


def available_evals() -> list[str]:
    """Every evaluation, in running order."""
    return EVALUATIONS.names()
