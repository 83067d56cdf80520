"""The ``sae`` command line: harvest, store info, train, evaluate.

No traceback reaches a user: expected errors (:class:`~sae.errors.SaeError` and other
``ValueError`` s) print one ``error:`` line naming the fix and exit 2; anything unexpected prints one
``error:`` line plus a hint to rerun with ``SAE_DEBUG=1``, which shows the traceback, and exits 1.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from .harvest.harvest import DEFAULT_TOKENS, IDENTITY_DEFAULTS, HarvestConfig
from .params import field_defaults, field_docs
from .store.location import parse_storage_options
from .synth.config import SynthConfig
from .train.config import TrainConfig

# typer ≥ 0.22 vendors click (``typer._click``), older typer uses the ``click`` package: take the
# exception classes from typer's own public ones so both work.
_ClickException: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

# Options shared by several commands (one definition each).
_T = field_defaults(TrainConfig)
"""Training defaults: the CLI takes them (and its help texts, ``_TH``) from :class:`TrainConfig`, so a
default is written once (``tests/test_cli_defaults.py`` checks every option against its field)."""
_TH = field_docs(TrainConfig)
LOG_TO_HELP = ("Experiment trackers, comma-separated: wandb, mlflow, tensorboard (also a [log] table in "
               "--config: to, project, experiment, name, group, tags, dir, mlflow_uri, timeout_s). "
               "metrics.jsonl stays the record.")
StoreOption = Annotated[str, typer.Option("--store", help=_TH["store"])]
StorageOptions = Annotated[list[str] | None, typer.Option(
    "--storage-option", help="fsspec option KEY=VALUE for a remote store, e.g. endpoint_url=http://127.0.0.1:9000 "
                             "(repeatable).")]
CacheOption = Annotated[str | None, typer.Option("--cache", help=_TH["cache"])]

_S = field_defaults(SynthConfig)
_SH = field_docs(SynthConfig)
_H = field_defaults(HarvestConfig)
_HH = field_docs(HarvestConfig)


def _ident(name: str) -> str:
    """Help of a store-identity option: its field's doc and the default of a new harvest (growing a
    store, the store's value is the default)."""
    return f"{_HH[name]} (default: {IDENTITY_DEFAULTS[name]}; growing a store: the store's)"

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Harvest LM activations into a Zarr store; train and evaluate SAEs from it.")
store_app = typer.Typer(no_args_is_help=True, help="Inspect activation stores.")
app.add_typer(store_app, name="store")


def _fail(e: Exception) -> None:
    if _reported_by_rank_0(e):
        raise typer.Exit(getattr(e, "exit_code", 2))
    typer.secho(f"error: {_one_line(str(e))}", fg="red", err=True)
    raise typer.Exit(getattr(e, "exit_code", 2))


