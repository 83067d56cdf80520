"""Evaluation stage: SAEBench-style metrics of trained SAE runs, written to ``RUN/eval_results/*.json``.

:mod:`.core` (reconstruction, sparsity, CE/KL with the SAE spliced in), :mod:`.common` (held-out
tokens, model activations). The result files and the SAE/store identity checks belong to the run
directory (:mod:`sae.rundir.results`, :mod:`sae.rundir.identity`).
:func:`evaluate_runs` loads each model once, shares the clean held-out pass between all SAEs of a
(model, hook, dataset) and writes one result file per run and evaluation.

Public names are loaded lazily, so importing one submodule does not import every evaluation.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "AVAILABLE_EVALS": "runner", "COMPARISON_COLUMNS": "runner", "evaluate_runs": "runner",
    "print_comparison": "runner",
    "CoreConfig": "core", "run_core": "core",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
