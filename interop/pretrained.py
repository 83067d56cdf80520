"""Pretrained SAEs by name: ``sae import saelens:RELEASE/SAE_ID --out RUN``.

The name is resolved through the release table SAELens ships (``pretrained_saes.yaml``, read with
``sae_lens.loading.pretrained_saes_directory``): release → Hugging Face repository, model and
converter; SAE id → folder in the repository. The files are fetched with ``huggingface_hub`` into its
normal cache (``HF_HUB_CACHE``), so a second import, or any import with ``HF_HUB_OFFLINE=1`` after
one download, reads the cache. Then the folder is read by the reader of its layout:

* converter none (SAELens' own layout: ``cfg.json`` + ``sae_weights.safetensors``) → ``saelens``;
* ``gemma_2`` (Gemma Scope's ``params.npz``) → :mod:`sae.interop.gemma_scope`;
* ``llama_scope`` (``hyperparams.json`` + ``checkpoints/final.safetensors``) → :mod:`sae.interop.llama_scope`,
  with the release table's ``norm_scaling_factor`` folded as SAELens folds it;

and every other converter is refused in one line that says how to go through SAELens instead.
The run directory's ``cfg.json`` records ``pretrained`` (release, SAE id, repository, revision,
folder) beside ``imported_from``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

PREFIX = "saelens:"
FILES = {None: ("cfg.json", "sae_weights.safetensors"), "gemma_2": ("params.npz",),
         "llama_scope": ("hyperparams.json", "checkpoints/final.safetensors")}
FORMAT_OF = {None: "saelens", "gemma_2": "gemma_scope", "llama_scope": "llama_scope"}


@dataclass(frozen=True)
class Resolved:
    """A release SAE fetched into the local Hugging Face cache."""

    folder: Path
    fmt: str
    model: str
    provenance: dict
    activation_scale: float | None = None


def is_release_ref(src: str) -> bool:
    """True for ``saelens:RELEASE/SAE_ID``."""
    return str(src).startswith(PREFIX)


def hf_model_id(model: str) -> str:
    """SAELens' model name → the Hugging Face id our stores record: ``gemma-*`` → ``google/gemma-*``
    (Gemma Scope's models); a name with an owner, or any other, as is."""
    return f"google/{model}" if "/" not in model and model.startswith("gemma") else model


def resolve(ref: str, revision: str | None = None) -> Resolved:
    """Fetch ``saelens:RELEASE/SAE_ID`` (see the module doc).

    Raises:
        ConfigError: an unknown release or SAE id (naming close ones), a converter we do not read, or a
            download that fails (offline without a cached copy, no access), in one line.
    """
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        raise ConfigError("resolving saelens: names needs SAELens' release table: pip install "
                          "'sae[pretrained]'") from None
    name = ref[len(PREFIX):]
    release, sep, sae_id = name.partition("/")
    table = get_pretrained_saes_directory()
    if release not in table:
        close = [r for r in table if release.split("-")[0] in r][:5]
        raise ConfigError(f"unknown SAELens release {release!r}" + (f" (close: {', '.join(close)})" if close else "")
                          + "; the releases are in sae_lens/pretrained_saes.yaml")
    lookup = table[release]
    if not sep or sae_id not in lookup.saes_map:
        ids = list(lookup.saes_map)
        close = [i for i in ids if i.startswith(sae_id.split("/")[0])][:3] if sae_id else ids[:3]
        raise ConfigError(f"release {release} has no SAE {sae_id!r}: give saelens:{release}/<id>, e.g. "
                          f"{', '.join(close or ids[:3])} ({len(ids)} in all)")
    conv = lookup.conversion_func
    if conv not in FILES:
        raise ConfigError(f"release {release} uses SAELens' {conv!r} converter, which sae import does not read yet: "
                          "load it with SAE.from_pretrained, save_model() to a folder, then `sae import FOLDER "
                          "--from saelens`")
    folder_in_repo = lookup.saes_map[sae_id]
    from huggingface_hub import hf_hub_download

    paths = []
    for f in FILES[conv]:
        try:
            paths.append(Path(hf_hub_download(lookup.repo_id, f, subfolder=folder_in_repo, revision=revision)))
        except Exception as e:  # noqa: BLE001 - network, auth, offline-without-cache: all one line
            raise ConfigError(f"cannot fetch {folder_in_repo}/{f} from {lookup.repo_id} ({e.__class__.__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''}); check the network or HF_TOKEN, or "
                              "download it once with the network on") from None
    snapshot = re.search(r"/snapshots/([0-9a-f]{40})/", str(paths[0]))
    scale = (lookup.norm_scaling_factor or {}).get(sae_id)
    return Resolved(folder=paths[0].parent, fmt=FORMAT_OF[conv], model=hf_model_id(lookup.model),
                    activation_scale=float(scale) if scale is not None else None,
                    provenance={"release": release, "sae_id": sae_id, "repo_id": lookup.repo_id,
                                "revision": snapshot.group(1) if snapshot else revision, "path": folder_in_repo,
                                "sae_lens_model": lookup.model})


__all__ = ["PREFIX", "Resolved", "hf_model_id", "is_release_ref", "resolve"]
