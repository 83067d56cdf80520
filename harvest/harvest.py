"""The harvest loop: corpus → packed sequences → one truncated forward → store chunks."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..cluster import check_scheduler, dask_client, resolve_workers
from ..errors import ConfigError
from ..model import LoadedModel, check_device, check_layers, hook_name_for, load_model
from ..outputs import (
    check_output_location,
    check_writable_dir,
    is_empty_dir,
    is_sae_store,
    is_store_attrs,
)
from ..progress import progress_bar
from ..store import CodecSpec, StoreError, StoreWriter
from ..store.format import FORMAT_VERSION
from ..store.lease import building, check_not_leased
from ..store.location import READ_ONLY_SCHEMES, StoreLocation, as_location, scheme_of
from .corpus import iter_documents
from .distributed import ChunkJob, run_chunks
from .forward import forward_chunk
from .tokens import pack_sequences

# Options that decide what a store's rows mean. ``None`` in a :class:`HarvestConfig` means "not
# given": a new harvest takes the default below, ``--extend``/``--into``/``--resume`` take the store's
# value; a value that *is* given must equal the store's (:func:`check_identity`), never silently replaced.
IDENTITY_DEFAULTS: dict[str, object] = {
    "dataset": "embedded", "split": "train", "text_column": "text", "seed": 0, "context_size": 128,
    "chunk_tokens": 16_384, "dtype": "bfloat16", "codec": "zstd",
}
DEFAULT_TOKENS = 500_000
"""Tokens a new harvest writes when ``--tokens`` is not given."""


@dataclass
class HarvestConfig:
    """Settings of one harvest (saved in the store's attributes).

    The identity options (:data:`IDENTITY_DEFAULTS` and ``tokens``) default to ``None`` = not given:
    :meth:`resolved` fills the defaults for a new store; growing or resuming a store fills them from
    the store, and refuses a given value that differs from the store's.
    """

    layers: list[int] = field(default_factory=lambda: [6])
    """Blocks whose resid_post to store."""
    model: str | None = None
    """HF model id or directory; None = the embedded Gemma 3 270M (growing a store: the store's model)."""
    dataset: str | None = None
    """Corpus: embedded[:source] | a .txt/.jsonl/.parquet file or folder | hf:NAME[:CONFIG]."""
    split: str | None = None
    """Document split: train | test | all."""
    text_column: str | None = None
    """Text field of jsonl/parquet/HF rows."""
    tokens: int | None = None
    """Tokens to harvest, rounded up to whole sequences; with ``--extend`` the new total."""
    context_size: int | None = None
    """Tokens per sequence, BOS included."""
    batch_size: int = 32
    """Sequences per forward pass."""
    dtype: str | None = None
    """Storage dtype of the activations: bfloat16 | float16 | float32."""
    codec: str | None = None
    """Compressor or quantiser: zstd | none | bitround:K | int8 | fp8 (docs/store-format.md)."""
    chunk_tokens: int | None = None
    """Rows per Zarr chunk, a multiple of the context size."""
    device: str = "auto"
    """auto | cpu | cuda (auto: CUDA when available)."""
    seed: int | None = None
    """Document-order seed."""
    out: str = "acts.zarr"
    """Output store: a path or a URL (s3://, gs://, file://...)."""
    resume: bool = False
    """Continue an interrupted harvest (or an interrupted --into / --extend)."""
    overwrite: bool = False
    """Replace an existing store of ours (built beside it, swapped in atomically)."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for a remote ``out`` (never written into the store)."""
    extend: bool = False
    """Append sequences to the complete store at ``out`` until it holds ``tokens`` (``--extend``)."""
    into: str | None = None
    """Add ``layers`` to this existing complete store, over its own token ids (``--into``)."""
    workers: int | str | None = None
    """Dask worker processes (a LocalCluster on 127.0.0.1), ``auto`` = one per visible GPU; None = in-process."""
    scheduler: str | None = None
    """Address of an existing dask scheduler (``tcp://host:8786``); workers there write the chunks."""
    background_writes: bool | None = None
    """Write chunk i on a background thread while chunk i+1 runs through the model.
    None = on for accelerators, off on CPU (where it slows the forward; see ``harvest``)."""

    def given(self) -> dict[str, object]:
        """The identity options that were given (not ``None``)."""
        return {k: getattr(self, k) for k in IDENTITY_DEFAULTS if getattr(self, k) is not None}

    def resolved(self, defaults: dict[str, object] | None = None) -> HarvestConfig:
        """A copy with every unset identity option filled from ``defaults`` (a store's values) or
        :data:`IDENTITY_DEFAULTS`, and ``tokens`` from ``defaults['tokens']`` or 500 000."""
        fill = {**IDENTITY_DEFAULTS, "tokens": DEFAULT_TOKENS, **(defaults or {})}
        return replace(self, **{k: fill[k] for k in (*IDENTITY_DEFAULTS, "tokens") if getattr(self, k) is None})

    def validate(self) -> None:
        """Check every option's type and range (no side effects). Raises ``ConfigError`` naming the
        option and its allowed values. Unset identity options are checked once resolved."""
        r = self.resolved()
        _positive("--tokens", r.tokens)
        _positive("--batch-size", self.batch_size)
        if not isinstance(r.context_size, int) or isinstance(r.context_size, bool) or r.context_size < 2:
            raise ConfigError(f"--context-size {r.context_size!r} must be an integer >= 2 (BOS + one token)")
        _positive("--chunk-tokens", r.chunk_tokens)
        if (self.context_size is not None or self.chunk_tokens is not None) and r.chunk_tokens % r.context_size \
                and not (self.extend or self.into is not None or self.resume):
            fit = max(1, r.chunk_tokens // r.context_size) * r.context_size
            raise ConfigError(f"--chunk-tokens {r.chunk_tokens} must be a multiple of --context-size "
                              f"{r.context_size} (e.g. {fit})")
        if not isinstance(r.seed, int) or isinstance(r.seed, bool) or r.seed < 0:
            raise ConfigError(f"--seed {r.seed!r} must be an integer >= 0")
        if not self.layers or any(not isinstance(L, int) or L < 0 for L in self.layers):
            raise ConfigError(f"--layer {self.layers!r}: give one or more layer indices >= 0")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite are exclusive: pick one")
        try:
            CodecSpec.parse(str(r.codec), str(r.dtype))
        except ValueError as e:
            raise ConfigError(f"--codec/--dtype: {e}") from e
        if r.split not in ("train", "test", "all"):
            raise ConfigError(f"--split {r.split!r}: choose train, test or all")
        check_device(self.device)
        if self.into is not None and (self.resume or self.overwrite):
            raise ConfigError("--into adds layers to an existing store: it takes no --resume/--overwrite "
                              "(rerun the same --into to continue an interrupted one)")
        if self.extend and (self.resume or self.overwrite or self.into is not None):
            raise ConfigError("--extend grows the store at --out: it takes no --resume/--overwrite/--into "
                              "(rerun the same --extend to continue an interrupted one)")
        if self.extend and self.tokens is None:
            raise ConfigError("--extend needs --tokens: the store's new total number of tokens")
        if self.workers is not None and self.scheduler is not None:
            raise ConfigError("--workers and --scheduler are exclusive: a --scheduler cluster has its own workers")
        resolve_workers(self.workers)
        target = self.into if self.into is not None else self.out
        if scheme_of(str(target)) in READ_ONLY_SCHEMES:
            option = "--into" if self.into is not None else "--out"
            raise ConfigError(f"{option} {target}: {scheme_of(str(target))}:// stores are read-only; write to a "
                              "path, s3:// or gs:// (copy the store first to grow it)")
        if self.into is None and not self.extend and ("://" not in str(self.out) or str(self.out).startswith("file://")):
            check_output_location(str(self.out).removeprefix("file://"), "--out")


def store_identity(attrs: dict) -> dict[str, object]:
    """A store's values of the identity options (from its attributes and recorded harvest config)."""
    rec = attrs.get("harvest_config") or {}
    out: dict[str, object] = {k: attrs.get(k, rec.get(k)) for k in ("dataset", "split", "seed", "context_size",
                                                                     "chunk_tokens", "dtype", "codec")}
    out["text_column"] = attrs.get("text_column") or rec.get("text_column") or "text"
    return {k: v for k, v in out.items() if v is not None}


def check_identity(cfg: HarvestConfig, attrs: dict, option: str) -> HarvestConfig:
    """Compare every identity option ``cfg`` gives with the store's (``attrs``) and return ``cfg``
    with the unset ones filled from the store. Raises ``ConfigError`` naming the first key that
    differs, the store's value and the given one. ``codec`` is compared in its canonical spelling."""
    have = store_identity(attrs)
    for k, v in cfg.given().items():
        want = have.get(k)
        if k == "codec" and want is not None:
            try:
                v = str(CodecSpec.parse(str(v), str(cfg.dtype or have.get("dtype"))))
            except ValueError as e:
                raise ConfigError(f"--codec/--dtype: {e}") from e
        if want is not None and v != want:
            flag = "--" + k.replace("_", "-")
            raise ConfigError(f"{option} {cfg.into or cfg.out}: {flag} {v!r} differs from the store's {k} {want!r}; "
                              f"omit {flag} (the store's value is used) or harvest a new store")
    return replace(cfg, **{k: have[k] for k in have if getattr(cfg, k) is None})


def _positive(option: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option} {value!r} must be a positive integer")


def _resume_plan(cfg: HarvestConfig, loc: StoreLocation) -> tuple[str, HarvestConfig, str | None]:
    """What ``--resume`` of an existing store of ours finishes: ``("into", cfg)`` for an interrupted
    ``--into``, ``("extend", cfg)`` for an interrupted ``--extend``, else ``("harvest", cfg,
    model_weights)`` with the unset identity options filled from the store (given ones checked).

    Raises:
        StoreError: a format-1 store. ConfigError: an option that differs from the store's.
    """
    a = _store_attrs(loc)
    if a.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"cannot resume {cfg.out}: it is a format-{a.get('format_version')} store; "
                         "`sae store convert` it or re-harvest with --overwrite")
    if a.get("pending_hooks"):  # an interrupted --into: --resume finishes it
        layers = sorted(int(h.split(".")[1]) for h in a["pending_hooks"])
        return "into", replace(cfg, resume=False, into=cfg.out, layers=layers), None
    if a.get("pending_growth"):  # an interrupted --extend: --resume finishes it
        target = int(a["n_tokens_target"])
        if cfg.tokens is not None and -(-cfg.tokens // int(a["context_size"])) * int(a["context_size"]) != target:
            raise ConfigError(f"--resume {cfg.out}: an interrupted --extend to {target} tokens is pending; "
                              f"omit --tokens or pass --tokens {target}")
        return "extend", replace(cfg, resume=False, extend=True, tokens=target), None
    cfg = check_identity(cfg, a, "--resume")
    if cfg.tokens is None:
        cfg = replace(cfg, tokens=int(a.get("n_tokens_target") or 0) or None)
    model_weights = None
    if cfg.model is None:
        cfg, model_weights = replace(cfg, model=a.get("model_id")), a.get("model_weights")
    return "harvest", cfg, model_weights


def _open_corpus(cfg: HarvestConfig) -> Iterator:
    """The corpus's documents, after checking (before any model loads) that it yields a non-empty one.

    Raises:
        ConfigError: an unreadable dataset, or one without documents in ``cfg.split``.
    """
    docs_iter = iter_documents(cfg.dataset, cfg.split, cfg.seed, cfg.text_column)
    try:
        first_doc = next((d for d in docs_iter if d.text), None)  # empty texts add no tokens
    except (KeyError, OSError, ValueError) as e:
        raise ConfigError(f"--dataset {cfg.dataset!r}: cannot read it ({e.__class__.__name__}: {e})") from e
    if first_doc is None:
        raise ConfigError(f"--dataset {cfg.dataset!r} has no documents in split {cfg.split!r}: "
                          "pick another dataset or --split")
    return itertools.chain([first_doc], docs_iter)


def harvest(cfg: HarvestConfig, loaded: LoadedModel | None = None, quiet: bool = False) -> str:
    """Run the harvest described by ``cfg`` and return the store path or URL.

    Every option is validated, the output location and the corpus are checked before the model
    loads; the store is created only once the corpus has yielded a first full sequence. The
    complete token array is written first (tokenisation only), then activation chunks are
    computed from the store's own token ids and committed one by one (format 2, see
    :mod:`sae.store.writer`). ``cfg.resume`` computes only the missing chunks: the result is
    bit-identical to an uninterrupted harvest. ``cfg.overwrite`` replaces only a local store of
    ours, built beside it and swapped in at the end: a failed or killed overwrite leaves the old
    store intact. A failed new harvest with no committed chunk removes what it created.

    Raises:
        ConfigError: bad option, layer, codec or dataset. StoreError: existing output, resume
        mismatch, not a store of ours, remote overwrite. LeaseHeldError: another harvest is
        writing that store. NonFiniteError: NaN/inf activations (chunk not committed).
    """
    cfg.validate()
    if cfg.into is not None:
        return _harvest_into(cfg, loaded, quiet)
    if cfg.extend:
        return _harvest_extend(cfg, loaded, quiet)
    loc = as_location(cfg.out, cfg.storage_options)
    if loc.local:
        out = loc.path
        exists = out.exists() and not is_empty_dir(out)
        ours = exists and is_sae_store(out)
    else:
        ours = exists = loc.exists("zarr.json")
        if exists and not _remote_is_store(loc):
            ours = False
    model_weights = None
    if exists:
        if (cfg.resume or cfg.overwrite) and not ours:
            what = "resume" if cfg.resume else "delete"
            raise StoreError(f"{cfg.out} exists and is not an sae store; refusing to {what} it (pick another --out)")
        if not (cfg.resume or cfg.overwrite):
            raise StoreError(f"{cfg.out} already exists: pass --resume to continue it or --overwrite to replace it")
        if cfg.overwrite and not loc.local:
            raise StoreError(f"--overwrite of a remote store is not supported (object stores cannot swap a "
                             f"store atomically): harvest to a new URL, or delete {cfg.out} with your storage tools")
        check_not_leased(loc, "--overwrite" if cfg.overwrite else "--resume")
        if cfg.resume and loc.local:
            check_writable_dir(loc.path, "--resume")
        if cfg.resume:
            how, cfg, model_weights = _resume_plan(cfg, loc)
            if how == "into":
                return _harvest_into(cfg, loaded, quiet)
            if how == "extend":
                return _harvest_extend(cfg, loaded, quiet)
    cfg = cfg.resolved()
    cfg.validate()
    docs = _open_corpus(cfg)
    check_scheduler(cfg.scheduler)
    lm = loaded or load_model(cfg.model, cfg.device, model_weights=model_weights)
    try:
        check_layers(cfg.layers, lm.n_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    layers = sorted(set(cfg.layers))
    hooks = [hook_name_for(L) for L in layers]
    seqs = pack_sequences((d.text for d in docs), lm.tokenizer,
                          cfg.context_size, lm.bos_token_id)
    first_seq = next(seqs, None)
    if first_seq is None:
        raise ConfigError(f"--dataset {cfg.dataset!r} (split {cfg.split!r}) is too small: it does not fill one "
                          f"sequence of --context-size {cfg.context_size} tokens")
    seqs = itertools.chain([first_seq], seqs)
    record = {k: v for k, v in asdict(cfg).items() if k != "storage_options"}  # never store credentials
    meta = {
        "model_id": lm.model_id, **lm.identity,
        "tokenizer": getattr(lm.tokenizer, "name_or_path", ""), "vocab_size": _vocab_size(lm),
        "layers": layers, "hook_point": "resid_post", "dataset": cfg.dataset, "split": cfg.split,
        "text_column": cfg.text_column, "seed": cfg.seed, "special_token_ids": lm.special_token_ids,
        "bos_token_id": lm.bos_token_id, "harvest_config": record,
    }
    codec = CodecSpec.parse(cfg.codec, cfg.dtype)
    args = (meta, hooks, lm.d_model, cfg.context_size, cfg.tokens, codec, cfg.chunk_tokens)
    writers: list[StoreWriter] = []

    def write(target: object, mode: str) -> None:
        writers.append(StoreWriter(target, *args, mode=mode))
        try:
            _run_harvest(cfg, writers[-1], lm, layers, seqs, quiet)
        finally:
            writers[-1].close()  # releases the lease, also on failure

    if cfg.resume and exists:
        write(loc, "resume")
    else:  # new or replaced: a local store is built beside and swapped in at the end, the old one's lease held
        with building(loc, overwrite=cfg.overwrite,
                      keep_partial=lambda: bool(writers) and writers[-1].n_written > 0) as target:
            write(target, "create")
    if not quiet:
        print(f"→ {cfg.out}")
    return cfg.out


def _store_attrs(loc: StoreLocation) -> dict:
    """The group attributes of the store at ``loc`` (fresh, not cached)."""
    try:
        attrs = loc.read_json("zarr.json", fresh=True).get("attributes")
    except (OSError, ValueError, AttributeError) as e:
        raise StoreError(f"{loc}: cannot read its zarr.json ({e.__class__.__name__}: {e})") from None
    if not is_store_attrs(attrs):
        raise StoreError(f"{loc} is not an sae store: pass a store written by `sae harvest`")
    return attrs


def _grow_model(cfg: HarvestConfig, a: dict, loaded: LoadedModel | None, option: str, where: str) -> LoadedModel:
    """The model that grows the store: ``--model`` when given (its weights must be the store's), else
    the store's own. Raises ``ConfigError`` when the weights' fingerprint differs from the store's."""
    weights = None if cfg.model is not None else a.get("model_weights")
    check_scheduler(cfg.scheduler)
    lm = loaded or load_model(cfg.model or a.get("model_id"), cfg.device, model_weights=weights)
    if a.get("model_fingerprint") and lm.fingerprint != a["model_fingerprint"]:
        given = f"--model {cfg.model}" if cfg.model is not None else f"model {lm.model_id}"
        raise ConfigError(f"{option} {where}: {given} has weights (fingerprint {lm.fingerprint}) other than the "
                          f"store's ({a['model_fingerprint']}, model {a.get('model_id')}); omit --model to use the "
                          "store's model, or harvest a new store")
    return lm


def _harvest_into(cfg: HarvestConfig, loaded: LoadedModel | None, quiet: bool) -> str:
    """``--into``: add ``cfg.layers`` to a complete store, running the model over the store's own token
    ids (rows align 1:1 with its hooks). The model defaults to the store's; a given option that
    differs from the store's (model weights, dataset, context size, codec...) is refused before
    anything is written. Rerunning an interrupted ``--into`` (or ``--resume`` on it) finishes it."""
    from ..store import ActivationStore

    loc = as_location(cfg.into, cfg.storage_options)
    check_not_leased(loc, "--into")
    if loc.local:
        check_writable_dir(loc.path, "--into")
    store = ActivationStore(cfg.into, storage_options=cfg.storage_options)
    a = store.attrs
    if a.get("status") != "complete":
        raise StoreError(f"--into {cfg.into}: the store is not complete; finish it (`sae harvest --resume`) first")
    cfg = check_identity(cfg, a, "--into")
    if cfg.tokens is not None and cfg.tokens != store.n_tokens:
        raise ConfigError(f"--into {cfg.into}: --tokens {cfg.tokens} differs from the store's {store.n_tokens} tokens; "
                          "--into runs over the store's own tokens (omit --tokens; grow tokens with --extend)")
    hooks = [hook_name_for(L) for L in sorted(set(cfg.layers))]
    have = [h for h in hooks if h in store.hook_names]
    if have:
        raise ConfigError(f"--into {cfg.into} already has {', '.join(have)}: --into adds new layers only")
    pending = list(a.get("pending_hooks") or [])
    if pending and sorted(pending) != sorted(hooks):
        raise StoreError(f"--into {cfg.into}: an interrupted --into of {', '.join(pending)} is pending; rerun it with "
                         "those layers (or --resume) to finish it first")
    lm = _grow_model(cfg, a, loaded, "--into", cfg.into)
    try:
        check_layers(cfg.layers, lm.n_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if lm.d_model != store.d_model:
        raise ConfigError(f"--into {cfg.into}: the model has d_model {lm.d_model}, the store {store.d_model}")
    writer = StoreWriter.add_hooks(cfg.into, hooks, storage_options=cfg.storage_options)
    run_cfg = replace(cfg.resolved(), model=cfg.model or (None if lm.model_weights else a.get("model_id")))
    try:
        _run_harvest(run_cfg, writer, lm, sorted(set(cfg.layers)), iter(()), quiet)
    finally:
        writer.close()
    if not quiet:
        print(f"→ {cfg.into} (+ {', '.join(hooks)})")
    return cfg.into


def _harvest_extend(cfg: HarvestConfig, loaded: LoadedModel | None, quiet: bool) -> str:
    """``--extend``: append sequences that continue the store's own deterministic corpus stream
    (its dataset, split, seed, text column, context size) until it holds ``cfg.tokens``; rows already
    there stay byte-identical. Everything is checked (store, layers, given options against the
    store's, model fingerprint, the corpus still yielding the stored prefix, enough corpus left)
    before anything is written. A killed ``--extend``, rerun (or ``--resume`` d), finishes to the same
    arrays, commits, digest and digest history as an uninterrupted one."""
    from ..store import ActivationStore

    loc = as_location(cfg.out, cfg.storage_options)
    check_not_leased(loc, "--extend")
    if loc.local:
        check_writable_dir(loc.path, "--extend")
    store = ActivationStore(cfg.out, storage_options=cfg.storage_options, require_complete=False)
    a = store.attrs
    pending = a.get("pending_growth") if (a.get("pending_growth") or {}).get("reason") == "extend" else None
    if a.get("status") != "complete" and pending is None:
        raise StoreError(f"--extend {cfg.out}: the store is not complete; finish it with --resume first")
    cfg = check_identity(cfg, a, "--extend")
    if sorted(set(cfg.layers)) != sorted(a.get("layers") or []):
        raise ConfigError(f"--extend keeps the store's layers {a.get('layers')}: pass exactly those --layer values "
                          "(add layers with --into)")
    ctx = store.context_size
    n1 = int(pending["n_tokens"]) if pending else store.n_tokens
    n2 = -(-int(cfg.tokens) // ctx) * ctx
    if pending and n2 != int(a["n_tokens_target"]):
        raise ConfigError(f"--extend {cfg.out}: an interrupted --extend to {a['n_tokens_target']} tokens is pending; "
                          f"rerun it with --tokens {a['n_tokens_target']} (or --resume) to finish it first")
    if n2 <= n1:
        raise ConfigError(f"--tokens {cfg.tokens}: {cfg.out} already holds {n1} tokens; --extend needs a larger "
                          "--tokens (the new total)")
    lm = _grow_model(cfg, a, loaded, "--extend", cfg.out)
    docs = iter_documents(a["dataset"], a["split"], int(a.get("seed", 0)), a.get("text_column") or "text")
    seqs = pack_sequences((d.text for d in docs), lm.tokenizer, ctx, lm.bos_token_id)
    prefix = list(itertools.islice(seqs, n1 // ctx))
    if len(prefix) * ctx != n1 or not np.array_equal(np.stack(prefix).reshape(-1), store.tokens[:n1]):
        raise ConfigError(f"--extend {cfg.out}: dataset {a['dataset']!r} no longer yields the stored tokens (the "
                          "corpus or tokenizer changed); harvest a new store instead")
    more = list(itertools.islice(seqs, (n2 - n1) // ctx))
    if len(more) * ctx < n2 - n1:
        have = n1 + len(more) * ctx
        raise ConfigError(f"--extend {cfg.out}: the corpus runs out at {have} tokens ({have - n1} more than stored); "
                          f"ask for --tokens {have} or fewer" if more else
                          f"--extend {cfg.out}: the corpus has no tokens beyond the {n1} already stored")
    writer = StoreWriter.extend(cfg.out, np.stack(more).reshape(-1), storage_options=cfg.storage_options)
    run_cfg = replace(cfg.resolved(), model=cfg.model or (None if lm.model_weights else a.get("model_id")))
    try:
        _run_harvest(run_cfg, writer, lm, sorted(set(cfg.layers)), iter(()), quiet)
    finally:
        writer.close()
    return cfg.out


def _remote_is_store(loc: StoreLocation) -> bool:
    try:
        return is_store_attrs(loc.read_json("zarr.json", fresh=True).get("attributes"))
    except (OSError, ValueError, AttributeError):
        return False


def _vocab_size(lm: LoadedModel) -> int | None:
    v = getattr(getattr(lm.model, "config", None), "vocab_size", None)
    return int(v) if v else None


def _run_harvest(cfg: HarvestConfig, writer: StoreWriter, lm: LoadedModel, layers: list[int], seqs, quiet: bool
                 ) -> None:
    """Tokens first (unless already committed), then every missing chunk: forward, encode, write,
    commit; then finalize (statistics reduced in chunk order, content digest, status)."""
    if writer.group.attrs.get("status") == "complete" and not writer.growing:
        return
    ctx = cfg.context_size
    if writer.tokens_committed():
        tokens = writer.read_tokens()
    else:
        chunk = list(itertools.islice(seqs, writer.n_target // ctx))
        if not chunk:
            raise ConfigError(f"--dataset {cfg.dataset!r} yielded no complete sequence: nothing to store")
        tokens = np.stack(chunk).reshape(-1)
        writer.write_tokens(tokens)
    special = np.asarray(lm.special_token_ids, dtype=np.int64)
    todo = writer.missing_chunks()
    total = len(tokens)
    done = total - sum(min(cfg.chunk_tokens, total - i * cfg.chunk_tokens) for i in todo)
    t0, done0 = time.perf_counter(), done
    # On an accelerator, chunk i is encoded, compressed and written by one background thread while
    # chunk i+1 runs through the model (numcodecs/zarr release the GIL). On CPU the forward already
    # keeps every core busy and a concurrent writer only fights torch's OpenMP threads (measured:
    # harvest/bare-forward 0.87 with the thread vs 0.97 without, benchmarks/harvest.py), so writes
    # run inline there. At most one write is in flight; a chunk counts once its commit object exists.
    local_only = set(getattr(writer, "prefix", {}))  # --extend's boundary chunk keeps old bytes: computed here
    if [i for i in todo if i not in local_only] and (cfg.workers is not None or cfg.scheduler is not None):
        job = ChunkJob(url=writer.path, model_id=cfg.model, model_weights=lm.model_weights,
                       fingerprint=lm.fingerprint, layers=tuple(layers), batch_size=cfg.batch_size,
                       context_size=ctx, device=cfg.device, special_token_ids=tuple(int(t) for t in special),
                       storage_options=dict(cfg.storage_options))
        with progress_bar(quiet) as bar, dask_client(resolve_workers(cfg.workers), cfg.scheduler) as client:
            task = bar.add_task("harvest", total=total, completed=done)
            done += run_chunks(client, job, [i for i in todo if i not in local_only], bar, task)
        todo = [i for i in todo if i in local_only]
    background = cfg.background_writes if cfg.background_writes is not None else lm.device.type != "cpu"
    with progress_bar(quiet or not todo) as bar, _Writer(1 if background else 0) as pool:
        task = bar.add_task("harvest", total=total, completed=done)
        pending: Future | None = None
        pending_rows = 0
        for i in todo:
            flat = tokens[i * cfg.chunk_tokens:(i + 1) * cfg.chunk_tokens]
            acts = forward_chunk(lm, flat.reshape(-1, ctx), layers, cfg.batch_size)
            if pending is not None:
                pending.result()  # re-raises a failed write
                done += pending_rows
                bar.update(task, completed=done)
            pending = pool.submit(writer.write_chunk, i, {hook_name_for(L): acts[L] for L in layers},
                                  ~np.isin(flat, special))
            pending_rows = len(flat)
        if pending is not None:
            pending.result()
            done += pending_rows
            bar.update(task, completed=done)
    writer.finalize()
    if not quiet:
        dt = time.perf_counter() - t0
        short = " (the corpus ran out)" if total < writer.n_target else ""
        print(f"harvested {done - done0} tokens{short} in {dt:.1f}s "
              f"({(done - done0) / max(dt, 1e-9):.0f} forward+write tokens/s, model load excluded)")


class _Writer:
    """``submit(fn, *args)`` → Future: on one background thread, or inline when ``workers == 0``."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-write") if workers else None

    def submit(self, fn, *args) -> Future:
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)  # an interrupted harvest still commits its in-flight chunk