def _reported_by_rank_0(e: Exception) -> bool:
    """Whether this data-parallel rank leaves ``e`` to another reporter (one ``error:`` line per job).

    Under ``sae train --nproc`` the launcher reports a lost rank and an interruption, so no rank
    prints those. On a rank other than 0, an error every rank meets alike (bad input, an existing run
    directory, divergence) is left to rank 0. Under plain ``torchrun`` a lost peer is printed by every
    rank that sees it (rank 0 may be the lost one)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or _debug():
        return False
    from .errors import Interrupted
    from .train.collective import DistributedError, PeerFailed
    from .train.launch import LAUNCHED_ENV

    lost = isinstance(e, DistributedError) and not isinstance(e, PeerFailed)
    if os.environ.get(LAUNCHED_ENV) and (lost or isinstance(e, Interrupted)):
        return True
    return os.environ.get("RANK", "0") != "0" and not lost


def _one_line(msg: str) -> str:
    return " ".join(msg.split()) or "failed"


def _debug() -> bool:
    return os.environ.get("SAE_DEBUG", "") not in ("", "0")


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every exception of a command into one ``error:`` line (see module doc)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, _ClickException):
            raise
        except KeyboardInterrupt:
            if _debug():
                raise
            typer.secho("error: interrupted (Ctrl-C); outputs with a checkpoint can be continued with --resume",
                        fg="red", err=True)
            raise typer.Exit(130) from None
        except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
            if _debug():
                raise
            _fail(e)
        except Exception as e:
            if _debug():
                raise
            typer.secho(f"error: unexpected {e.__class__.__name__}: {_one_line(str(e))} "
                        "(run with `SAE_DEBUG=1` for the traceback)", fg="red", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _explicit(ctx: typer.Context, names: list[str]) -> set[str]:
    """The options of ``names`` that the user gave on the command line (or via the environment)."""
    given = set()
    for n in names:
        src = ctx.get_parameter_source(n)
        if src is not None and src.name in ("COMMANDLINE", "ENVIRONMENT"):
            given.add(n)
    return given


@app.command()
@_guard
def harvest(
    layer: Annotated[list[int], typer.Option("--layer", help=_HH["layers"] + " (repeatable)")],
    model: Annotated[str | None, typer.Option(help=_HH["model"])] = _H["model"],
    dataset: Annotated[str | None, typer.Option(help=_ident("dataset"))] = None,
    split: Annotated[str | None, typer.Option(help=_ident("split"))] = None,
    text_column: Annotated[str | None, typer.Option(help=_ident("text_column"))] = None,
    tokens: Annotated[int | None, typer.Option(help=f"{_HH['tokens']} (default: {DEFAULT_TOKENS})")] = None,
    context_size: Annotated[int | None, typer.Option(help=_ident("context_size"))] = None,
    batch_size: Annotated[int, typer.Option(help=_HH["batch_size"])] = _H["batch_size"],
    dtype: Annotated[str | None, typer.Option(help=_ident("dtype"))] = None,
    codec: Annotated[str | None, typer.Option(help=_ident("codec"))] = None,
    chunk_tokens: Annotated[int | None, typer.Option(help=_ident("chunk_tokens"))] = None,
    device: Annotated[str, typer.Option(help=_HH["device"])] = _H["device"],
    seed: Annotated[int | None, typer.Option(help=_ident("seed"))] = None,
    out: Annotated[str, typer.Option(help=_HH["out"])] = _H["out"],
    storage_option: StorageOptions = None,
    resume: Annotated[bool, typer.Option(help=_HH["resume"])] = _H["resume"],
    overwrite: Annotated[bool, typer.Option(help=_HH["overwrite"])] = _H["overwrite"],
    extend: Annotated[bool, typer.Option(help=_HH["extend"])] = _H["extend"],
    into: Annotated[str | None, typer.Option(help=_HH["into"])] = _H["into"],
    workers: Annotated[str | None, typer.Option(help=_HH["workers"])] = None,
    scheduler: Annotated[str | None, typer.Option(help=_HH["scheduler"])] = _H["scheduler"],
) -> None:
    """Run the model once over a corpus and write resid_post activations to a Zarr store.

    With --extend, --into or --resume, the options that decide what the rows mean (model, dataset,
    split, text column, seed, context size, chunk size, dtype, codec) default to the store's; one that
    is given and differs from the store's is refused in one line, before anything is written."""
    from .harvest.harvest import HarvestConfig
    from .harvest.harvest import harvest as run

    cfg = HarvestConfig(layers=layer, model=model, dataset=dataset, split=split, text_column=text_column,
                        tokens=tokens, context_size=context_size, batch_size=batch_size, dtype=dtype, codec=codec,
                        chunk_tokens=chunk_tokens, device=device, seed=seed, out=out, resume=resume,
                        overwrite=overwrite, storage_options=parse_storage_options(storage_option),
                        workers=workers, scheduler=scheduler, into=into, extend=extend)
    cfg.validate()  # before the model loads or anything is created
    run(cfg)


@store_app.command("info")
@_guard
def store_info(
    path: Annotated[str, typer.Argument(help="Store path or URL.")],
    storage_option: StorageOptions = None,
) -> None:
    """Print a store's metadata: tokens, hooks, bytes stored, compression ratio, digest, status."""
    from rich.console import Console
    from rich.table import Table

    from .store import ActivationStore

    s = ActivationStore(path, require_complete=False, storage_options=parse_storage_options(storage_option))
    a = s.attrs
    t = Table(title=str(path), show_header=False)
    stored = s.nbytes_stored()
    rows = [
        ("status", a.get("status")), ("format", a.get("format_version")),
        ("model", f"{a['model_id']} ({a.get('model_fingerprint')})"),
        ("hooks", ", ".join(s.hook_names)), ("d_model", s.d_model),
        ("tokens", f"{s.n_tokens:,} / {a.get('n_tokens_target', s.n_tokens):,}"), ("context_size", s.context_size),
        ("dataset", f"{a.get('dataset')} (split {a.get('split')})"), ("dtype / codec", f"{a['dtype']} / {a['codec']}"),
        ("chunk_tokens", f"{s.chunk_tokens:,}  ({s.n_chunks} chunks)"),
        ("bytes stored", f"{stored / 2**20:,.1f} MiB  ({stored / max(s.n_tokens, 1):,.0f} B/token)"),
        ("compression vs fp32", f"{s.nbytes_logical() / max(stored, 1):.2f}x"),
        ("store id", a.get("store_id")), ("content digest", a.get("content_digest")),
        ("created", a.get("created")), ("sae version", a.get("package_version")),
    ]
    for h in s.hook_names:
        if (a.get("stats") or {}).get(h):
            rows.append((f"E‖x‖² {h}", f"{s.mean_sq_norm(h):,.1f}"))
    syn = a.get("synthetic")
    if isinstance(syn, dict):
        c = syn.get("config") or {}
        rows.append(("ground truth", f"{syn.get('name')}: {c.get('num_features'):,} features in {c.get('hidden_dim')} "
                                     f"dims, seed {c.get('seed')} ({syn.get('generator')}); `--eval ground_truth`"))
    for k, v in rows:
        t.add_row(k, str(v))
    Console().print(t)


