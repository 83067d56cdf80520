"""Fine-tuning: start a run from an existing SAE (``sae train --init-from RUN_DIR``) instead of a random
initialisation, e.g. to add an orthogonality penalty to a finished or imported SAE.

The source is any run directory :meth:`SAE.load <sae.rundir.sae.SAE.load>` reads (ours, or SAELens'
layout as ``sae import`` writes it), in raw activation units. Training works in normalised units
``x' = s·x`` with unit-norm decoder rows, so the source is brought there by two exact rewrites that
keep its reconstructions: the inverse of the fold applied at save time (``W_enc/s``, ``W_dec·s``,
``b_dec·s``; :meth:`SAE.folded` with ``1/s``) and the unit-decoder fold (:meth:`SAE.with_unit_decoder`,
SAELens' ``fold_W_dec_norm``). Step 0 therefore reconstructs every input as the source does (up to
float32 rounding of those two rescalings), and the TopK selection is the same.

Checked before anything is created, each a one-line ``ConfigError``: the model (fingerprint, else id)
and hook against the store, ``d_in``, ``d_sae``, and the saved activation against ``--arch``
(topk → topk, standard → relu, jumprelu → jumprelu; a BatchTopK or Matryoshka SAE is saved as
JumpReLU, so it is fine-tuned as one). A TopK SAE with unequal decoder norms (SAELens'
``rescale_acts_by_decoder_norm`` off) cannot be put in unit-norm form without changing its selection,
and is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..errors import ConfigError, NonFiniteError, SAELoadError
from ..rundir.format import WEIGHTS_FILE
from ..rundir.identity import IncompatibleSAEError, check_compatible
from ..rundir.sae import SAE
from ..store import ActivationStore
from .config import TrainConfig

TRAINABLE_FROM = {"topk": "topk", "relu": "relu", "jumprelu": "jumprelu"}
"""Saved activation of the source → the ``--arch`` that continues it exactly."""


def weights_digest(run_dir: str | Path) -> str:
    """sha256 of the source's ``sae_weights.safetensors`` (recorded, and checked on ``--resume``)."""
    h = hashlib.sha256()
    with open(Path(run_dir) / WEIGHTS_FILE, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_init_source(cfg: TrainConfig, store: ActivationStore, hook: str, scale: float
                     ) -> tuple[SAE, dict[str, Any]]:
    """The SAE of ``cfg.init_from`` in training units (``scale``) with unit decoder rows, and its
    provenance for ``cfg.json``.

    Raises:
        ConfigError: unreadable source, another model, hook, width or architecture (one line each).
    """
    assert cfg.init_from is not None
    src = Path(cfg.init_from)
    where = f"--init-from {src}"
    try:
        sae = SAE.load(src)
    except (FileNotFoundError, SAELoadError, NonFiniteError) as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None
    a = store.attrs
    try:
        check_compatible(sae.cfg, a.get("model_id"), a.get("model_fingerprint"), store.d_model, [hook],
                         against="store", run_dir=src)
    except IncompatibleSAEError as e:
        raise ConfigError(f"{where}: {e}") from None
    d_sae = cfg.d_sae or cfg.expansion * store.d_model
    if sae.d_sae != d_sae:
        raise ConfigError(f"{where} has d_sae {sae.d_sae} but this run asks for {d_sae}: pass --d-sae {sae.d_sae}")
    want = TRAINABLE_FROM[sae.activation]
    if cfg.activation != want:
        saved = {"relu": "standard"}.get(sae.activation, sae.activation)
        raise ConfigError(f"{where} is a {saved} SAE, which --arch {cfg.activation} does not continue: "
                          f"fine-tune it with --arch {want}")
    unit = sae.folded(1.0 / scale).with_unit_decoder()
    if unit is None:
        raise ConfigError(f"{where} is a TopK SAE with unequal decoder norms (trained without "
                          "rescale_acts_by_decoder_norm): unit-norm rows would change its TopK selection, so it "
                          "cannot be fine-tuned here")
    provenance = {"path": str(src.resolve()), "weights_sha256": weights_digest(src),
                  "architecture": sae.cfg.get("architecture"), "model_name": sae.cfg.get("model_name"),
                  "hook_name": sae.cfg.get("hook_name"), "d_sae": sae.d_sae,
                  "k": sae.k if sae.activation == "topk" else None}
    return unit, provenance


__all__ = ["TRAINABLE_FROM", "load_init_source", "weights_digest"]
