"""Names of the run-directory layout (``docs/run-directory.md`` is the spec).

A run directory is what ``sae train``/``sae sweep`` write for one SAE: the SAE's saved form
(``cfg.json`` + ``sae_weights.safetensors``, SAELens' layout), the training log, the penalty's final
state, a checkpoint while training, and ``eval_results/`` that ``sae evaluate`` adds.
"""

from __future__ import annotations

from ..outputs import RUN_MARKER, is_sae_run

WEIGHTS_FILE = "sae_weights.safetensors"
"""The SAE's tensors (SAELens names: ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``)."""
CFG_FILE = "cfg.json"
"""The SAE's configuration, provenance and training settings (one JSON object)."""
METRICS_FILE = "metrics.jsonl"
"""One JSON object per logged training step."""
CHECKPOINT_FILE = "checkpoint.pt"
"""The trainer's state while a run is unfinished (read only by ``sae train --resume``)."""
PENALTY_STATE_FILE = "penalty_state.safetensors"
"""The penalty's final buffers (groups, EMAs...) of a finished run, when it has any."""
RESULTS_DIR = "eval_results"
"""Folder of the evaluation result files, ``<eval_type_id>.json``."""

__all__ = ["CFG_FILE", "CHECKPOINT_FILE", "METRICS_FILE", "PENALTY_STATE_FILE", "RESULTS_DIR", "RUN_MARKER",
           "WEIGHTS_FILE", "is_sae_run"]