@store_app.command("verify")
@_guard
def store_verify(
    path: Annotated[str, typer.Argument(help="Store path or URL.")],
    workers: Annotated[int, typer.Option(help="Chunks read in parallel.")] = 4,
    storage_option: StorageOptions = None,
) -> None:
    """Read every chunk of every array: checksums, token ids, row counts, recomputed statistics and
    the content digest. Exit 0 when clean, 1 when corrupt (each bad chunk named with its rows)."""
    from rich.console import Console
    from rich.table import Table

    from .errors import ConfigError
    from .progress import progress_bar
    from .store import ActivationStore
    from .store.verify import verify_store

    if workers < 1:
        raise ConfigError(f"--workers {workers} must be >= 1")
    s = ActivationStore(path, require_complete=False, storage_options=parse_storage_options(storage_option))
    with progress_bar(unit="chunk") as bar:
        rep = verify_store(s, workers=workers, progress=bar)
    con = Console()
    t = Table(title=f"verify {path}")
    for col in ("check", "result", "detail"):
        t.add_column(col)
    for name, ok, detail in rep.checks:
        t.add_row(name, "[green]ok[/]" if ok else "[red]FAIL[/]", detail)
    con.print(t)
    if rep.bad_chunks:
        b = Table(title="bad chunks")
        for col in ("array", "chunk", "rows", "problem"):
            b.add_column(col)
        for array, i, rows, problem in rep.bad_chunks:
            b.add_row(array, str(i), rows, problem)
        con.print(b)
    print(f"read {rep.bytes_read / 1e9:.3f} GB in {rep.seconds:.2f} s ({rep.gb_per_s:.2f} GB/s): "
          f"{'clean' if rep.ok else 'CORRUPT'}")
    if not rep.ok:
        typer.secho(f"error: {path} is corrupt ({len(rep.bad_chunks)} bad chunks): restore it from a copy "
                    "or re-harvest", fg="red", err=True)
        raise typer.Exit(1)


@store_app.command("synth")
@_guard
def store_synth(
    config: Annotated[str, typer.Argument(help=_SH["config"])] = _S["config"],
    tokens: Annotated[int, typer.Option(help=_SH["tokens"])] = _S["tokens"],
    out: Annotated[str, typer.Option(help=_SH["out"])] = _S["out"],
    seed: Annotated[int, typer.Option(help=_SH["seed"])] = _S["seed"],
    dtype: Annotated[str, typer.Option(help=_SH["dtype"])] = _S["dtype"],
    codec: Annotated[str, typer.Option(help=_SH["codec"])] = _S["codec"],
    chunk_tokens: Annotated[int, typer.Option(help=_SH["chunk_tokens"])] = _S["chunk_tokens"],
    context_size: Annotated[int, typer.Option(help=_SH["context_size"])] = _S["context_size"],
    device: Annotated[str, typer.Option(help=_SH["device"])] = _S["device"],
    resume: Annotated[bool, typer.Option(help=_SH["resume"])] = _S["resume"],
    overwrite: Annotated[bool, typer.Option(help=_SH["overwrite"])] = _S["overwrite"],
    storage_option: StorageOptions = None,
    print_config: Annotated[bool, typer.Option(help="Print CONFIG as TOML (a file to edit) and exit.")] = False,
) -> None:
    """Write a synthetic store with known ground truth (SynthSAEBench, arXiv 2602.14687; SAELens'
    generator): every command reads it, and `sae evaluate --eval ground_truth` scores SAEs against it."""
    from .synth.store import SynthConfig, write_synthetic_store
    from .synth.store import print_config as to_toml

    if print_config:
        typer.echo(to_toml(config), nl=False)
        return
    cfg = SynthConfig(config=config, tokens=tokens, out=out, seed=seed, dtype=dtype, codec=codec,
                      chunk_tokens=chunk_tokens, context_size=context_size, device=device, resume=resume,
                      overwrite=overwrite, storage_options=parse_storage_options(storage_option))
    cfg.validate()
    write_synthetic_store(cfg)
    store_info(out, storage_option)


@store_app.command("ls")
@_guard
def store_ls(
    prefix: Annotated[str, typer.Argument(help="Folder or bucket prefix holding stores.")],
    storage_option: StorageOptions = None,
) -> None:
    """List the sae stores under a prefix: model, hooks, tokens, codec, bytes, status, created, id."""
    from rich.console import Console
    from rich.table import Table

    from .store.catalog import list_stores

    rows = list_stores(prefix, parse_storage_options(storage_option))
    t = Table(title=f"stores under {prefix}")
    for col in ("name", "model", "hooks", "tokens", "codec", "bytes", "status", "created", "store id"):
        t.add_column(col, justify="right" if col in ("tokens", "bytes") else "left")
    for r in rows:
        size = f"{r['bytes'] / 2**20:,.1f} MiB" if r["bytes"] is not None else "?"
        t.add_row(r["name"], str(r["model"]), ", ".join(r["hooks"]), f"{r['tokens'] or 0:,}",
                  f"{r['dtype']}/{r['codec']}", size, str(r["status"]), str(r["created"]), str(r["store_id"]))
    Console(width=None if sys.stdout.isatty() else 200).print(t)
    if not rows:
        print(f"no sae stores under {prefix}")


