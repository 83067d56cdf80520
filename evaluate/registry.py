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
EVAL_MODULES = ("core", "sparse_probing", "absorption", "scr", "tpp", "unlearning", "geometry")


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

    @property
    def model(self) -> LoadedModel:
        """The loaded model, for evaluations that need one (``NEEDS_MODEL`` is not False).

        Raises:
            RuntimeError: no model was loaded (the evaluation declared ``NEEDS_MODEL = False``).
        """
        if self.lm is None:
            raise RuntimeError("this evaluation needs the model, but none was loaded (NEEDS_MODEL = False?)")
        return self.lm

    def cached(self, key: tuple, fn: Callable[[], Any]) -> Any:
        """``fn()`` memoised under ``(model fingerprint, hook, *key)``."""
        full = (self.lm.fingerprint if self.lm is not None else None, self.hook_name, *key)
        if full not in self.cache:
            self.cache[full] = fn()
        return self.cache[full]


@dataclass
class EvalOutput:
    """What ``run`` returns: SAEBench-shaped pieces of the result file.

    ``metrics``: ``{category: {metric: value}}`` (``eval_result_metrics``); ``details``: list of
    dicts (``eval_result_details``); ``eval_config``: the settings used; ``unstructured``: anything else.
    """

    metrics: dict[str, dict[str, Any]]
    details: list[dict[str, Any]] = field(default_factory=list)
    eval_config: dict[str, Any] = field(default_factory=dict)
    unstructured: Any = None


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
