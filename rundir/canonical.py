"""The one form every foreign SAE is converted to before it becomes our :class:`~sae.rundir.sae.SAE`.

Our inference SAE (``rundir/sae.py``) computes

    pre = (x − b_dec) W_enc + b_enc        W_enc [d_in, d_sae], b_enc [d_sae], b_dec [d_in]
    f   = TopK_k(pre)⁺  |  ReLU(pre)  |  ReLU(pre)·H(pre − θ)      θ = threshold [d_sae]
    x̂   = f W_dec + b_dec                  W_dec [d_sae, d_in]

Every layout the libraries write (SAELens, sparsify, dictionary_learning) is an exact re-writing of
one of these three, possibly after a fold. The folds here are the exact algebra, done in float64:

* :func:`fold_input_bias` — the SAE does *not* subtract ``b_dec`` before encoding
  (SAELens ``apply_b_dec_to_input: false``, dictionary_learning's JumpReLU):
  ``x W_enc + b = (x − b_dec) W_enc + (b + b_dec W_enc)``.
* :func:`fold_decoder_norm` — SAELens' ``rescale_acts_by_decoder_norm`` (pre-activations multiplied
  by ‖W_dec,i‖ and the decoder used at unit norm): ``W_enc,i ← n_i W_enc,i``, ``b_enc,i ← n_i b_enc,i``,
  ``W_dec,i ← W_dec,i / n_i``. The same map as SAELens' ``fold_W_dec_norm``.
* :func:`gated_as_jumprelu` — a Gated SAE with weight sharing (Rajamanoharan et al. 2024a, §3.2)
  *is* a JumpReLU SAE: with ``W = W_enc·exp(r_mag)``, ``b = b_mag`` and ``θ = b_mag − exp(r_mag)·b_gate``,
  ``1[(x−b_dec)W_enc + b_gate > 0] · ReLU((x−b_dec)W + b_mag) = ReLU(pre)·H(pre − θ)``.

Raises:
    SAELoadError: a missing tensor or a shape that does not match ``d_in``/``d_sae``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import SAELoadError

ACTIVATIONS = ("topk", "relu", "jumprelu")


@dataclass
class Canonical:
    """An SAE in our parametrisation (see the module docstring), float32 on CPU.

    ``cfg`` holds the normalised ``cfg.json`` fields (``hook_name``, ``model_name``, ``hook_layer``,
    ``context_size``, ``dataset_path``, ``prepend_bos`` at the top level, plus ``source_format`` and
    ``source_architecture`` for foreign files); ``folds`` names each exact rewrite applied.
    """

    activation: str
    d_in: int
    d_sae: int
    k: int
    tensors: dict[str, torch.Tensor]
    cfg: dict = field(default_factory=dict)
    folds: list[str] = field(default_factory=list)


def need(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], where: str) -> torch.Tensor:
    """``tensors[name]`` as float64, checked to have ``shape``; else :class:`SAELoadError` naming the file."""
    if name not in tensors:
        raise SAELoadError(f"{where} has no tensor {name!r} (it has {', '.join(sorted(tensors)) or 'none'}); "
                           "the file is incomplete or of another layout")
    t = tensors[name]
    if tuple(t.shape) != tuple(shape):
        raise SAELoadError(f"{where}: {name} has shape {tuple(t.shape)}, but the config says {tuple(shape)}; "
                           "the weights and the config do not belong together")
    return t.detach().to("cpu", torch.float64)


def fold_input_bias(b_enc: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor) -> torch.Tensor:
    """``b_enc + b_dec W_enc`` [d_sae]: the bias that makes ``(x − b_dec) W_enc + ·`` equal ``x W_enc + b_enc``."""
    return b_enc + b_dec @ W_enc


def fold_decoder_norm(W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move the decoder row norms ``n [d_sae]`` into the encoder: ``(W_enc·n, b_enc·n, W_dec/n)``."""
    n = W_dec.norm(dim=1).clamp_min(1e-30)
    return W_enc * n, b_enc * n, W_dec / n[:, None]


def gated_as_jumprelu(W_enc: torch.Tensor, r_mag: torch.Tensor, b_gate: torch.Tensor, b_mag: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gated (weight-shared) → JumpReLU ``(W_enc', b_enc', threshold)``; see the module docstring."""
    scale = r_mag.exp()
    return W_enc * scale, b_mag, b_mag - scale * b_gate


def finish(activation: str, d_in: int, d_sae: int, k: int, W_enc: torch.Tensor, b_enc: torch.Tensor,
           W_dec: torch.Tensor, b_dec: torch.Tensor, threshold: torch.Tensor | None, cfg: dict,
           folds: list[str]) -> Canonical:
    """Pack float64 parts into a float32 :class:`Canonical`."""
    if activation not in ACTIVATIONS:
        raise ValueError(activation)
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if activation == "jumprelu":
        assert threshold is not None
        tensors["threshold"] = threshold
    tensors = {n: t.to(torch.float32).contiguous() for n, t in tensors.items()}
    return Canonical(activation, d_in, d_sae, k, tensors, cfg, folds)