@store_app.command("convert")
@_guard
def store_convert(
    src: Annotated[str, typer.Argument(help="Source store (path or URL; format 1 or 2).")],
    dst: Annotated[str, typer.Argument(help="Destination store (path or URL), written in format 2.")],
    codec: Annotated[str, typer.Option(help="zstd | none | bitround:K | int8 | fp8")] = "zstd",
    dtype: Annotated[str | None, typer.Option(help="bfloat16 | float16 | float32 (default: the source's).")] = None,
    tokens: Annotated[int | None, typer.Option(help="Copy only the first N tokens.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing destination.")] = False,
    storage_option: StorageOptions = None,
) -> None:
    """Re-encode a store with another codec/precision, or upgrade a format-1 store (no model rerun)."""
    from .store.convert import convert_store

    opts = parse_storage_options(storage_option)
    convert_store(src, dst, codec, dtype, tokens, overwrite, storage_options=opts)
    store_info(dst, storage_option)


@store_app.command("export")
@_guard
def store_export(
    url: Annotated[str, typer.Argument(help="Store (path or URL).")],
    out: Annotated[Path, typer.Option(help="Directory to write the HF-datasets activation cache in.")],
    format: Annotated[str, typer.Option("--format", help="hf-datasets (SAELens' cached_activations_path layout).")
    ] = "hf-datasets",
    hook_name: Annotated[str | None, typer.Option(help="One hook (default: every hook, one column each).")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | float16")] = "float32",
    tokens: Annotated[int | None, typer.Option(help="Export only the first N tokens (whole sequences).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export of ours (atomically).")] = False,
    storage_option: StorageOptions = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Export a store as a SAELens activation cache (train SAELens from it with cached_activations_path)."""
    from .errors import ConfigError
    from .interop.hf_datasets import export_store

    if format != "hf-datasets":
        raise ConfigError(f"--format {format!r}: the only export format is hf-datasets")
    path = export_store(url, out, hook_name=hook_name, dtype=dtype, n_tokens=tokens, overwrite=overwrite,
                        storage_options=parse_storage_options(storage_option), quiet=quiet)
    typer.echo(f"exported {url} → {path}")


@store_app.command("import")
@_guard
def store_import(
    src: Annotated[Path, typer.Argument(help="A SAELens activation cache (HF-datasets directory).")],
    out: Annotated[str, typer.Option(help="Store to write (path or URL).")],
    hook_name: Annotated[str | None, typer.Option(help="Activation column (default: the only one).")] = None,
    model: Annotated[str | None, typer.Option(help="Model the activations came from (default: recorded).")] = None,
    codec: Annotated[str, typer.Option(help="zstd | none | bitround:K | int8 | fp8")] = "zstd",
    dtype: Annotated[str, typer.Option(help="bfloat16 | float16 | float32")] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store of ours (atomically).")] = False,
    storage_option: StorageOptions = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Write a SAELens activation cache as a store (format 2: chunked, compressed, crc32c)."""
    from .interop.hf_datasets import import_cache

    import_cache(src, out, hook_name=hook_name, model=model, codec=codec, dtype=dtype, overwrite=overwrite,
                 storage_options=parse_storage_options(storage_option), quiet=quiet)
    store_info(out, storage_option)


def _parse_params(items: list[str]) -> dict[str, str]:
    from .errors import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--param {item!r} must look like NAME=VALUE (e.g. --param tau=0.2)")
        if not key.strip():
            raise ConfigError(f"--param {item!r} has no NAME before '='")
        out[key.strip()] = value.strip()
    return out


@app.command()
@_guard
def train(
    ctx: typer.Context,
    store: StoreOption = _T["store"],
    storage_option: StorageOptions = None,
    cache: CacheOption = None,
    hook: Annotated[str | None, typer.Option(help=_TH["hook_name"])] = None,
    variant: Annotated[str, typer.Option(help=_TH["variant"])] = _T["variant"],
    arch: Annotated[str | None, typer.Option(help=_TH["arch"])] = _T["arch"],
    jumprelu_sparsity: Annotated[str | None, typer.Option(help="--arch jumprelu: gemma (L0 step penalty) | "
                                                               "anthropic (tanh sparsity + dead pre-activation loss)."
                                                          )] = None,
    jumprelu_variant: Annotated[str | None, typer.Option(hidden=True, help="Old name of --jumprelu-sparsity.")
    ] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p",
                                                    help="Variant or arch hyperparameter NAME=VALUE (repeatable).")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML file of training options ([variant_params] table). "
                                                     "Options given on the command line win over the file.")] = None,
    d_sae: Annotated[int | None, typer.Option(help=_TH["d_sae"])] = _T["d_sae"],
    expansion: Annotated[int, typer.Option(help=_TH["expansion"])] = _T["expansion"],
    k: Annotated[int, typer.Option(help=_TH["k"])] = _T["k"],
    l1_coefficient: Annotated[float, typer.Option(help=_TH["l1_coefficient"])] = _T["l1_coefficient"],
    lr: Annotated[float, typer.Option(help=_TH["lr"])] = _T["lr"],
    tokens: Annotated[int, typer.Option(help=_TH["tokens"])] = _T["tokens"],
    batch_size: Annotated[int, typer.Option(help=_TH["batch_size"])] = _T["batch_size"],
    seed: Annotated[int, typer.Option(help=_TH["seed"])] = _T["seed"],
    device: Annotated[str, typer.Option(help=_TH["device"])] = _T["device"],
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<variant>, or runs/<arch> "
                                                  "without a penalty).")] = None,
    log_every: Annotated[int, typer.Option(help=_TH["log_every"])] = _T["log_every"],
    checkpoint_every: Annotated[int, typer.Option(help=_TH["checkpoint_every"])] = _T["checkpoint_every"],
    checkpoint_minutes: Annotated[float, typer.Option(help=_TH["checkpoint_minutes"])] = _T["checkpoint_minutes"],
    resume: Annotated[bool, typer.Option(help=_TH["resume"])] = _T["resume"],
    overwrite: Annotated[bool, typer.Option(help=_TH["overwrite"])] = _T["overwrite"],
    save_unit_decoder: Annotated[bool, typer.Option(help=_TH["save_unit_decoder"])] = _T["save_unit_decoder"],
    read_workers: Annotated[int, typer.Option(help=_TH["read_workers"])] = _T["read_workers"],
    autocast: Annotated[str, typer.Option(help=_TH["autocast"])] = _T["autocast"],
    init_from: Annotated[Path | None, typer.Option(help=_TH["init_from"])] = _T["init_from"],
    log_to: Annotated[str | None, typer.Option(help=LOG_TO_HELP)] = None,
    nproc: Annotated[int, typer.Option(help="Data-parallel ranks on this machine (torch.distributed: gloo on "
                                            "the CPU, NCCL with one GPU per rank); the same as `torchrun "
                                            "--nproc-per-node N -m sae train ...`. Same data order and global "
                                            "batch as one process.", min=1)] = 1,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train one SAE from an activation store (streamed, shuffled, never loaded whole)."""
    from .errors import ConfigError
    from .tracking import TrackingConfig
    from .train.config import TrainConfig
    from .train.run import train as run

    tracking = TrackingConfig.parse(log_to, _log_table(config))

    opts: dict[str, Any] = dict(store=store, storage_options=parse_storage_options(storage_option), cache=cache,
                                hook_name=hook, variant=variant, arch=arch, d_sae=d_sae,
                                expansion=expansion, k=k, l1_coefficient=l1_coefficient, lr=lr, tokens=tokens,
                                batch_size=batch_size, seed=seed, device=device, out=str(out) if out else None,
                                log_every=log_every, checkpoint_every=checkpoint_every,
                                checkpoint_minutes=checkpoint_minutes, resume=resume, overwrite=overwrite,
                                save_unit_decoder=save_unit_decoder, variant_params=_parse_params(param or []),
                                read_workers=read_workers, autocast=autocast,
                                init_from=str(init_from) if init_from is not None else None)
    if jumprelu_variant is not None:
        typer.echo("note: --jumprelu-variant is now --jumprelu-sparsity", err=True)
        jumprelu_sparsity = jumprelu_sparsity or jumprelu_variant
    if jumprelu_sparsity is not None:
        if (arch or "") != "jumprelu" and config is None:
            raise ConfigError("--jumprelu-sparsity needs --arch jumprelu")
        opts["variant_params"]["sparsity_loss"] = jumprelu_sparsity  # routed to arch_params (jumprelu's)
    cli_names = {"hook": "hook_name", "param": "variant_params", "storage_option": "storage_options",
                 "jumprelu_variant": "variant_params", "jumprelu_sparsity": "variant_params"}
    if config is not None:
        given = {cli_names.get(n, n) for n in _explicit(ctx, [n for n in ctx.params if n not in ("config", "quiet")])}
        cfg = TrainConfig.from_toml(config, **{k2: v for k2, v in opts.items() if k2 in given})
    else:
        cfg = TrainConfig(**{k2: v for k2, v in opts.items()
                             if v is not None or k2 in ("hook_name", "arch", "d_sae", "init_from")})
    if cfg.legacy_notice:
        typer.echo(cfg.legacy_notice, err=True)
    if out is None and (config is None or "out" not in _toml_keys(config)):
        cfg.out = str(Path("runs") / (cfg.variant if cfg.variant != "none" else cfg.activation))
    cfg.validate()
    if nproc > 1:
        _launch_ranks(cfg, nproc)
        return
    run_dir = run(cfg, quiet=quiet, tracking=tracking)
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"saved {run_dir}")


def _launch_ranks(cfg: TrainConfig, nproc: int) -> None:
    """``--nproc N``: check what can be checked here, then start the ranks (:mod:`sae.train.launch`)."""
    from .errors import ConfigError
    from .store import ActivationStore
    from .train.launch import launch, without_option
    from .train.run import check_run_dir

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ConfigError("--nproc inside a torchrun job: give one or the other")
    if cfg.batch_size % nproc:
        raise ConfigError(f"--batch-size {cfg.batch_size} cannot be split into {nproc} equal parts: use a "
                          f"multiple of {nproc}")
    import torch

    from .model import resolve_device

    if resolve_device(cfg.device).type == "cuda" and torch.cuda.device_count() < nproc:
        raise ConfigError(f"--nproc {nproc} on CUDA needs one GPU per rank, and {torch.cuda.device_count()} are "
                          f"visible: use --nproc {torch.cuda.device_count()} or fewer")
    ActivationStore(cfg.store, storage_options=cfg.storage_options, cache=cfg.cache).default_hook(cfg.hook_name)
    check_run_dir(cfg)
    launch(nproc, without_option(sys.argv[1:], "--nproc"), Path(cfg.out))  # rank 0 prints "saved RUN"


def _log_table(config: Path | None) -> dict | None:
    """The ``[log]`` table of a ``--config`` TOML file (trackers), or None."""
    if config is None or not config.is_file():
        return None
    import tomllib

    try:
        table = tomllib.loads(config.read_text()).get("log")
    except tomllib.TOMLDecodeError:
        return None  # read_toml reports the syntax error with its line
    return table if isinstance(table, dict) else None


def _toml_keys(path: Path) -> set[str]:
    from .train.config import read_toml

    return set(read_toml(path)[0])


@app.command()
@_guard
def evaluate(
    run_dirs: Annotated[list[Path], typer.Argument(help="SAE run directories (from `sae train`/`sae sweep`).")],
    store: Annotated[str | None, typer.Option(help="Store (path or URL) the SAEs were trained on (model, dataset, "
                                                   "checks).")] = None,
    storage_option: StorageOptions = None,
    allow_other_store: Annotated[bool, typer.Option(help="Accept a --store whose content digest differs from "
                                                         "the one the SAE was trained on.")] = False,
    eval: Annotated[str, typer.Option("--eval", help="Comma-separated evaluations (default: all that apply; on a "
                                                       "synthetic store ground_truth,geometry).")] = "",
    tokens: Annotated[int, typer.Option(help="Held-out tokens for the core evaluation.")] = 16384,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    results_dir: Annotated[Path | None, typer.Option(help="Write DIR/<run>/eval_results/ instead of into the run "
                                                          "directories (for runs you cannot write to).")] = None,
    compat: Annotated[str, typer.Option(help="ours | saebench: core CE/KL/EV/mse by SAEBench's and SAELens' "
                                             "definitions (docs/evaluations.md).")] = "ours",
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="EVAL.SETTING=VALUE for an evaluation's "
                                                                        "Config, e.g. absorption.ranking=l1_probe "
                                                                        "(repeatable).")] = None,
    datasets: Annotated[str | None, typer.Option(help="sae-probes datasets: comma-separated tags or patterns "
                                                      "('*news*'), `cpu` (41 short-prompt ones) or `all` (113); "
                                                      "default: all on a GPU, cpu on a CPU (= -p "
                                                      "sae_probes.datasets=…).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the model-only work (core's clean pass, "
                                                              "probing, absorption and unlearning activations) "
                                                              "instead of reusing "
                                                              "$SAE_CACHE_DIR/artifacts (default ~/.cache/sae).")
    ] = False,
    log_to: Annotated[str | None, typer.Option(help=LOG_TO_HELP)] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Evaluate SAEs on held-out text; write RUN_DIR/eval_results/<eval>.json and print a comparison table."""
    from . import evaluate as ev
    from .errors import ConfigError
    from .tracking import TrackingConfig

    tracking = TrackingConfig.parse(log_to)
    evals = [e.strip() for e in eval.split(",") if e.strip()] or None  # None: all that apply to the store
    eval_params = _eval_params(param or [])
    if datasets is not None:
        if evals is not None and "sae_probes" not in evals:
            raise ConfigError("--datasets chooses sae-probes datasets: add sae_probes to --eval, or drop --datasets")
        eval_params.setdefault("sae_probes", {})["datasets"] = datasets
    results = ev.evaluate_runs(run_dirs, store=store, evals=evals, n_tokens=tokens, device=device, quiet=quiet,
                               results_dir=results_dir, storage_options=parse_storage_options(storage_option),
                               allow_other_store=allow_other_store, compat=compat,
                               eval_params=eval_params, use_cache=not no_cache)
    ev.print_comparison(results)
    if tracking is not None:
        from .evaluate.track import attach_results

        attach_results(list(run_dirs), sorted({r["eval_type_id"] for r in results}), tracking, results_dir)


