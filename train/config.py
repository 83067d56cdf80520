"""Training configuration (one dataclass; every field is a CLI option and lands in cfg.json)."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    """Hyperparameters of one SAE training run.

    Defaults follow Gao et al. 2024 (TopK, AuxK α = 1/32, k_aux = d_in/2) and SAELens (Adam,
    decoder-norm-weighted L1 with warm-up for ReLU), adapted to short CPU runs.
    """

    store: str = "acts.zarr"
    hook_name: str | None = None
    """Store array to train on; None = the store's only hook."""
    variant: str = "topk"
    """topk | relu | an orthogonality penalty (topk_pairs, adaptive, progressive, temporal, ...)."""
    arch: str | None = None
    """Base activation: topk | relu. None = relu for variant 'relu', else topk."""
    variant_params: dict[str, Any] = field(default_factory=dict)
    """Penalty hyperparameters (see the variant's Config); unspecified ones take defaults."""
    d_sae: int | None = None
    expansion: int = 8
    """d_sae = expansion · d_in when d_sae is None."""
    k: int = 32
    l1_coefficient: float = 2.0
    """ReLU only: λ of λ·mean_b Σ_i f_bi‖W_dec,i‖ (in units of the FVU loss)."""
    l1_warmup_frac: float = 0.05
    lr: float = 1e-3
    lr_warmup_steps: int = 20
    lr_decay_frac: float = 0.2
    """Linear decay to 0 over this final fraction of steps."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    tokens: int = 1_000_000
    """Training tokens (token-updates); steps = tokens // batch_size."""
    batch_size: int = 4096
    aux_k_coefficient: float = 1 / 32
    aux_k: int | None = None
    """Latents in the AuxK reconstruction; None = d_in // 2."""
    dead_tokens: int = 200_000
    """A latent is dead when it has not fired for this many training tokens."""
    mix_chunks: int = 4
    normalize: bool = True
    """Scale inputs so that E‖x‖² = d_in (store statistics); folded into the saved weights."""
    seed: int = 0
    device: str = "auto"
    out: str = "runs/sae"
    resume: bool = False
    overwrite: bool = False
    log_every: int = 10
    checkpoint_every: int = 50

    @property
    def activation(self) -> str:
        return self.arch or ("relu" if self.variant == "relu" else "topk")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a TOML file: top-level keys are fields; a ``[variant_params]`` table (or a table
        named after the variant) gives penalty hyperparameters. ``overrides`` win."""
        data = tomllib.loads(Path(path).read_text())
        names = {f.name for f in fields(cls)}
        params = dict(data.pop("variant_params", {}))
        variant = overrides.get("variant") or data.get("variant", "topk")
        params.update(data.pop(variant, {}) if isinstance(data.get(variant), dict) else {})
        unknown = [k for k in data if k not in names and not isinstance(data[k], dict)]
        if unknown:
            raise ValueError(f"{path}: unknown training option {unknown[0]!r}")
        kw = {k: v for k, v in data.items() if k in names}
        kw.update(overrides)
        kw["variant_params"] = {**params, **overrides.get("variant_params", {})}
        if "adam_betas" in kw:
            kw["adam_betas"] = tuple(kw["adam_betas"])
        return cls(**kw)
