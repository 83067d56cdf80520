"""``sae import``: turn a SAELens, sparsify or dictionary_learning SAE into a run directory of ours.

The result is a run directory like ``sae train`` writes (``cfg.json`` + ``sae_weights.safetensors``
+ the run marker), so ``sae evaluate``, ``sae report`` and SAELens' ``SAE.load_from_disk`` all read
it. The conversion is exact (see :mod:`sae.rundir.canonical`): the imported SAE's codes equal the
source library's own ``encode`` (to float32 rounding), in the source's units (no decoder-norm fold).
``cfg.json`` records ``imported_from`` (format, path, source architecture, the folds applied).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from .. import __version__
from ..errors import ConfigError, SAELoadError
from ..model import EMBEDDED_ALIASES, EMBEDDED_MODEL_ID, EMBEDDED_WEIGHTS, layer_of_hook
from ..outputs import RUN_MARKER, build_output, check_output_location, is_empty_dir, is_sae_run
from ..registry import Registry
from ..rundir import saelens
from ..rundir.canonical import Canonical
from . import dictionary_learning, gemma_scope, llama_scope, pretrained, sparsify

_DROP = ("metadata", "sae_lens_version", "sae_lens_training_version", "source_cfg", "activation_fn",
         "activation_fn_str", "activation_fn_kwargs", "architecture", "rescale_acts_by_decoder_norm")


@dataclass
class Imported:
    """What :func:`import_sae` wrote: the run directory and any warnings (e.g. no matching store)."""

    run_dir: Path
    warnings: list[str] = field(default_factory=list)


def _read_saelens(p: Path, activation_scale: float | None = None) -> Canonical:
    """A SAELens save (``cfg.json`` + ``sae_weights.safetensors``, any SAELens layout)."""
    cfg_path, weights = p / "cfg.json", p / "sae_weights.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise SAELoadError(f"{p} is not a SAELens save: it needs cfg.json and sae_weights.safetensors")
    from ..rundir.sae import read_cfg

    try:
        tensors = load_file(str(weights))
    except Exception as e:  # noqa: BLE001
        raise SAELoadError(f"{weights} is not a readable safetensors file ({e.__class__.__name__})") from None
    return saelens.to_canonical(read_cfg(p), tensors, str(weights), activation_scale)


FORMATS: Registry[Callable[..., Canonical]] = Registry("import format", "--from", __package__ or "sae.interop", ())
"""``sae import --from NAME``: each format's reader, ``read(path[, activation_scale]) -> Canonical``."""
FORMATS.register_as("saelens")(_read_saelens)
FORMATS.register_as("sparsify")(lambda p, activation_scale=None: sparsify.read(p))
FORMATS.register_as("dictionary_learning")(lambda p, activation_scale=None: dictionary_learning.read(p))
FORMATS.register_as("gemma_scope")(lambda p, activation_scale=None: gemma_scope.read(p))
FORMATS.register_as("llama_scope")(llama_scope.read)


def read_foreign(src: str | Path, fmt: str, activation_scale: float | None = None) -> Canonical:
    """Read ``src`` as ``fmt`` (one of :data:`FORMATS`) into a :class:`Canonical`.

    Raises:
        ConfigError: an unknown format. FileNotFoundError: ``src`` missing.
        SAELoadError: a file of another layout, or an SAE we cannot run.
    """
    reader = FORMATS.get(fmt)
    p = Path(src)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: pass the directory the library saved the SAE in")
    return reader(p, activation_scale)


