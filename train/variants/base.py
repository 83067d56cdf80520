"""The penalty interface every orthogonality variant implements, and the variant registry.

A variant is a :class:`Penalty`: an ``nn.Module`` whose state lives in registered buffers (so it
is saved in checkpoints and restored by ``--resume``), configured by a dataclass, that maps a
:class:`PenaltyContext` to a scalar loss added to the base SAE loss plus a dict of logged terms.
The SAE does not know which penalty is attached; schedules read progress from the context,
never from globals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import ConfigError
from ...params import build_params
from ...registry import Registry
from ...rundir.sae import SparseCodes


@dataclass
class PenaltyContext:
    """Everything a penalty may look at for one training step.

    Attributes:
        W_dec: ``[d_sae, d_in]`` decoder parameter (unit rows; gradients flow into it).
        codes: sparse codes of the batch, ``vals``/``idx`` ``[batch, K]`` (``vals`` are
            differentiable; 0 marks an inactive slot).
        step: 0-based index of this optimiser step. total_steps: steps in the whole run.
        generator: a CPU ``torch.Generator`` seeded from ``(seed, step)``, for random chunking
            (stateless, hence identical after ``--resume``).
    """

    W_dec: torch.Tensor
    codes: SparseCodes
    step: int
    total_steps: int
    generator: torch.Generator

    @property
    def progress(self) -> float:
        """Training progress p = step / total_steps ∈ [0, 1]."""
        return min(self.step / max(self.total_steps, 1), 1.0)

    @property
    def n_tokens(self) -> int:
        return self.codes.batch

    @property
    def d_sae(self) -> int:
        return int(self.W_dec.shape[0])


class Penalty(nn.Module):
    """Base class: subclasses set ``name``, ``Config`` and implement :meth:`forward`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = type(None)
    uses_codes: ClassVar[bool] = True
    """Whether :meth:`forward` reads ``ctx.codes`` (a data-parallel run then gathers the whole
    global batch's codes for it; the penalty never differentiates through them)."""

    def __init__(self, d_sae: int, d_in: int, config: Any) -> None:
        super().__init__()
        self.d_sae, self.d_in, self.config = d_sae, d_in, config

    def forward(self, ctx: PenaltyContext) -> tuple[torch.Tensor, dict[str, float]]:
        """Return ``(penalty, logs)``: a scalar already multiplied by its weight, and its terms."""
        raise NotImplementedError

    def diagnostics(self, W_dec: torch.Tensor) -> dict[str, Any]:
        """Extra (possibly costly) diagnostics, computed only at logging steps."""
        return {}


class NoPenalty(Penalty):
    """The plain ``topk``/``relu`` baselines: no orthogonality term."""

    name = "none"
    uses_codes = False

    @dataclass
    class Config:
        pass

    def forward(self, ctx: PenaltyContext) -> tuple[torch.Tensor, dict[str, float]]:
        return ctx.W_dec.new_zeros(()), {}


VARIANTS: Registry[type[Penalty]] = Registry(
    "variant", "--variant", __package__ or "sae.train.variants",
    ("topk_pairs", "adaptive", "progressive", "temporal", "static_ortho", "ortsae"))
"""The orthogonality penalties (one module each; add a new one's module name here)."""
register = VARIANTS.register
BASELINES = ("none", "topk", "relu")
"""Names without a penalty: ``none``, and the old spellings ``topk``/``relu`` of ``--arch``."""


def variant_names() -> list[str]:
    """All names ``--variant`` accepts: the baselines, then the penalties in module order."""
    return [*BASELINES, *VARIANTS.names()]


def make_config(variant: str, params: dict[str, Any] | None = None) -> Any:
    """Build ``variant``'s config dataclass from defaults overridden by ``params``.

    Values given as strings (``-p NAME=VALUE``) are converted to the field's type; every value is
    checked against the config's ``ranges`` (e.g. ``lambda_ >= 0``: a negative weight would reward
    correlated decoders). Raises ``ConfigError`` naming the parameter, for an unknown key (with
    the valid ones), a value of the wrong type, or one out of range.
    """
    cls = NoPenalty.Config if variant in BASELINES else penalty_class(variant).Config
    return build_params(cls, f"variant {variant!r}", params)


def penalty_class(variant: str) -> type[Penalty]:
    """The penalty class for ``variant`` (``NoPenalty`` for the baselines)."""
    if variant in BASELINES:
        return NoPenalty
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}: choose one of {', '.join(variant_names())}")
    return VARIANTS.get(variant)


def build_penalty(variant: str, d_sae: int, d_in: int, params: dict[str, Any] | None = None) -> Penalty:
    """Instantiate the penalty of ``variant`` with its config."""
    return penalty_class(variant)(d_sae, d_in, make_config(variant, params))
