"""Read every SAELens ``cfg.json`` + ``sae_weights.safetensors`` layout (ours is one of them).

Layouts (SAELens 6.54 ``saes/*.py``, ``loading/pretrained_sae_loaders.handle_pre_6_0_config``):

* **pre-6**: ``activation_fn_str`` (``relu`` / ``topk`` with ``activation_fn_kwargs.k``), ``hook_name``
  (or older ``hook_point``), ``model_name`` … at the top level, ``architecture`` optional
  (``standard`` / ``gated`` / ``jumprelu``), optional ``finetuning_scaling_factor`` with a
  ``scaling_factor [d_sae]`` tensor that multiplies the codes before decoding.
* **6.x**: ``architecture`` ∈ ``standard`` / ``topk`` (+ ``k``, ``rescale_acts_by_decoder_norm``) /
  ``jumprelu`` (``threshold`` tensor) / ``gated`` (``b_gate``, ``b_mag``, ``r_mag``) and, for files a
  *training* SAE wrote, ``batchtopk`` / ``matryoshka_batchtopk`` (scalar ``topk_threshold``) and
  ``jumprelu`` with ``log_threshold``; ``hook_name``, ``model_name`` … under ``metadata``.

Each becomes a :class:`~sae.rundir.canonical.Canonical` by exact algebra (see that module):
BatchTopK / Matryoshka files become the JumpReLU SAE SAELens itself saves for inference
(``threshold = topk_threshold`` for every latent); Gated becomes its exact JumpReLU equivalent;
``apply_b_dec_to_input: false`` and ``rescale_acts_by_decoder_norm`` are folded into the encoder.

What we cannot run is refused with one line, never run as something else: AbsTopK, transcoders,
temporal and matching-pursuit SAEs, run-time input normalisation (``layer_norm``,
``constant_norm_rescale``), and ``expected_average_only_in`` without its scaling factor.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..errors import SAELoadError
from ..model import layer_of_hook
from .canonical import Canonical, finish, fold_decoder_norm, fold_input_bias, gated_as_jumprelu, need

SUPPORTED = ("standard", "topk", "jumprelu", "gated", "batchtopk", "matryoshka_batchtopk", "matryoshka")
UNSUPPORTED = {
    "abstopk": "AbsTopK keeps negative codes, which none of our evaluations define",
    "transcoder": "a transcoder maps one hook to another, our evaluations need an autoencoder",
    "skip_transcoder": "a transcoder maps one hook to another, our evaluations need an autoencoder",
    "jumprelu_transcoder": "a transcoder maps one hook to another, our evaluations need an autoencoder",
    "temporal": "a temporal SAE reads several positions at once",
    "matching_pursuit": "a matching-pursuit SAE encodes iteratively, not by one affine map",
}
METADATA_KEYS = ("model_name", "hook_name", "hook_head_index", "context_size", "dataset_path", "prepend_bos",
                 "model_from_pretrained_kwargs", "exclude_special_tokens", "neuronpedia_id", "sae_lens_version")


def architecture(cfg: dict[str, Any]) -> str:
    """The SAELens architecture a config describes, after SAELens' own pre-6 defaulting."""
    arch = cfg.get("architecture") or "standard"
    fn = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    if arch == "standard" and fn == "topk":
        return "topk"
    return str(arch)


def top_k(cfg: dict[str, Any]) -> int | None:
    """``k`` (6.x top level, or pre-6 ``activation_fn_kwargs.k``), or ``None``."""
    k = cfg.get("k")
    if k is None:
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    return None if k is None else int(round(float(k)))


