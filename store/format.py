"""Names and constants of the store layout. See docs/store-format.md for the diagram.

Format version 2 (written by this version; chunk-addressed, no shared cursor)::

    acts.zarr/
      zarr.json                          group attributes: identity, layout; at the end stats, digest, status
      tokens/                            int32 [n_tokens]                 chunks (chunk_tokens,)      + crc32c
      blocks.<L>.hook_resid_post/        <storage dtype> [n_tokens, d_model]  chunks (chunk_tokens, d_model) + crc32c
      blocks.<L>.hook_resid_post.scale/  float32 [n_tokens]  (int8/fp8 only)                          + crc32c
      commits/tokens.json                the complete token array is in (its per-chunk crc32c)
      commits/<hook>/<chunk>.json        chunk <chunk> of <hook> is in: rows, crc32c, float64 partial stats
      commits/index.json                 (complete stores) every chunk's committed crc32c, per array
      lease.json                         the one writer (owner, host, pid, heartbeat); absent when idle

A store's state is the set of commit objects; each is written after the data it commits. Row
``r`` belongs to sequence ``r // context_size`` at position ``r % context_size``.

Format version 1 (older stores, read-only): the same arrays without checksums, no ``commits/``;
``n_tokens_written`` in the attributes was the commit cursor. ``sae store convert`` upgrades it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..errors import SaeError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TOKENS = "tokens"
SCALE_SUFFIX = ".scale"
COMMITS = "commits"
COMMIT_INDEX = "index.json"
"""``commits/index.json``: every chunk's committed crc32c per array (written by ``finalize``)."""
LEASE_FILE = "lease.json"
STATUS_COMPLETE = "complete"
STATUS_IN_PROGRESS = "in_progress"

# Attributes whose values must agree for ``--resume`` to continue a harvest.
RESUME_KEYS = ("model_id", "model_fingerprint", "hook_names", "d_model", "context_size", "dataset", "split",
               "n_tokens_target", "dtype", "codec", "chunk_tokens", "seed")

# Attributes every readable store has (v2 in-progress stores lack the final statistics).
REQUIRED_ATTRS = ("hook_names", "d_model", "context_size", "chunk_tokens", "codec", "dtype", "store_id", "model_id")


def chunk_key(array: str, i: int, ndim: int) -> tuple[str, ...]:
    """Object path parts of chunk ``i`` of a row-chunked array (zarr v3 default chunk key encoding)."""
    return (array, "c", str(i), *(["0"] * (ndim - 1)))


def committed_chunks(list_names: Callable[..., list[str]], hook_names: list[str]) -> set[int]:
    """Chunk indices committed for *every* hook: the intersection over hooks of the
    ``commits/<hook>/<i>.json`` names that ``list_names(COMMITS, hook)`` returns."""
    sets = [{int(n[:-5]) for n in list_names(COMMITS, h) if n.endswith(".json") and n[:-5].isdigit()}
            for h in hook_names]
    return set.intersection(*sets) if sets else set()


def chunk_rows(n_tokens: int, chunk_tokens: int, chunks: set[int]) -> int:
    """Rows held by the chunks ``chunks`` of an ``n_tokens``-row array (the last chunk may be short)."""
    return sum(min(chunk_tokens, n_tokens - i * chunk_tokens) for i in chunks)


def hook_sort_key(hook_name: str) -> tuple:
    """Canonical order of hook names: natural order, digits compared as numbers
    (``blocks.2…`` before ``blocks.10…``), so a store's hooks sort by layer."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", hook_name))


def canonical_hooks(hook_names: list[str]) -> list[str]:
    """``hook_names`` in canonical order (:func:`hook_sort_key`)."""
    return sorted(hook_names, key=hook_sort_key)


def array_names(hook_names: list[str], has_scale: bool) -> list[str]:
    """Every array of a store in digest order: tokens, then per hook, in canonical order
    (:func:`canonical_hooks`, independent of the order hooks were added), its activations (and scale)."""
    out = [TOKENS]
    for h in canonical_hooks(hook_names):
        out.append(h)
        if has_scale:
            out.append(h + SCALE_SUFFIX)
    return out


class StoreError(SaeError):
    """A store is missing, incomplete, corrupt or does not match what was asked of it."""


def scale_array_name(hook_name: str) -> str:
    """Name of the per-row scale array that accompanies an int8/fp8 activation array."""
    return hook_name + SCALE_SUFFIX
