"""``sae store ls``: the stores under a prefix (a local folder or a bucket path)."""

from __future__ import annotations

import os
from typing import Any

from ..outputs import is_store_attrs
from .format import StoreError
from .location import StoreLocation, as_location


def _store_row(loc: StoreLocation, name: str) -> dict[str, Any] | None:
    try:
        attrs = (loc.read_json("zarr.json") or {}).get("attributes") or {}
    except (OSError, ValueError):
        return None
    if not is_store_attrs(attrs):
        return None
    return {"name": name, "url": loc.url, "model": attrs.get("model_id"), "hooks": list(attrs.get("hook_names", [])),
            "tokens": attrs.get("n_tokens_written", attrs.get("n_tokens_target")), "codec": attrs.get("codec"),
            "dtype": attrs.get("dtype"), "status": attrs.get("status"), "created": attrs.get("created"),
            "store_id": attrs.get("store_id"), "format": attrs.get("format_version"), "bytes": _bytes(loc)}


def _bytes(loc: StoreLocation) -> int | None:
    try:
        if loc.local:
            return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(loc.path) for f in fs)
        return int(loc.fs.du(loc.key()))
    except (OSError, ValueError, NotImplementedError):
        return None


def _check_listable(base: StoreLocation, prefix: str) -> None:
    """Raise ``StoreError`` unless ``prefix`` is an existing folder (or bucket prefix) to list."""
    if base.local:
        if not base.path.exists():
            raise StoreError(f"{prefix}: no such folder; pass a folder (or bucket prefix) that holds stores")
        if not base.path.is_dir():
            raise StoreError(f"{prefix} is a file, not a folder of stores; pass the folder that holds it")
        return
    if base.read_only:
        raise StoreError(f"{prefix}: {base.scheme}:// cannot be listed; pass a store's own URL to `sae store info`")
    try:
        found = base.fs.exists(base.key())
    except Exception as e:  # noqa: BLE001 - e.g. a bucket that does not exist, no credentials
        raise StoreError(f"{prefix}: cannot list it ({e.__class__.__name__}: {e}); check the bucket name and "
                         "--storage-option") from None
    if not found:
        raise StoreError(f"{prefix}: nothing there (no such bucket or prefix); check the URL")


def list_stores(prefix: str, storage_options: dict | None = None) -> list[dict[str, Any]]:
    """One row per sae store directly under ``prefix`` (or ``prefix`` itself when it is a store),
    sorted by name: model, hooks, tokens, codec, bytes, status, created, store id."""
    base = as_location(prefix, storage_options)
    own = _store_row(base, base.url.rsplit("/", 1)[-1])
    if own is not None:
        return [own]
    _check_listable(base, prefix)
    rows = []
    for name in base.list_names():
        if name.startswith("."):
            continue  # staging copies and hidden files
        child = as_location(f"{base.url}/{name}", storage_options)
        row = _store_row(child, name)
        if row is not None:
            rows.append(row)
    return rows
