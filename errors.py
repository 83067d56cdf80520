"""Typed, expected errors. Each message names the problem and the fix; the CLI prints it as one
``error:`` line (exit code :attr:`SaeError.exit_code`) and never a traceback."""

from __future__ import annotations


class SaeError(ValueError):
    """An expected failure caused by input or state the user controls (bad option, existing output,
    corrupt store, diverged training...). Subclasses ``ValueError`` so callers may catch either."""

    exit_code: int = 2


class ConfigError(SaeError):
    """An option, ``-p`` value or ``--config`` file is invalid: the message names it and its allowed range."""


class NonFiniteError(SaeError):
    """NaN or ±inf where a finite value is required (activations, loss, weights)."""


class Interrupted(SaeError):
    """A run was stopped by SIGTERM/SIGINT after saving a checkpoint (exit code 128 + signal number)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class SAELoadError(SaeError):
    """An SAE's ``cfg.json`` or weights file is unreadable, inconsistent, or of a layout we cannot run."""


class UnavailableError(SaeError, RuntimeError):
    """A model, tokenizer, dataset or optional dependency cannot be had here (offline, not installed)."""
