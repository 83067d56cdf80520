"""Read Llama Scope SAEs (He et al. 2024, arXiv 2410.20526): a folder holding ``hyperparams.json`` and
``checkpoints/final.safetensors``, as the ``fnlp/Llama3_1-8B-Base-LX…`` repositories publish them.

Layout: ``encoder.weight [d_sae, d_in]``, ``encoder.bias [d_sae]``, ``decoder.weight [d_in, d_sae]``,
``decoder.bias [d_in]``; ``hyperparams.json`` gives ``d_model``, ``d_sae``, ``hook_point_in``, a
scalar ``jump_relu_threshold`` and ``dataset_average_activation_norm.in``.

Math, as SAELens 6 loads these files (``llama_scope_sae_huggingface_loader``, then
``fold_activation_norm_scaling_factor``): the SAE works on ``s·x`` with the norm factor
``s = √d_model / dataset_average_activation_norm.in``, does not centre the input by ``b_dec``, and
its JumpReLU threshold is ``jump_relu_threshold · s`` for every latent::

    pre = (s·x) Wᵀ_enc + b_enc        f = pre·H(pre − θ)        x̂ = (f W_decᵀ + b_dec) / s

so ``W_enc = s·Wᵀ_enc``, ``W_dec = W_decᵀ/s``, ``b_dec = b_dec/s``, then the input-bias fold
``b_enc' = b_enc + b_dec W_enc`` (all float64). The release table's per-SAE ``norm_scaling_factor``
replaces ``s`` in the fold when given (as SAELens does; ``activation_scale``); the threshold always uses
the file's own ``s``, as SAELens' loader does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import SAELoadError
from ..rundir.canonical import Canonical, finish, fold_input_bias, need

HYPER, WEIGHTS = "hyperparams.json", "checkpoints/final.safetensors"


def read(path: str | Path, activation_scale: float | None = None) -> Canonical:
    """Convert the Llama Scope SAE in folder ``path``.

    Raises:
        SAELoadError: missing or unreadable files, missing fields or tensors, inconsistent shapes, a
            non-positive activation norm or a negative threshold.
    """
    p = Path(path)
    if not (p / HYPER).is_file() or not (p / WEIGHTS).is_file():
        raise SAELoadError(f"{p} is not a Llama Scope SAE: it needs {HYPER} and {WEIGHTS}")
    try:
        hp = json.loads((p / HYPER).read_text())
        d_in, d_sae, hook = int(hp["d_model"]), int(hp["d_sae"]), str(hp["hook_point_in"])
        avg_in = float(hp["dataset_average_activation_norm"]["in"])
        theta0 = float(hp["jump_relu_threshold"])
    except (ValueError, KeyError, TypeError) as e:
        raise SAELoadError(f"{p / HYPER} lacks or mangles {e}: not a Llama Scope hyperparams file") from None
    if not (math.isfinite(avg_in) and avg_in > 0) or not (math.isfinite(theta0) and theta0 >= 0):
        raise SAELoadError(f"{p / HYPER}: dataset_average_activation_norm.in must be > 0 and jump_relu_threshold "
                           f">= 0 (got {avg_in}, {theta0})")
    try:
        raw = load_file(str(p / WEIGHTS))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own kinds for a bad file
        raise SAELoadError(f"{p / WEIGHTS} is not a readable safetensors file ({e.__class__.__name__})") from None
    where = str(p / WEIGHTS)
    W_e = need(raw, "encoder.weight", (d_sae, d_in), where)
    b_e = need(raw, "encoder.bias", (d_sae,), where)
    W_d = need(raw, "decoder.weight", (d_in, d_sae), where)
    b_d = need(raw, "decoder.bias", (d_in,), where)
    s_file = math.sqrt(d_in) / avg_in
    s = float(activation_scale) if activation_scale is not None else s_file
    W_enc, W_dec, b_dec = W_e.T * s, W_d.T / s, b_d / s
    theta = torch.full((d_sae,), theta0 * s_file, dtype=torch.float64)
    cfg = {"source_format": "llama_scope", "source_architecture": "jumprelu", "hook_name": hook,
           "model_name": "meta-llama/Llama-3.1-8B", "source_cfg": hp}
    return finish("jumprelu", d_in, d_sae, 1, W_enc, fold_input_bias(b_e, b_dec, W_enc), W_dec, b_dec, theta, cfg,
                  [f"activation_scale={s:g}", "input_bias"])


__all__ = ["HYPER", "WEIGHTS", "read"]