def _eval_params(items: list[str]) -> dict[str, dict[str, str]]:
    """``-p EVAL.SETTING=VALUE`` items → ``{eval: {setting: value}}`` (one-line error for a bad item)."""
    from .errors import ConfigError

    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        name, dot, setting = key.partition(".")
        if not eq or not dot or not name or not setting:
            raise ConfigError(f"-p {item!r} must look like EVAL.SETTING=VALUE, e.g. absorption.ranking=l1_probe")
        out.setdefault(name.strip(), {})[setting.strip()] = value.strip()
    return out


@app.command("import")
@_guard
def import_cmd(
    src: Annotated[str, typer.Argument(help="Directory a library saved one SAE in, or saelens:RELEASE/SAE_ID (a "
                                            "pretrained SAE by its SAELens name, e.g. saelens:gemma-scope-2b-pt-res/"
                                            "layer_12/width_16k/average_l0_82; fetched into the HF cache).")],
    out: Annotated[Path, typer.Option(help="Run directory to write (our layout; SAELens loads it too).")],
    from_: Annotated[str | None, typer.Option("--from", help="saelens | sparsify | dictionary_learning | "
                                                            "gemma_scope | llama_scope (not needed for saelens:NAME)"
                                              )] = None,
    model: Annotated[str | None, typer.Option(help="Model the SAE belongs to (default: what the files record; "
                                                   "`embedded` = the embedded Gemma 3 270M).")] = None,
    hook_name: Annotated[str | None, typer.Option(help="blocks.<L>.hook_resid_post (default: from the files).")
    ] = None,
    store: Annotated[str | None, typer.Option(help="Warn unless this store (path or URL) fits the SAE.")] = None,
    storage_option: StorageOptions = None,
    activation_scale: Annotated[float | None, typer.Option(
        help="SAELens normalize_activations=expected_average_only_in: the input scale factor to fold.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory of ours (atomically).")] = False,
) -> None:
    """Convert a SAELens / sparsify / dictionary_learning SAE into a run directory `sae evaluate` reads."""
    from .interop.importer import import_sae

    res = import_sae(src, from_, out, model=model, hook_name=hook_name, store=store,
                     storage_options=parse_storage_options(storage_option), activation_scale=activation_scale,
                     overwrite=overwrite)
    for w in res.warnings:
        typer.secho(f"warning: {_one_line(w)}", fg="yellow", err=True)
    typer.echo(f"imported {src} ({from_ or 'release'}) → {res.run_dir}")


