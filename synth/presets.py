"""Synthetic-model configurations by name, or from a TOML file: ``sae store synth CONFIG``.

``synthsaebench-16k`` is SynthSAEBench-16k exactly as published (Chanin & Garriga-Alonso,
arXiv 2602.14687; SAELens ``docs/synth_sae_bench.md``, the model ``synth-sae-bench-16k-v2``):
16 384 features in 768 dimensions, Zipfian firing (exponent 0.5, p in [5e-4, 0.4]), a hierarchy of
128 roots × branching 4 × depth 3 whose children are mutually exclusive and scaled by their
parent, low-rank correlations (rank 25, scale 0.1), 100 orthogonalisation steps (lr 3e-4), mean
magnitudes linear 5.0 → 4.0, folded-normal std (mean 0.5, std 0.5), bias norm 0.5, seed 42.

``synthsaebench-cpu`` is the same structure at a quarter of the size, for a CPU: 4 096 features in
192 dimensions (the same 21.3 features per dimension), 32 roots (the same 16 % of features in the
hierarchy), everything else identical. Train SAEs of width 1 024 on it (a quarter of the features,
as the published width 4 096 is of 16 384).

A TOML file gives every field of ``SyntheticModelConfig.to_dict()`` (SAELens' own serialisation;
``sae store synth synthsaebench-cpu --print-config`` prints one to start from).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from ..errors import ConfigError

PRESETS = ("synthsaebench-16k", "synthsaebench-cpu")
SIZES = {"synthsaebench-16k": (16_384, 768, 128), "synthsaebench-cpu": (4_096, 192, 32)}


def _require_synthetic() -> Any:
    try:
        import sae_lens.synthetic as synthetic
    except ImportError as e:  # pragma: no cover - the extra is in dev
        raise ConfigError(f"synthetic stores need SAELens' generator: pip install 'sae[synth]' ({e})") from None
    return synthetic


def preset_config(name: str) -> Any:
    """The ``SyntheticModelConfig`` of preset ``name`` (see the module doc).

    Raises:
        ConfigError: an unknown name (naming the presets).
    """
    if name not in SIZES:
        raise ConfigError(f"unknown synthetic preset {name!r}: choose {', '.join(PRESETS)} or give a .toml file")
    s = _require_synthetic()
    n_features, hidden_dim, roots = SIZES[name]
    return s.SyntheticModelConfig(
        num_features=n_features, hidden_dim=hidden_dim,
        firing_probability=s.ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
        hierarchy=s.HierarchyConfig(total_root_nodes=roots, branching_factor=4, max_depth=3,
                                    mutually_exclusive_portion=1.0, mutually_exclusive_min_depth=0,
                                    compensate_probabilities=True, scale_children_by_parent=True),
        orthogonalization=s.OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=s.LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=s.LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=s.FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5, seed=42)


def load_config(spec: str) -> tuple[str, Any]:
    """``(name, SyntheticModelConfig)`` of a preset name or a TOML file path.

    Raises:
        ConfigError: unknown preset; unreadable file; a file SAELens cannot parse (its message).
    """
    if spec in SIZES:
        return spec, preset_config(spec)
    path = Path(spec)
    if path.suffix != ".toml":
        raise ConfigError(f"unknown synthetic preset {spec!r}: choose {', '.join(PRESETS)} or give a .toml file")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read synthetic config {spec}: {e}") from None
    s = _require_synthetic()
    try:
        cfg = s.SyntheticModelConfig.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{spec}: not a SyntheticModelConfig ({e.__class__.__name__}: {e}); start from "
                          "`sae store synth synthsaebench-cpu --print-config`") from None
    if cfg.seed is None:
        raise ConfigError(f"{spec}: give a seed (the store records it so the dictionary can be rebuilt)")
    return path.stem, cfg


def to_toml(cfg: Any) -> str:
    """``cfg`` as the TOML :func:`load_config` reads (None fields are left out, as TOML has no null)."""
    def emit(d: dict, prefix: str) -> list[str]:
        flat = [f"{k} = {_toml_value(v)}" for k, v in d.items() if v is not None and not isinstance(v, dict)]
        out = ([f"[{prefix}]"] if prefix and flat else []) + flat
        for k, v in d.items():
            if isinstance(v, dict):
                out += ["", *emit(v, f"{prefix}.{k}" if prefix else k)]
        return out
    return "\n".join(emit(cfg.to_dict(), "")) + "\n"


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)
