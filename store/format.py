"""Names and constants of the on-disk store layout (format version 1). See README "Store format".

Layout of ``acts.zarr`` (a Zarr v3 group)::

    zarr.json                      group attributes (ATTR_* keys below)
    tokens                         int32  [n_tokens]            chunks (chunk_tokens,)
    blocks.<L>.hook_resid_post     <storage dtype> [n_tokens, d_model]  chunks (chunk_tokens, d_model)
    blocks.<L>.hook_resid_post.scale   float32 [n_tokens]       only for int8/fp8 codecs

Row ``r`` belongs to sequence ``r // context_size`` at position ``r % context_size``.
"""

from __future__ import annotations

from ..errors import SaeError

FORMAT_VERSION = 1
TOKENS = "tokens"
SCALE_SUFFIX = ".scale"
STATUS_COMPLETE = "complete"
STATUS_IN_PROGRESS = "in_progress"

# Attributes whose values must agree for ``--resume`` to continue a harvest.
RESUME_KEYS = ("model_id", "model_fingerprint", "hook_names", "d_model", "context_size", "dataset", "split",
               "n_tokens_target", "dtype", "codec", "chunk_tokens", "seed")

# Attributes every readable store has.
REQUIRED_ATTRS = ("hook_names", "d_model", "context_size", "n_tokens_written", "chunk_tokens", "codec", "dtype",
                  "stats", "store_id", "model_id")


class StoreError(SaeError):
    """A store is missing, incomplete, corrupt or does not match what was asked of it."""


def scale_array_name(hook_name: str) -> str:
    """Name of the per-row scale array that accompanies an int8/fp8 activation array."""
    return hook_name + SCALE_SUFFIX