@app.command()
@_guard
def push(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories to publish (ours or imported).")],
    repo_id: Annotated[str | None, typer.Option(help="Hugging Face Hub repository USER/NAME to upload to "
                                                     "(created if absent; one commit).")] = None,
    to_dir: Annotated[Path | None, typer.Option(help="Write the same layout into this local folder instead.")] = None,
    sae_id: Annotated[list[str] | None, typer.Option(help="Folder name of each SAE in the repo, in order of the runs "
                                                          "(default: each run directory's name).")] = None,
    revision: Annotated[str, typer.Option(help="Branch to commit to (--repo-id).")] = "main",
    private: Annotated[bool, typer.Option(help="Create the repository private (--repo-id).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a --to-dir folder that sae push wrote (atomically).")
    ] = False,
) -> None:
    """Publish SAEs in the layout SAELens' SAE.from_pretrained reads: one folder per SAE (cfg.json +
    sae_weights.safetensors + eval_results), and a model card with the store, penalty and headline numbers."""
    from .errors import ConfigError
    from .interop import publish

    if (repo_id is None) == (to_dir is None):
        raise ConfigError("give exactly one of --repo-id USER/NAME (upload) or --to-dir DIR (local folder)")
    saes = publish.plan(list(run_dirs), list(sae_id) if sae_id else None)
    if to_dir is not None:
        typer.echo(f"wrote {publish.to_dir(saes, to_dir, overwrite)} ({len(saes)} SAEs)")
    else:
        assert repo_id is not None
        typer.echo(f"uploaded {len(saes)} SAEs to {publish.push(saes, repo_id, revision, private)}")