def normalised_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with the usage fields at the top level, where our evaluations read them.

    6.x keeps ``hook_name``, ``model_name``, ``context_size``… under ``metadata``; pre-6 files may
    say ``hook_point``. ``hook_layer`` is derived from a ``blocks.<L>.hook_resid_post`` hook name.
    """
    out = dict(cfg)
    meta = cfg.get("metadata") or {}
    if isinstance(meta, dict):
        for key in METADATA_KEYS:
            if out.get(key) is None and meta.get(key) is not None:
                out[key] = meta[key]
    if out.get("hook_name") is None and cfg.get("hook_point") is not None:
        out["hook_name"] = cfg["hook_point"]
    if out.get("hook_layer") is None and isinstance(out.get("hook_name"), str):
        with contextlib.suppress(ValueError):  # a hook we do not harvest: no layer to record
            out["hook_layer"] = layer_of_hook(out["hook_name"])
    return out


def _checked_header(cfg: dict[str, Any], where: str, activation_scale: float | None) -> tuple[str, int, int, str]:
    """``(architecture, d_in, d_sae, normalize_activations)`` of a ``cfg.json``, after refusing what we
    cannot run (see :func:`to_canonical`)."""
    arch = architecture(cfg)
    if arch in UNSUPPORTED:
        raise SAELoadError(f"{where}: SAELens architecture {arch!r} cannot be run here ({UNSUPPORTED[arch]})")
    if arch not in SUPPORTED:
        raise SAELoadError(f"{where}: unknown SAE architecture {arch!r}; supported: {', '.join(SUPPORTED)}")
    fn = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    if fn not in (None, "relu", "topk"):
        raise SAELoadError(f"{where}: activation function {fn!r} is not supported (relu, topk)")
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError) as e:
        raise SAELoadError(f"{where} does not describe an SAE (no valid d_in/d_sae: {e.__class__.__name__}: {e}); "
                           "fix the file") from None
    norm = cfg.get("normalize_activations") or "none"
    if isinstance(norm, bool):  # pre-6 boolean form (SAELens maps True → expected_average_only_in)
        norm = "expected_average_only_in" if norm else "none"
    if norm not in ("none", "expected_average_only_in"):
        raise SAELoadError(f"{where}: normalize_activations={norm!r} transforms every input at run time, which "
                           "we cannot fold into the weights; re-export the SAE with normalisation folded")
    if norm == "expected_average_only_in" and activation_scale is None:
        raise SAELoadError(f"{where}: normalize_activations='expected_average_only_in' needs the norm scaling "
                           "factor SAELens keeps outside the file: `sae import DIR --from saelens "
                           "--activation-scale FACTOR --out RUN`")
    return arch, d_in, d_sae, norm


def _activation_and_threshold(arch: str, tensors: dict[str, torch.Tensor], d_sae: int, where: str,
                              folds: list[str]) -> tuple[str, torch.Tensor | None]:
    """Our activation for a non-gated SAELens architecture and its per-latent threshold ``[d_sae]``
    (None for relu/topk); a fold it needed is appended to ``folds``."""
    threshold = None
    if arch == "standard":
        activation = "relu"
    elif arch == "topk":
        activation = "topk"
    elif arch == "jumprelu":
        activation = "jumprelu"
        if "threshold" in tensors:
            threshold = need(tensors, "threshold", (d_sae,), where)
        elif "log_threshold" in tensors:  # a JumpReLUTrainingSAE's own file
            threshold = need(tensors, "log_threshold", (d_sae,), where).exp()
            folds.append("log_threshold")
        else:
            need(tensors, "threshold", (d_sae,), where)
    else:  # batchtopk / matryoshka(_batchtopk) as a training SAE saved it
        activation = "jumprelu"
        if "threshold" in tensors:
            threshold = need(tensors, "threshold", (d_sae,), where)
        else:
            tau = need(tensors, "topk_threshold", tuple(tensors.get("topk_threshold", torch.zeros(())).shape),
                       where).reshape(-1)
            if tau.numel() != 1:
                raise SAELoadError(f"{where}: topk_threshold should be one number, it has {tau.numel()}")
            threshold = tau.expand(d_sae).clone()
            folds.append("topk_threshold→threshold")
    return activation, threshold


def to_canonical(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], where: str,
                 activation_scale: float | None = None) -> Canonical:
    """Convert one SAELens-layout SAE (``cfg`` = its ``cfg.json``, ``tensors`` = its safetensors).

    ``activation_scale`` is the factor an ``expected_average_only_in`` SAE expects its inputs to be
    multiplied by (SAELens keeps it outside the file); it is folded into the weights.

    Raises:
        SAELoadError: an architecture or option we cannot run (one line naming it and why), a
            missing tensor, or shapes that disagree with ``d_in``/``d_sae``.
    """
    arch, d_in, d_sae, norm = _checked_header(cfg, where, activation_scale)
    folds: list[str] = []
    b_dec = need(tensors, "b_dec", (d_in,), where)
    W_dec = need(tensors, "W_dec", (d_sae, d_in), where)
    W_enc = need(tensors, "W_enc", (d_in, d_sae), where)
    threshold = None
    if arch == "gated":
        r_mag = need(tensors, "r_mag", (d_sae,), where)
        b_gate = need(tensors, "b_gate", (d_sae,), where)
        b_mag = need(tensors, "b_mag", (d_sae,), where)
        if cfg.get("apply_b_dec_to_input", True) is False:
            b_gate = fold_input_bias(b_gate, b_dec, W_enc)
            b_mag = fold_input_bias(b_mag, b_dec, W_enc * r_mag.exp())
            folds.append("apply_b_dec_to_input")
        W_enc, b_enc, threshold = gated_as_jumprelu(W_enc, r_mag, b_gate, b_mag)
        folds.append("gated→jumprelu")
        activation = "jumprelu"
    else:
        b_enc = need(tensors, "b_enc", (d_sae,), where)
        if cfg.get("apply_b_dec_to_input", True) is False:
            b_enc = fold_input_bias(b_enc, b_dec, W_enc)
            folds.append("apply_b_dec_to_input")
        if cfg.get("rescale_acts_by_decoder_norm"):
            W_enc, b_enc, W_dec = fold_decoder_norm(W_enc, b_enc, W_dec)
            folds.append("rescale_acts_by_decoder_norm")
        activation, threshold = _activation_and_threshold(arch, tensors, d_sae, where, folds)
    if cfg.get("finetuning_scaling_factor") and "scaling_factor" in tensors:
        W_dec = W_dec * need(tensors, "scaling_factor", (d_sae,), where)[:, None]  # pre-6: x̂ = (f·s) W_dec + b_dec
        folds.append("finetuning_scaling_factor")
    k = top_k(cfg)
    if activation == "topk" and (k is None or not 0 < k <= d_sae):
        raise SAELoadError(f"{where}: a TopK SAE needs k in 1..d_sae={d_sae} (cfg.json says k={k})")
    out_cfg = normalised_cfg(cfg)
    if norm == "expected_average_only_in":
        s = float(activation_scale or 1.0)  # SAE trained on s·x (scale checked above): f(x) = f_s(s·x)
        W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
        folds.append(f"activation_scale={s:g}")
        out_cfg["normalize_activations"] = "none"
    out_cfg["source_architecture"] = arch
    return finish(activation, d_in, d_sae, k or 1, W_enc, b_enc, W_dec, b_dec, threshold, out_cfg, folds)
