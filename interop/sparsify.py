"""Read EleutherAI sparsify checkpoints (``eai-sparsify`` 1.x, ``SparseCoder.save_to_disk``).

Layout: one directory per hookpoint (``<run>/<hookpoint>/``) holding ``cfg.json`` (the
``SparseCoderConfig`` fields plus ``d_in``) and ``sae.safetensors`` with ``encoder.weight
[num_latents, d_in]``, ``encoder.bias [num_latents]``, ``W_dec [num_latents, d_in]``, ``b_dec [d_in]``
(and ``W_skip [d_in, d_in]`` with a skip connection). The run directory's ``config.json`` is the
training config (the CLI's adds ``model``).

Math (``SparseCoder.encode`` / ``fused_encoder``): ``top-k of ReLU((x − b_dec) Wᵀ + b)``, decoded
``Σ a_i W_dec,i + b_dec``. Since ReLU is monotone, this is our ``TopK_k(pre)⁺`` with ``W_enc = Wᵀ``
(a row with fewer than k positive pre-activations pads with zeros either way).

A hookpoint ``layers.<L>`` (or ``h.<L>``, ``model.layers.<L>``…) is the output of decoder block L,
which is our ``blocks.<L>.hook_resid_post``.

Refused in one line: ``groupmax`` activation, skip connections (``W_skip``), transcoders.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import load_file

from ..errors import SAELoadError
from ..model import hook_name_for
from ..rundir.canonical import Canonical, finish, need

CFG, WEIGHTS = "cfg.json", "sae.safetensors"


def find_hookpoint_dir(path: Path) -> Path:
    """``path`` itself when it holds ``cfg.json`` + ``sae.safetensors``, else its only such subdirectory.

    Raises:
        SAELoadError: none, or several (naming them, so the user can pick one).
    """
    if (path / CFG).is_file() and (path / WEIGHTS).is_file():
        return path
    subs = sorted(p for p in path.iterdir() if (p / CFG).is_file() and (p / WEIGHTS).is_file()) if path.is_dir() else []
    if len(subs) == 1:
        return subs[0]
    if not subs:
        raise SAELoadError(f"{path} is not a sparsify checkpoint: no {CFG} + {WEIGHTS} in it or its subdirectories")
    raise SAELoadError(f"{path} holds SAEs for {len(subs)} hookpoints ({', '.join(p.name for p in subs)}): "
                       f"import one at a time, e.g. {subs[0]}")


def hook_for(hookpoint: str) -> str | None:
    """``layers.6`` / ``model.layers.6`` / ``h.6`` → ``blocks.6.hook_resid_post``; else ``None``."""
    m = re.fullmatch(r"(?:.*\.)?(?:layers|h)\.(\d+)", hookpoint)
    return hook_name_for(int(m.group(1))) if m else None


def read(path: str | Path) -> Canonical:
    """Convert one sparsify SAE directory (or a run directory with exactly one).

    ``cfg`` of the result has ``hook_name`` (when the hookpoint is a block output), ``model_name``
    (when the run's ``config.json`` names it) and ``source_architecture`` ``"topk"``.

    Raises:
        SAELoadError: not a sparsify checkpoint, an option we cannot run, bad shapes.
    """
    d = find_hookpoint_dir(Path(path))
    where = str(d / WEIGHTS)
    try:
        cfg = json.loads((d / CFG).read_text())
        tensors = load_file(where)
    except Exception as e:  # noqa: BLE001 - JSON and safetensors raise their own types
        raise SAELoadError(f"{d} is not a readable sparsify checkpoint ({e.__class__.__name__}: {e})") from None
    if cfg.get("activation", "topk") != "topk":
        raise SAELoadError(f"{d}: sparsify activation {cfg.get('activation')!r} is not supported (topk only)")
    if cfg.get("transcode"):
        raise SAELoadError(f"{d}: a sparsify transcoder maps one hook to another; our evaluations need an autoencoder")
    if cfg.get("skip_connection") or "W_skip" in tensors:
        raise SAELoadError(f"{d}: a skip connection adds W_skip·x to x̂, which our SAE does not have")
    try:
        d_in = int(cfg["d_in"])
        d_sae = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
        k = int(cfg.get("k", 32))
    except (KeyError, TypeError, ValueError) as e:
        raise SAELoadError(f"{d / CFG} does not describe a sparse coder ({e.__class__.__name__}: {e})") from None
    if not 0 < k <= d_sae:
        raise SAELoadError(f"{d / CFG}: k={k} must be in 1..num_latents={d_sae}")
    W = need(tensors, "encoder.weight", (d_sae, d_in), where)
    b = need(tensors, "encoder.bias", (d_sae,), where)
    W_dec = need(tensors, "W_dec", (d_sae, d_in), where)
    b_dec = need(tensors, "b_dec", (d_in,), where)
    run_cfg = {}
    if (d.parent / "config.json").is_file():
        try:
            run_cfg = json.loads((d.parent / "config.json").read_text())
        except ValueError:
            run_cfg = {}
    out = {"d_in": d_in, "d_sae": d_sae, "k": k, "hook_name": hook_for(d.name), "hookpoint": d.name,
           "model_name": run_cfg.get("model") if isinstance(run_cfg, dict) else None,
           "source_architecture": "topk", "source_cfg": cfg}
    return finish("topk", d_in, d_sae, k, W.T, b, W_dec, b_dec, None, out, [])
