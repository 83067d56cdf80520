"""SAELens activation caches (HF ``datasets`` directories) ⇄ our Zarr stores.

SAELens' ``CacheActivationsRunner`` (6.54, ``cache_activations_runner.py``) writes a
``Dataset.save_to_disk`` directory with one row per sequence and the columns

* ``<hook_name>``: ``Array2D(shape=(context_size, d_in), dtype=<cfg.dtype>)``,
* ``token_ids``: ``Sequence(Value("int32"), length=context_size)``,

and ``ActivationsStore`` (``cached_activations_path=``, ``use_cached_activations=True``) trains from
it, checking exactly that feature shape. :func:`export_store` writes that layout from a store (every
hook, or one), :func:`import_cache` writes a store (format 2, every chunk with crc32c) from it.

Units and dtypes: the export holds our raw activations (no normalisation), as float32 or float16
(Arrow has no bfloat16, so a bf16 store exports as float32, exactly). Rows whose token is special
are exported as they are; SAELens' ``exclude_special_tokens`` drops them at training time through
``token_ids``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, UnavailableError
from ..outputs import build_output, check_output_location, is_empty_dir

EXPORT_DTYPES = ("float32", "float16")
MARKER = "sae_export.json"
"""Written into every export directory: what it came from (and how we know an export is ours)."""


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise UnavailableError("HF-datasets export/import needs the `datasets` package: "
                               "pip install 'sae[interop]'") from e
    return datasets


def is_our_export(path: Path) -> bool:
    """True when ``path`` is a directory :func:`export_store` wrote."""
    return (path / MARKER).is_file()


def export_store(url: str, out: str | Path, *, hook_name: str | None = None, dtype: str = "float32",
                 n_tokens: int | None = None, overwrite: bool = False, storage_options: dict | None = None,
                 quiet: bool = False) -> Path:
    """Write the store at ``url`` as a SAELens activation cache in ``out`` (see module docstring).

    ``hook_name``: one hook (default: every hook, one column each). ``n_tokens``: the first N
    tokens (whole sequences). The cache is built beside ``out`` and moved into place at the end;
    ``overwrite`` replaces only an export of ours. Returns ``out``.

    Raises:
        ConfigError: a bad option or an existing ``out``. StoreError: a bad store.
        UnavailableError: ``datasets`` is not installed.
    """
    from ..progress import progress_bar
    from ..store import ActivationStore

    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: an HF-datasets cache holds {' or '.join(EXPORT_DTYPES)}")
    out = Path(out)
    check_output_location(out, "--out")
    if out.exists() and not is_empty_dir(out) and not overwrite:
        raise ConfigError(f"{out} already exists: pick another --out, or --overwrite to replace an export of ours")
    s = ActivationStore(url, storage_options=storage_options)
    hooks = [s.default_hook(hook_name)] if hook_name is not None else s.hook_names
    ctx, d = s.context_size, s.d_model
    n = min(n_tokens or s.n_tokens, s.n_tokens)
    n -= n % ctx
    if n == 0:
        raise ConfigError(f"--tokens {n_tokens}: less than one sequence of {ctx} tokens")
    datasets = _datasets()
    features = datasets.Features({**{h: datasets.Array2D(shape=(ctx, d), dtype=dtype) for h in hooks},
                                  "token_ids": datasets.Sequence(datasets.Value("int32"), length=ctx)})
    step = max(ctx, (s.chunk_tokens // ctx) * ctx)

    with build_output(out, overwrite=overwrite, is_ours=is_our_export, what="an HF-datasets export of ours",
                      error=ConfigError) as target:
        target.mkdir(parents=True, exist_ok=True)
        shards = target / ".shards"
        tokens = s.tokens
        paths = []
        with progress_bar(quiet) as progress:  # one shard per store chunk (bounded memory), then one dataset
            task = progress.add_task("export", total=n)
            for i, start in enumerate(range(0, n, step)):
                stop = min(start + step, n)
                cols = {h: s.read_rows(h, start, stop).numpy().astype(dtype).reshape(-1, ctx, d) for h in hooks}
                cols["token_ids"] = tokens[start:stop].astype(np.int32).reshape(-1, ctx)
                paths.append(shards / f"{i:05d}")
                datasets.Dataset.from_dict(cols, features=features).save_to_disk(str(paths[-1]))
                progress.advance(task, stop - start)
        parts = [datasets.load_from_disk(str(p)) for p in paths]
        datasets.concatenate_datasets(parts).save_to_disk(str(target / ".dataset"), max_shard_size="500MB")
        del parts
        for p in (target / ".dataset").iterdir():
            p.rename(target / p.name)
        (target / ".dataset").rmdir()
        shutil.rmtree(shards, ignore_errors=True)
        a = s.attrs
        (target / MARKER).write_text(json.dumps({
            "source_store": str(url), "store_id": a.get("store_id"), "content_digest": s.content_digest,
            "hook_names": hooks, "context_size": ctx, "d_in": d, "n_tokens": n, "dtype": dtype,
            "model_name": a.get("model_id"), "model_weights": a.get("model_weights"),
            "model_fingerprint": a.get("model_fingerprint"), "dataset_path": a.get("dataset"),
            "special_token_ids": a.get("special_token_ids"), "prepend_bos": True}, indent=2))
    return out


def _check_readable(ds: Any, hook: str, src: Path) -> None:
    """Read every Arrow record batch of ``ds``'s activation column once (validating it) before anything
    is written. Raises ``ConfigError`` naming ``src`` for a truncated or corrupt export."""
    try:
        table = ds.data.table if hasattr(ds.data, "table") else ds.data
        table.validate(full=True)
        for batch in table.column(hook).chunks:
            batch.validate(full=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{src}: its Arrow data cannot be read ({e.__class__.__name__}: {str(e)[:200]}); the "
                          "export is truncated or corrupt: export it again") from None


def import_cache(src: str | Path, url: str, *, hook_name: str | None = None, model: str | None = None,
                 codec: str = "zstd", dtype: str = "float32", chunk_tokens: int | None = None,
                 overwrite: bool = False, storage_options: dict | None = None, quiet: bool = False) -> str:
    """Write the SAELens activation cache at ``src`` as a store at ``url`` (format 2).

    Identity comes from our own ``sae_export.json`` or SAELens' ``cache_activations_runner_cfg.json``
    when present (model, dataset); ``model`` overrides it. Special tokens: the export's list, else
    the token every sequence starts with when all start with the same one (the BOS SAELens
    prepends), else none. ``overwrite`` replaces only a store of ours, atomically.

    Raises:
        ConfigError: not a cache, a missing hook column, bad options. StoreError: output problems.
        UnavailableError: ``datasets`` is not installed.
    """
    from ..model import EMBEDDED_ALIASES, EMBEDDED_MODEL_ID, EMBEDDED_WEIGHTS
    from ..progress import progress_bar
    from ..store.codecs import CodecSpec
    from ..store.format import StoreError
    from ..store.lease import building, check_not_leased
    from ..store.location import StoreLocation, as_location
    from ..store.writer import StoreWriter

    src = Path(src)
    if not (src / "dataset_info.json").is_file() or not (src / "state.json").is_file():
        raise ConfigError(f"{src} is not an HF-datasets directory (no dataset_info.json/state.json): pass the "
                          "directory CacheActivationsRunner wrote")
    spec = CodecSpec.parse(codec, dtype)
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(src))
    except (OSError, ValueError, KeyError) as e:  # pyarrow's errors are OSError/ValueError subclasses
        raise ConfigError(f"{src}: its Arrow data cannot be read ({e.__class__.__name__}: {str(e)[:200]}); the "
                          "export is truncated or corrupt: export it again") from None
    if not isinstance(ds, datasets.Dataset):
        raise ConfigError(f"{src} holds several splits: import one of its split directories")
    arrays = [c for c, f in ds.features.items() if isinstance(f, datasets.Array2D)]
    if hook_name is None and len(arrays) != 1:
        raise ConfigError(f"{src} has activation columns {arrays}: pick one with --hook-name")
    hook = hook_name or arrays[0]
    if hook not in arrays:
        raise ConfigError(f"{src} has no activation column {hook!r} (it has {', '.join(arrays) or 'none'})")
    ctx, d = ds.features[hook].shape
    meta_src = {}
    for name in (MARKER, "cache_activations_runner_cfg.json"):
        if (src / name).is_file():
            meta_src = json.loads((src / name).read_text())
            break
    model_id = model or meta_src.get("model_name")
    if not model_id:
        raise ConfigError(f"{src} does not record its model: pass --model (HF id, directory, or `embedded`)")
    weights = meta_src.get("model_weights")
    if model_id in EMBEDDED_ALIASES:
        model_id, weights = EMBEDDED_MODEL_ID, EMBEDDED_WEIGHTS
    n_rows = len(ds)
    has_tokens = "token_ids" in ds.column_names
    special = meta_src.get("special_token_ids")
    if special is None and has_tokens and n_rows:
        first = np.asarray(ds.with_format("numpy")[:]["token_ids"][:, 0]) if n_rows <= 4096 else \
            np.asarray(ds.with_format("numpy").select(range(4096))["token_ids"][:, 0])
        special = [int(first[0])] if (first == first[0]).all() else []
    special = [int(t) for t in (special or [])]
    chunk = chunk_tokens or max(ctx, (16384 // ctx) * ctx)
    if chunk % ctx:
        raise ConfigError(f"--chunk-tokens {chunk} must be a multiple of the context size {ctx}")
    meta = {"model_id": model_id, "model_weights": weights, "model_fingerprint": meta_src.get("model_fingerprint"),
            "tokenizer": "", "dataset": meta_src.get("dataset_path") or "unknown", "split": "train", "seed": 0,
            "layers": [], "hook_point": "resid_post", "special_token_ids": special,
            "bos_token_id": special[0] if special else None,
            "imported_from": {"format": "hf-datasets", "path": str(src.resolve()), "rows": n_rows,
                              "token_ids": has_tokens}}
    loc = as_location(str(url), storage_options)
    if loc.read_only:
        raise StoreError(f"--out {url}: {loc.scheme}:// is read-only; import to a path, s3:// or gs://")
    _check_readable(ds, hook, src)
    if loc.local:
        check_output_location(loc.path, "--out")
        if overwrite:
            check_not_leased(loc, "--overwrite")
    elif loc.exists("zarr.json"):
        raise StoreError(f"{url} already exists (remote stores cannot be replaced atomically): pick a new URL")
    n = n_rows * ctx
    view = ds.with_format("numpy", columns=[hook, *(["token_ids"] if has_tokens else [])])

    def copy(target: Path | StoreLocation) -> None:
        w = StoreWriter(target, meta, [hook], d, ctx, n, spec, chunk, storage_options=storage_options)
        try:
            per = chunk // ctx
            with progress_bar(quiet) as progress:
                task = progress.add_task("import", total=n)
                for r in range(0, n_rows, per):
                    batch = view[r:min(r + per, n_rows)]
                    acts = torch.from_numpy(np.ascontiguousarray(batch[hook], dtype=np.float32).reshape(-1, d))
                    tok = (np.asarray(batch["token_ids"], dtype=np.int32).reshape(-1) if has_tokens
                           else np.zeros(len(acts), dtype=np.int32))
                    w.append(tok, {hook: acts}, ~np.isin(tok, np.asarray(special, dtype=np.int64)))
                    progress.advance(task, len(acts))
            w.finalize()
        finally:
            w.close()

    with building(loc, overwrite=overwrite) as target:
        copy(target)
    return str(url)