def import_sae(src: str | Path, fmt: str | None, out: str | Path, *, model: str | None = None,
               hook_name: str | None = None, store: str | None = None, storage_options: dict | None = None,
               activation_scale: float | None = None, overwrite: bool = False) -> Imported:
    """Convert the SAE at ``src`` (format ``fmt``) into the run directory ``out``.

    ``model`` overrides the recorded model (``embedded`` = the embedded default, recorded as
    ``google/gemma-3-270m`` + its ``model_weights``); it is required when the source records none
    (sparsify). ``hook_name`` overrides the recorded hook (it must be ``blocks.<L>.hook_resid_post``).
    ``store``: check the SAE against that store (model, hook, d_model) and return a warning when it
    does not fit. ``src`` may be ``saelens:RELEASE/SAE_ID`` (:mod:`sae.interop.pretrained`): fetched
    into the Hugging Face cache, its format and model taken from SAELens' release table. Everything is
    read and validated before ``out`` is created; ``--overwrite``
    replaces only a run directory of ours, atomically.

    Raises:
        ConfigError, SAELoadError, FileNotFoundError, SaeError (output location).
    """
    from ..rundir.identity import IncompatibleSAEError, check_compatible
    from ..rundir.sae import SAE

    out = Path(out)
    check_output_location(out, "--out")
    if out.exists() and not is_empty_dir(out):
        if not overwrite:
            raise ConfigError(f"{out} already exists: pick another --out, or --overwrite to replace a run of ours")
        if not is_sae_run(out):
            raise ConfigError(f"{out} exists and is not a run directory of ours; refusing to replace it "
                              "(pick another --out)")
    if activation_scale is not None and (not math.isfinite(activation_scale) or activation_scale <= 0):
        raise ConfigError(f"--activation-scale {activation_scale!r} must be a finite number > 0 (the factor the SAE "
                          "expects its inputs to be multiplied by)")
    release = None
    if pretrained.is_release_ref(str(src)):
        release = pretrained.resolve(str(src))
        if fmt is not None and fmt != release.fmt:
            raise ConfigError(f"{src} is in the {release.fmt} layout, not {fmt}: drop --from")
        src, fmt, model = release.folder, release.fmt, model or release.model
        if activation_scale is None:
            activation_scale = release.activation_scale
    if fmt is None:
        raise ConfigError(f"--from is needed for {src}: saelens | sparsify | dictionary_learning | gemma_scope | "
                          "llama_scope")
    c = read_foreign(src, fmt, activation_scale)
    cfg = {k: v for k, v in c.cfg.items() if k not in _DROP}
    if release is not None:
        cfg["pretrained"] = release.provenance
    weights = None
    if model is not None:
        if model in EMBEDDED_ALIASES:
            model, weights = EMBEDDED_MODEL_ID, EMBEDDED_WEIGHTS
        cfg["model_name"] = model
    if not cfg.get("model_name"):
        raise ConfigError(f"{src} does not record its model: pass --model (an HF id, a local directory, or "
                          "`embedded` for the embedded Gemma 3 270M)")
    if hook_name is not None:
        cfg["hook_name"] = hook_name
    if not cfg.get("hook_name"):
        raise ConfigError(f"{src} does not record a block-output hook: pass --hook-name blocks.<L>.hook_resid_post")
    try:
        cfg["hook_layer"] = layer_of_hook(str(cfg["hook_name"]))
    except ValueError as e:
        raise ConfigError(f"{e}: our harvest and evaluations read the residual stream after a block") from None
    sae = SAE.from_canonical(c)
    cfg.update({"model_weights": weights, "model_fingerprint": None, "normalize_activations": "none",
                "prepend_bos": cfg.get("prepend_bos", True), "run_name": out.name, "sae_version": __version__,
                "unit_decoder": sae.has_unit_decoder(),
                "imported_from": {"format": fmt, "path": str(Path(src).resolve()),
                                  "architecture": c.cfg.get("source_architecture"), "folds": c.folds,
                                  "source_cfg": c.cfg.get("source_cfg") or {k: v for k, v in c.cfg.items()
                                                                            if k != "source_cfg"}}})
    warnings: list[str] = []
    if store is not None:
        from ..store import ActivationStore

        opened = ActivationStore(store, storage_options=storage_options)
        a = opened.attrs
        try:
            check_compatible(cfg, a.get("model_id"), None, int(a["d_model"]), list(a["hook_names"]),
                             against="store", run_dir=out)
        except IncompatibleSAEError as e:
            warnings.append(f"no matching store: {e}")
        else:
            cfg.update(store_url=str(store), store_path=str(store))
            if a.get("model_weights") and not cfg.get("model_weights"):
                warnings.append(f"the store's weights are {a['model_weights']} while the SAE was trained on "
                                f"{cfg['model_name']}'s own: metrics measure the SAE on that copy")
    with build_output(out, overwrite=overwrite, is_ours=is_sae_run, what="a run directory of ours") as target:
        target.mkdir(parents=True, exist_ok=True)
        (target / RUN_MARKER).write_text(json.dumps({"sae_version": __version__, "imported": fmt,
                                                     "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        sae.save(target, cfg)
    return Imported(out, warnings)
