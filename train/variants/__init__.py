"""Orthogonality variants: one penalty per module, selected by name (``--variant NAME``)."""

from .base import (
    BASELINES,
    VARIANTS,
    NoPenalty,
    Penalty,
    PenaltyContext,
    build_penalty,
    make_config,
    penalty_class,
    register,
    variant_names,
)

__all__ = ["BASELINES", "VARIANTS", "NoPenalty", "Penalty", "PenaltyContext", "build_penalty", "make_config",
           "penalty_class", "register", "variant_names"]
