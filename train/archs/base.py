"""The interface every SAE architecture implements, and the architecture registry.

An architecture decides how a training batch is *encoded* (which latents fire, with which
differentiable values), which sparsity terms join the loss, how the reconstruction loss is formed,
and in which inference form the SAE is saved. The SAE parameters themselves (``W_enc``, ``b_enc``,
``W_dec``, ``b_dec``) live in :class:`~sae.rundir.sae.SAE`; an architecture's own state (BatchTopK's
threshold estimate, JumpReLU's learned ``log_threshold``) lives in its registered buffers and
parameters, so it is checkpointed and restored exactly by ``--resume``.

Every architecture returns :class:`~sae.rundir.sae.SparseCodes` ``[batch, K]``: a variable number of
active latents per token is carried as value-0 padding slots (``vals == 0`` means inactive), so
the decoder and the orthogonality penalties stay on the sparse path (no ``[batch, d_sae]``
decoder product) and the penalties see the real co-firing sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import ConfigError
from ...params import build_params
from ...registry import Registry
from ...rundir.sae import SAE, SparseCodes
from ..collective import LOCAL, Collective


@dataclass
class Encoded:
    """One training batch encoded by an architecture.

    Attributes:
        codes: ``vals``/``idx`` ``[batch, K]``; ``vals`` carry the gradients into the encoder.
        pre: ``[batch, d_sae]`` no-grad pre-activations (AuxK picks dead latents from them), or None.
        losses: extra loss terms already weighted (sparsity penalties), summed into the loss.
        logs: scalars for ``metrics.jsonl``: 0-d tensors (read on the host at log steps only) or floats.
    """

    codes: SparseCodes
    pre: torch.Tensor | None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    logs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Inference:
    """How a trained architecture is saved: the inference ``activation`` of :class:`SAE`
    (``topk`` | ``relu`` | ``jumprelu``), its ``k`` (TopK), its ``threshold [d_sae]`` (JumpReLU),
    and extra ``cfg.json`` fields (e.g. ``matryoshka_widths``)."""

    activation: str
    k: int = 1
    threshold: torch.Tensor | None = None
    cfg: dict[str, Any] = field(default_factory=dict)


class Arch(nn.Module):
    """Base class: subclasses set ``name``, ``Config``, ``uses_auxk``, and implement :meth:`encode`
    and :meth:`inference`; :meth:`reconstruction` defaults to the FVU of the full decode.

    Args:
        d_in, d_sae: SAE shape. k: the target number of active latents per token (TopK's exact
        k; BatchTopK's and Matryoshka's batch mean; JumpReLU's target L0). config: ``Config``
        instance. train_cfg: the run's :class:`~sae.train.config.TrainConfig` (ReLU reads its L1
        options from it).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = type(None)
    uses_auxk: ClassVar[bool] = False
    """Whether the trainer adds the AuxK dead-latent loss (Gao et al. 2024) from ``Encoded.pre``."""
    source: ClassVar[str] = ""
    fixed_width: ClassVar[bool] = False
    """Whether every batch's codes are padded ``[batch, K]`` with one ``K`` fixed by the config (TopK)."""
    additive_logs: ClassVar[tuple[str, ...]] = ("fvu",)
    """Logged terms that are sums over the batch's rows divided by a global normaliser (see
    :meth:`is_additive`)."""

    def __init__(self, d_in: int, d_sae: int, k: int, config: Any, train_cfg: Any) -> None:
        super().__init__()
        self.d_in, self.d_sae, self.k, self.config = d_in, d_sae, k, config
        self.dist: Collective = LOCAL
        """The ranks of a data-parallel run (:mod:`sae.train.collective`; set by the trainer)."""

    def is_additive(self, key: str) -> bool:
        """Whether logged term ``key`` is a per-row sum over a global normaliser: under data-parallel
        training each rank logs its share and the shares are summed; every other term is equal on
        every rank."""
        return key in self.additive_logs

    def global_batch(self, local: int) -> int:
        """Rows of the global batch when this rank holds ``local`` of them (equal shares)."""
        return local * self.dist.world

    @classmethod
    def check(cls, d_in: int, d_sae: int, k: int, config: Any) -> None:
        """Checks that need the SAE's shape (run before any side effect). Raises ``ConfigError``."""
        if not 0 < k <= d_sae:
            raise ConfigError(f"--k {k} must be in 1..d_sae = {d_sae}")

    def encode(self, sae: SAE, x_c: torch.Tensor, step: int, total_steps: int, dead: torch.Tensor) -> Encoded:
        """Encode ``x_c = x − b_dec`` ``[batch, d_in]`` (normalised units) for training step ``step``
        of ``total_steps``; ``dead`` ``[d_sae]`` bool marks the latents that have not fired for
        ``dead_tokens`` training tokens."""
        raise NotImplementedError

    def reconstruction(self, sae: SAE, x: torch.Tensor, codes: SparseCodes,
                       total_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """``(loss, x̂ [batch, d_in], logs)``; default: ``FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖²``.

        ``logs["fvu"]`` is always the FVU of the *full* reconstruction."""
        x_hat = sae.decode_sparse(codes)
        fvu = (x - x_hat).pow(2).sum() / total_var
        return fvu, x_hat, {"fvu": fvu.detach()}

    def inference(self) -> Inference:
        """The saved form (see :class:`Inference`)."""
        raise NotImplementedError

    def after_step(self, sae: SAE) -> None:
        """Hook run after the optimiser step (no grad), e.g. to project parameters."""

    def init_from_saved(self, sae: SAE) -> None:
        """Take the architecture's own state from a saved SAE being fine-tuned (``--init-from``; in
        training units). Default: nothing (TopK and ReLU have no state beyond the SAE's weights)."""


def warmed_up(value: float, step: int, total_steps: int, frac: float) -> float:
    """``value`` ramped linearly from step 0 to ``frac · total_steps`` (the sparsity coefficients
    of ReLU's L1 and JumpReLU's L0 terms), constant after."""
    return value * min(1.0, (step + 1) / max(total_steps * frac, 1))


ARCHS: Registry[type[Arch]] = Registry("architecture", "--arch", __package__ or "sae.train.archs",
                                       ("topk", "relu", "batchtopk", "jumprelu", "matryoshka"))
"""The base architectures (one module each, in the order ``--arch`` lists them)."""
register = ARCHS.register


def arch_names() -> list[str]:
    """All names ``--arch`` accepts."""
    return ARCHS.names()


def arch_class(name: str) -> type[Arch]:
    """The class of architecture ``name``. Raises ``ConfigError`` for an unknown one."""
    if name not in ARCHS:
        raise ConfigError(f"unknown --arch {name!r}: choose one of {', '.join(arch_names())}")
    return ARCHS.get(name)


def make_arch_config(name: str, params: dict[str, Any] | None = None) -> Any:
    """``name``'s config dataclass from its defaults overridden by ``params`` (checked). JumpReLU's
    old ``variant`` parameter is read as ``sparsity_loss``."""
    if name == "jumprelu" and params and "variant" in params:
        params = {("sparsity_loss" if k == "variant" else k): v for k, v in params.items()}
    return build_params(arch_class(name).Config, f"arch {name!r}", params)


def arch_param_names(name: str) -> set[str]:
    """The ``-p`` names that belong to architecture ``name`` (the rest go to the variant)."""
    import dataclasses

    return {f.name for f in dataclasses.fields(arch_class(name).Config)}


def build_arch(name: str, d_in: int, d_sae: int, k: int, params: dict[str, Any] | None, train_cfg: Any) -> Arch:
    """Instantiate architecture ``name`` with its config."""
    return arch_class(name)(d_in, d_sae, k, make_arch_config(name, params), train_cfg)
