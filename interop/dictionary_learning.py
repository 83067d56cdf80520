"""Read dictionary_learning checkpoints (saprmarks/dictionary_learning: ``ae.pt`` + ``config.json``).

``config.json`` is ``{"trainer": {"dict_class", "activation_dim", "dict_size", "k", "layer",
"lm_name", "submodule_name", ...}, "buffer": {"ctx_len", ...}}``; ``ae.pt`` is the dictionary's
``state_dict`` (read with ``torch.load(weights_only=True)``: tensors only, no code runs).
Each class, as its ``encode`` computes it (``dictionary.py``, ``trainers/*.py``):

* ``AutoEncoder``: ``ReLU(encoder(x − bias))``, ``x̂ = decoder(f) + bias`` → ReLU,
  ``W_enc = encoder.weightᵀ``, ``W_dec = decoder.weightᵀ``.
* ``AutoEncoderNew``: ``ReLU(encoder(x))``, ``x̂ = decoder(f)`` (decoder bias) → ReLU with
  ``b_dec = decoder.bias`` and the input-bias fold.
* ``AutoEncoderTopK``: top-k of ``ReLU(encoder(x − b_dec))`` (its default ``use_threshold=False``) → TopK.
* ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE``: inference ``ReLU(pre)·1[ReLU(pre) > θ]`` with one
  scalar ``threshold`` → JumpReLU with ``θ`` for every latent (θ ≥ 0; an uncalibrated θ = −1
  would make it a dense ReLU, and is refused).
* ``JumpReluAutoEncoder``: ``ReLU(pre·1[pre > θ])`` with ``pre = x W_enc + b_enc`` (no ``b_dec``
  subtraction unless loaded from SAELens) → JumpReLU with the input-bias fold.
* ``GatedAutoEncoder`` → its exact JumpReLU equivalent (see :mod:`sae.rundir.canonical`).

The hook is ``blocks.<layer>.hook_resid_post`` (dictionary_learning's ``layer`` submodule output);
``model_name`` is ``lm_name``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import SAELoadError
from ..model import hook_name_for
from ..rundir.canonical import Canonical, finish, fold_input_bias, gated_as_jumprelu, need

CLASSES = ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE",
           "JumpReluAutoEncoder", "GatedAutoEncoder")


def read(path: str | Path) -> Canonical:
    """Convert one dictionary_learning save directory (``ae.pt`` + ``config.json``).

    Raises:
        SAELoadError: missing files, an unknown ``dict_class``, an uncalibrated threshold, bad shapes.
    """
    d = Path(path)
    if not (d / "ae.pt").is_file() or not (d / "config.json").is_file():
        raise SAELoadError(f"{d} is not a dictionary_learning save: it needs ae.pt and config.json")
    try:
        config = json.loads((d / "config.json").read_text())
        trainer = config["trainer"]
        cls = trainer["dict_class"]
    except (ValueError, KeyError, TypeError) as e:
        raise SAELoadError(f"{d / 'config.json'} has no trainer.dict_class ({e.__class__.__name__}: {e})") from None
    if cls not in CLASSES:
        raise SAELoadError(f"{d}: dictionary_learning class {cls!r} is not supported ({', '.join(CLASSES)})")
    where = str(d / "ae.pt")
    try:
        state = torch.load(where, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a bad file
        raise SAELoadError(f"{where} is not a readable state dict ({e.__class__.__name__}); restore the file") from None
    if isinstance(state, dict) and "ae" in state and isinstance(state["ae"], dict):
        state = state["ae"]  # a training checkpoint: {"ae": ..., "optimizer": ...}
    if not isinstance(state, dict):
        raise SAELoadError(f"{where} does not hold a state dict")
    try:
        d_in, d_sae = int(trainer["activation_dim"]), int(trainer["dict_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise SAELoadError(f"{d / 'config.json'}: trainer needs activation_dim and dict_size ({e})") from None
    folds: list[str] = []
    threshold = None
    k = int(trainer.get("k") or (state["k"].item() if "k" in state else 1))
    if cls in ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE"):
        W_enc = need(state, "encoder.weight", (d_sae, d_in), where).T
        b_enc = need(state, "encoder.bias", (d_sae,), where)
        W_dec = need(state, "decoder.weight", (d_in, d_sae), where).T
        if cls == "AutoEncoder":
            b_dec = need(state, "bias", (d_in,), where)
        elif cls == "AutoEncoderNew":
            b_dec = need(state, "decoder.bias", (d_in,), where)
            b_enc = fold_input_bias(b_enc, b_dec, W_enc)
            folds.append("apply_b_dec_to_input")
        else:
            b_dec = need(state, "b_dec", (d_in,), where)
        activation = {"AutoEncoderTopK": "topk", "BatchTopKSAE": "jumprelu"}.get(cls, "relu")
    elif cls in ("MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):
        W_enc = need(state, "W_enc", (d_in, d_sae), where)
        b_enc = need(state, "b_enc", (d_sae,), where)
        W_dec = need(state, "W_dec", (d_sae, d_in), where)
        b_dec = need(state, "b_dec", (d_in,), where)
        activation = "jumprelu"
        if cls == "JumpReluAutoEncoder":
            threshold = need(state, "threshold", (d_sae,), where)
            b_enc = fold_input_bias(b_enc, b_dec, W_enc)  # its from_pretrained sets apply_b_dec_to_input False
            folds.append("apply_b_dec_to_input")
    else:  # GatedAutoEncoder
        W = need(state, "encoder.weight", (d_sae, d_in), where).T
        W_dec = need(state, "decoder.weight", (d_in, d_sae), where).T
        b_dec = need(state, "decoder_bias", (d_in,), where)
        W_enc, b_enc, threshold = gated_as_jumprelu(W, need(state, "r_mag", (d_sae,), where),
                                                    need(state, "gate_bias", (d_sae,), where),
                                                    need(state, "mag_bias", (d_sae,), where))
        activation = "jumprelu"
        folds.append("gated→jumprelu")
    if cls in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        theta = float(need(state, "threshold", (), where))
        if theta < 0:
            raise SAELoadError(f"{where}: threshold is {theta:g}, i.e. never calibrated (dictionary_learning sets it "
                               "after threshold_start_step); its inference would be a dense ReLU. Import the final "
                               "save of a finished run")
        threshold = torch.full((d_sae,), theta, dtype=torch.float64)
        folds.append("threshold→per-latent")
    if activation == "topk" and not 0 < k <= d_sae:
        raise SAELoadError(f"{d / 'config.json'}: k={k} must be in 1..dict_size={d_sae}")
    layer = trainer.get("layer")
    sub = str(trainer.get("submodule_name") or "")
    hook = hook_name_for(int(layer)) if layer is not None and not any(s in sub for s in ("attn", "mlp")) else None
    buffer = config.get("buffer") or {}
    out = {"d_in": d_in, "d_sae": d_sae, "k": k, "hook_name": hook, "model_name": trainer.get("lm_name"),
           "context_size": buffer.get("ctx_len") if isinstance(buffer, dict) else None,
           "source_architecture": cls, "source_cfg": config}
    return finish(activation, d_in, d_sae, k, W_enc, b_enc, W_dec, b_dec, threshold, out, folds)
