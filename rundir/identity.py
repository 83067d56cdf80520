"""Whether an SAE fits the model or store it is to be evaluated with: the identity checks between a
run's ``cfg.json`` and a model or a store (model id or weights fingerprint, hook, width)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

from ..errors import SaeError
from ..model import EMBEDDED_ALIASES, EMBEDDED_MODEL_ID, layer_of_hook


class IncompatibleSAEError(SaeError):
    """An SAE does not fit the model or store it is evaluated with (one-line message with the fix)."""


def canonical_model_id(model_id: str | None) -> str | None:
    """Embedded aliases → the embedded id; an existing local directory → its resolved path."""
    if model_id is None:
        return None
    if model_id in EMBEDDED_ALIASES:  # the embedded default is a copy of google/gemma-3-270m; weights
        return EMBEDDED_MODEL_ID      # (fingerprints) tell copies apart where both sides record them
    p = Path(model_id).expanduser()
    return str(p.resolve()) if p.exists() else model_id.rstrip("/")


def _layers_text(hook_names: Sequence[str]) -> str:
    try:
        layers = sorted(layer_of_hook(h) for h in hook_names)
    except ValueError:
        return ", ".join(hook_names)
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"layers {layers[0]}..{layers[-1]}"
    return "layers " + ", ".join(map(str, layers))


def check_compatible(sae_cfg: dict, model_id: str | None, model_fingerprint: str | Collection[str] | None,
                     d_model: int, hook_names: Sequence[str], *, against: str = "model",
                     run_dir: str | Path | None = None) -> None:
    """Raise :class:`IncompatibleSAEError` (a ``ValueError``) if an SAE cannot be evaluated here.

    ``sae_cfg`` is the run's ``cfg.json`` (``model_name``, optional ``model_fingerprint``,
    ``hook_name``, optional ``hook_layer``, ``d_in``); the other arguments describe the model or
    store (``against`` = ``"model"`` or ``"store"``) it is to be evaluated with: its id, weights
    fingerprint(s) (one string or a set, see :func:`model_fingerprints`; ``None`` = unknown), width
    and available hook names.

    Checks, in order: the model (by fingerprint when both sides know one — it is then decisive, so
    two spellings of the same local path pass; else by canonical id, see
    :func:`canonical_model_id`), the hook (present, and consistent with ``hook_layer``), and
    ``d_in == d_model``. Each message names the run, both sides and the fix.
    """
    run = str(run_dir) if run_dir is not None else str(sae_cfg.get("run_name", "(unnamed run)"))
    hook = sae_cfg.get("hook_name")
    sae_model = sae_cfg.get("model_name")
    d_in = sae_cfg.get("d_in")
    what = f"SAE {run} was trained on model {sae_model} (hook {hook}, d_in {d_in})"
    fix_model = ("pass --store harvested from that model" if against == "store"
                 else "evaluate it with the model it was trained on")
    fps = {model_fingerprint} if isinstance(model_fingerprint, str) else set(model_fingerprint or ())
    sae_fp = sae_cfg.get("model_fingerprint")
    if sae_fp and fps:
        if sae_fp not in fps:
            same = canonical_model_id(sae_model) == canonical_model_id(model_id)
            detail = (f"the {against} has the same id but other weights (fingerprint {sae_fp} vs "
                      f"{', '.join(sorted(fps))})" if same else f"the {against} is {model_id}")
            raise IncompatibleSAEError(f"{what} but {detail}: {fix_model}")
    elif sae_model and model_id and canonical_model_id(sae_model) != canonical_model_id(model_id):
        raise IncompatibleSAEError(f"{what} but the {against} is {model_id}: {fix_model}")
    if not hook:
        raise IncompatibleSAEError(f"SAE {run} has no hook_name in its cfg.json: "
                                   "it is not a finished `sae train` run")
    try:
        layer = layer_of_hook(hook)
    except ValueError as e:
        raise IncompatibleSAEError(f"SAE {run}: {e}") from e
    if sae_cfg.get("hook_layer") is not None and int(sae_cfg["hook_layer"]) != layer:
        raise IncompatibleSAEError(f"SAE {run} has hook_name {hook} but hook_layer {sae_cfg['hook_layer']}: "
                                   "its cfg.json is inconsistent; fix hook_layer")
    if hook not in hook_names:
        if against == "store":
            fix = (f"pass a --store that has {hook} (harvest --layer {layer}) or an SAE of its "
                   f"{_layers_text(hook_names)}")
        else:
            fix = "the SAE belongs to another (deeper) model: evaluate it with that model"
        raise IncompatibleSAEError(f"SAE {run} reads {hook} but the {against} {model_id} only has "
                                   f"{_layers_text(hook_names)}: {fix}")
    if d_in is not None and int(d_in) != int(d_model):
        raise IncompatibleSAEError(f"{what} but the {against} {model_id} has d_model {d_model}: "
                                   f"the SAE belongs to another model; {fix_model}")
