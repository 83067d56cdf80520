"""Read Gemma Scope SAEs (Lieberum et al. 2024, arXiv 2408.05147): a folder holding ``params.npz``.

Layout (as ``google/gemma-scope-*`` repositories publish it, e.g.
``layer_12/width_16k/average_l0_71/params.npz``): ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
``b_enc [d_sae]``, ``b_dec [d_in]``, ``threshold [d_sae]`` (some releases spell the matrices ``w_enc``,
``w_dec``; an all-ones ``scaling_factor`` is ignored, any other is refused).

Math (the release's reference JumpReLU): ``pre = x W_enc + b_enc``, ``f = pre·H(pre − θ)``,
``x̂ = f W_dec + b_dec``: the input is *not* centred by ``b_dec``, so the encoder bias is folded
exactly (:func:`~sae.rundir.canonical.fold_input_bias`, float64): ``b_enc' = b_enc + b_dec W_enc``.
ReLU(pre)·H(pre − θ) equals pre·H(pre − θ) for θ ≥ 0, which Gemma Scope's thresholds are.

The files record no model or hook: a ``…-res`` folder path with ``layer_<L>`` gives
``blocks.<L>.hook_resid_post``; otherwise ``--hook-name`` and ``--model`` are needed
(:func:`sae.interop.pretrained.resolve` supplies both from SAELens' release table).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..errors import SAELoadError
from ..model import hook_name_for
from ..rundir.canonical import Canonical, finish, fold_input_bias, need

PARAMS = "params.npz"


def read(path: str | Path) -> Canonical:
    """Convert the Gemma Scope SAE in folder ``path`` (or the ``params.npz`` file itself).

    Raises:
        SAELoadError: no or an unreadable ``params.npz``, missing tensors, inconsistent shapes, a
            non-trivial ``scaling_factor``, or a negative threshold.
    """
    p = Path(path)
    f = p if p.is_file() else p / PARAMS
    if not f.is_file():
        raise SAELoadError(f"{p} is not a Gemma Scope SAE: it has no {PARAMS}")
    try:
        with np.load(f) as data:
            raw = {("W_" + k[2:] if k.startswith("w_") else k): torch.from_numpy(np.asarray(data[k])) for k in data}
    except Exception as e:  # noqa: BLE001 - numpy raises several kinds for a bad archive
        raise SAELoadError(f"{f} is not a readable .npz archive ({e.__class__.__name__})") from None
    if "W_enc" not in raw or raw["W_enc"].ndim != 2:
        raise SAELoadError(f"{f} has no 2-D W_enc (it has {', '.join(sorted(raw))}): not a Gemma Scope SAE")
    d_in, d_sae = (int(n) for n in raw["W_enc"].shape)
    W_enc = need(raw, "W_enc", (d_in, d_sae), str(f))
    W_dec = need(raw, "W_dec", (d_sae, d_in), str(f))
    b_enc = need(raw, "b_enc", (d_sae,), str(f))
    b_dec = need(raw, "b_dec", (d_in,), str(f))
    theta = need(raw, "threshold", (d_sae,), str(f))
    if "scaling_factor" in raw and not torch.all(raw["scaling_factor"] == 1):
        raise SAELoadError(f"{f} has a scaling_factor other than 1 (a fine-tuned decoder scale), which we do not "
                           "read yet")
    if bool((theta < 0).any()):
        raise SAELoadError(f"{f} has negative thresholds: not a Gemma Scope JumpReLU SAE")
    folder = str(p if p.is_dir() else p.parent)
    layer = re.search(r"layer_(\d+)", folder)
    cfg = {"source_format": "gemma_scope", "source_architecture": "jumprelu",
           "hook_name": hook_name_for(int(layer.group(1))) if layer and "-res" in folder else None}
    return finish("jumprelu", d_in, d_sae, 1, W_enc, fold_input_bias(b_enc, b_dec, W_enc), W_dec, b_dec, theta,
                  cfg, ["input_bias"])


__all__ = ["PARAMS", "read"]