@app.command()
@_guard
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (or parents of run directories).")],
    out: Annotated[Path, typer.Option(help="Output folder (index.html + PNGs + metrics.csv); an existing one is "
                                           "replaced only when it is a report of ours.")] = Path("sae-report"),
    store: Annotated[str | None, typer.Option(help="Store (path or URL) for the feature browser (default: each "
                                                   "run's).")] = None,
    latents: Annotated[int, typer.Option(help="Latents shown in the feature browser.")] = 12,
) -> None:
    """Build a static HTML report: metric tables, frontier/probing/absorption plots, histograms,
    training curves and a feature browser of top-activating store contexts."""
    from .errors import ConfigError
    from .report import build_report

    if latents < 0:
        raise ConfigError(f"--latents {latents} must be >= 0")
    index = build_report(run_dirs, out, Path(store) if store else None, latents)
    typer.echo(f"wrote {index}")


@app.command()
@_guard
def sweep(
    ctx: typer.Context,
    store: StoreOption = _T["store"],
    storage_option: StorageOptions = None,
    cache: CacheOption = None,
    variants: Annotated[str, typer.Option(help="Comma-separated orthogonality penalties to train (none: the base "
                                               "architecture alone).")] = (
        "none,topk_pairs,adaptive,progressive,temporal,static_ortho,ortsae"),
    grid: Annotated[list[str] | None, typer.Option(help="VARIANT.PARAM=V1,V2 or OPTION=V1,V2 (repeatable).")] = None,
    hook: Annotated[str | None, typer.Option(help=_TH["hook_name"])] = None,
    arch: Annotated[str | None, typer.Option(help=_TH["arch"] + " (or --grid arch=...)")] = _T["arch"],
    config: Annotated[Path | None, typer.Option(help="TOML file of shared training options and [<variant>] tables. "
                                                     "Options given on the command line win over the file.")] = None,
    expansion: Annotated[int, typer.Option(help=_TH["expansion"])] = _T["expansion"],
    k: Annotated[int, typer.Option(help=_TH["k"])] = _T["k"],
    lr: Annotated[float, typer.Option(help=_TH["lr"])] = _T["lr"],
    tokens: Annotated[int, typer.Option(help=_TH["tokens"] + " (per SAE)")] = _T["tokens"],
    batch_size: Annotated[int, typer.Option(help=_TH["batch_size"])] = _T["batch_size"],
    seed: Annotated[int, typer.Option(help=_TH["seed"])] = _T["seed"],
    seeds: Annotated[str | None, typer.Option(help="Comma-separated initialisation seeds: every configuration is "
                                                   "trained once per seed, all in the same pass (same data order, "
                                                   "--seed).")] = None,
    device: Annotated[str, typer.Option(help=_TH["device"])] = _T["device"],
    out: Annotated[Path, typer.Option(help="Parent directory of the run directories.")] = Path("runs/sweep"),
    workers: Annotated[str | None, typer.Option(help="Spread the configurations over N local dask worker processes, "
                                                     "or auto: one per visible GPU, each pinned to its GPU.")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Address of an existing dask.distributed scheduler "
                                                       "(its workers must reach --out and the store).")] = None,
    group_size: Annotated[int | None, typer.Option(help="Configurations per dask task (one store pass each); "
                                                        "default: spread over the workers, capped by memory.")] = None,
    checkpoint_minutes: Annotated[float, typer.Option(help=_TH["checkpoint_minutes"])] = _T["checkpoint_minutes"],
    resume: Annotated[bool, typer.Option(help=_TH["resume"])] = _T["resume"],
    overwrite: Annotated[bool, typer.Option(help=_TH["overwrite"])] = _T["overwrite"],
    read_workers: Annotated[int, typer.Option(help=_TH["read_workers"])] = _T["read_workers"],
    autocast: Annotated[str, typer.Option(help=_TH["autocast"])] = _T["autocast"],
    log_to: Annotated[str | None, typer.Option(help=LOG_TO_HELP + " One tracker run per configuration, "
                                                   "grouped by the sweep (W&B group, MLflow parent run).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train many configurations from ONE pass over the store, then print a summary table."""
    from .cluster import resolve_workers
    from .errors import ConfigError
    from .outputs import check_output_location
    from .train.config import TrainConfig, read_toml
    from .train.sweep import expand, parse_grid, print_summary, run_sweep, summarize

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ConfigError("sae sweep does not run under torchrun: spread a sweep with --workers/--scheduler (dask), "
                          "or train one SAE data-parallel with `sae train --nproc N`")
    if workers in ("0", 0):
        workers = None  # the old default: no dask
    resolve_workers(workers)
    if workers is not None and scheduler:
        raise ConfigError("--workers and --scheduler are exclusive: start a local cluster or use an existing one")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", str(out)):
        raise ConfigError(f"--out {out}: run directories are written to a filesystem path (a shared mount that "
                          "every worker reaches, for a distributed sweep), not a URL; publish runs to a bucket "
                          "afterwards with your usual copy tool")
    check_output_location(out, "--out")
    opts: dict[str, Any] = dict(store=store, storage_options=parse_storage_options(storage_option), cache=cache,
                                hook_name=hook, arch=arch, expansion=expansion, k=k, lr=lr,
                                tokens=tokens, batch_size=batch_size, seed=seed, device=device,
                                checkpoint_minutes=checkpoint_minutes, resume=resume, overwrite=overwrite,
                                read_workers=read_workers, autocast=autocast)
    tables: dict[str, dict] = {}
    if config is not None:
        names = {"hook": "hook_name", "storage_option": "storage_options"}
        given = {names.get(n, n) for n in _explicit(ctx, list(ctx.params))}
        base = TrainConfig.from_toml(config, **{k2: v for k2, v in opts.items() if k2 in given})
        tables = read_toml(config)[1]
    else:
        base = TrainConfig(**opts)
    grids = list(grid or [])
    if seeds is not None:
        values = [x.strip() for x in seeds.split(",") if x.strip()]
        if not values or not all(x.isdigit() for x in values) or len(set(values)) != len(values):
            raise ConfigError(f"--seeds {seeds!r}: give distinct non-negative integers, e.g. 0,1,2")
        grids.append(f"init_seed={','.join(values)}")
    cfgs = expand(base, [v.strip() for v in variants.split(",") if v.strip()], parse_grid(grids), out, tables)
    for note in dict.fromkeys(c.legacy_notice for c in cfgs if c.legacy_notice):
        typer.echo(note.replace("--variant", "--variants entry"), err=True)
    from .tracking import TrackingConfig

    tracking = TrackingConfig.parse(log_to, _log_table(config))
    if tracking is not None and tracking.group is None:
        tracking.group = out.name
    run_dirs = run_sweep(cfgs, workers=workers, scheduler=scheduler, quiet=quiet, group_size=group_size,
                         tracking=tracking)
    out.mkdir(parents=True, exist_ok=True)
    print_summary(summarize(run_dirs), out)


def main() -> None:
    """Console entry point (``sae``): usage errors become one ``error:`` line too."""
    try:
        rv = app(standalone_mode=False)
    except typer.Abort:
        typer.secho("error: interrupted", fg="red", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except _ClickException as e:
        if _debug():
            raise
        hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
        typer.secho(f"error: {_one_line(e.format_message())}{hint}", fg="red", err=True)
        sys.exit(e.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)
