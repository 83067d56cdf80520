"""The harvest loop: corpus → packed sequences → one truncated forward → store chunks."""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..errors import ConfigError
from ..model import LoadedModel, check_device, check_layers, hook_name_for, load_model
from ..outputs import build_output, check_output_location, is_empty_dir, is_sae_store, is_store_attrs
from ..progress import progress_bar
from ..store import CodecSpec, StoreError, StoreWriter
from ..store.location import StoreLocation, as_location
from .corpus import iter_documents
from .distributed import ChunkJob, dask_client, resolve_workers, run_chunks
from .forward import forward_chunk
from .tokens import pack_sequences


@dataclass
class HarvestConfig:
    """Settings of one harvest (saved in the store's attributes)."""

    layers: list[int] = field(default_factory=lambda: [6])
    model: str | None = None
    """HF id or local directory; None = the embedded Gemma 3 270M."""
    dataset: str = "embedded"
    split: str = "train"
    text_column: str = "text"
    tokens: int = 500_000
    context_size: int = 128
    batch_size: int = 32
    """Sequences per forward pass."""
    dtype: str = "bfloat16"
    """Storage dtype of the activations."""
    codec: str = "zstd"
    chunk_tokens: int = 16_384
    device: str = "auto"
    seed: int = 0
    out: str = "acts.zarr"
    resume: bool = False
    overwrite: bool = False
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

    def validate(self) -> None:
        """Check every option's type and range (no side effects). Raises ``ConfigError`` naming the
        option and its allowed values."""
        _positive("--tokens", self.tokens)
        _positive("--batch-size", self.batch_size)
        if not isinstance(self.context_size, int) or self.context_size < 2:
            raise ConfigError(f"--context-size {self.context_size!r} must be an integer >= 2 (BOS + one token)")
        _positive("--chunk-tokens", self.chunk_tokens)
        if self.chunk_tokens % self.context_size:
            fit = max(1, self.chunk_tokens // self.context_size) * self.context_size
            raise ConfigError(f"--chunk-tokens {self.chunk_tokens} must be a multiple of --context-size "
                              f"{self.context_size} (e.g. {fit})")
        if not self.layers or any(not isinstance(L, int) or L < 0 for L in self.layers):
            raise ConfigError(f"--layer {self.layers!r}: give one or more layer indices >= 0")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite are exclusive: pick one")
        try:
            CodecSpec.parse(self.codec, self.dtype)
        except ValueError as e:
            raise ConfigError(f"--codec/--dtype: {e}") from e
        if self.split not in ("train", "test", "all"):
            raise ConfigError(f"--split {self.split!r}: choose train, test or all")
        check_device(self.device)
        if self.into is not None and (self.resume or self.overwrite):
            raise ConfigError("--into adds layers to an existing store: it takes no --resume/--overwrite "
                              "(rerun the same --into to continue an interrupted one)")
        if self.extend and (self.resume or self.overwrite or self.into is not None):
            raise ConfigError("--extend grows the store at --out: it takes no --resume/--overwrite/--into "
                              "(rerun the same --extend to continue an interrupted one)")
        if self.workers is not None and self.scheduler is not None:
            raise ConfigError("--workers and --scheduler are exclusive: a --scheduler cluster has its own workers")
        resolve_workers(self.workers)
        if self.into is None and not self.extend and ("://" not in str(self.out) or str(self.out).startswith("file://")):
            check_output_location(str(self.out).removeprefix("file://"), "--out")


def _positive(option: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option} {value!r} must be a positive integer")


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
    if loc.read_only:
        raise ConfigError(f"--out {cfg.out}: {loc.scheme}:// is read-only; harvest to a path, s3:// or gs://")
    if loc.local:
        out = loc.path
        exists = out.exists() and not is_empty_dir(out)
        ours = exists and is_sae_store(out)
    else:
        ours = exists = loc.exists("zarr.json")
        if exists and not _remote_is_store(loc):
            ours = False
    if exists:
        if (cfg.resume or cfg.overwrite) and not ours:
            what = "resume" if cfg.resume else "delete"
            raise StoreError(f"{cfg.out} exists and is not an sae store; refusing to {what} it (pick another --out)")
        if not (cfg.resume or cfg.overwrite):
            raise StoreError(f"{cfg.out} already exists: pass --resume to continue it or --overwrite to replace it")
        if cfg.overwrite and not loc.local:
            raise StoreError(f"--overwrite of a remote store is not supported (object stores cannot swap a "
                             f"store atomically): harvest to a new URL, or delete {cfg.out} with your storage tools")
    docs_iter = iter_documents(cfg.dataset, cfg.split, cfg.seed, cfg.text_column)
    try:
        first_doc = next((d for d in docs_iter if d.text), None)  # empty texts add no tokens
    except (KeyError, OSError, ValueError) as e:
        raise ConfigError(f"--dataset {cfg.dataset!r}: cannot read it ({e.__class__.__name__}: {e})") from e
    if first_doc is None:
        raise ConfigError(f"--dataset {cfg.dataset!r} has no documents in split {cfg.split!r}: "
                          "pick another dataset or --split")
    lm = loaded or load_model(cfg.model, cfg.device)
    try:
        check_layers(cfg.layers, lm.n_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    layers = sorted(set(cfg.layers))
    hooks = [hook_name_for(L) for L in layers]
    seqs = pack_sequences((d.text for d in itertools.chain([first_doc], docs_iter)), lm.tokenizer,
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
    elif loc.local:  # new or replaced: built beside, swapped in at the end (see outputs.build_output)
        with build_output(loc.path, overwrite=cfg.overwrite, is_ours=is_sae_store, what="an sae store",
                          keep_partial=lambda: bool(writers) and writers[-1].n_written > 0,
                          error=StoreError) as target:
            write(target, "create")
    else:
        write(loc, "create")
    if not quiet:
        print(f"→ {cfg.out}")
    return cfg.out


def _harvest_into(cfg: HarvestConfig, loaded: LoadedModel | None, quiet: bool) -> str:
    """``--into``: add ``cfg.layers`` to a complete store, running the model over the store's own token
    ids (rows align 1:1 with its hooks). The model defaults to the store's; one whose weights
    fingerprint differs is refused before anything is written."""
    from ..store import ActivationStore

    store = ActivationStore(cfg.into, storage_options=cfg.storage_options)
    a = store.attrs
    if a.get("status") != "complete":
        raise StoreError(f"--into {cfg.into}: the store is not complete; finish it (`sae harvest --resume`) first")
    hooks = [hook_name_for(L) for L in sorted(set(cfg.layers))]
    have = [h for h in hooks if h in store.hook_names]
    if have:
        raise ConfigError(f"--into {cfg.into} already has {', '.join(have)}: --into adds new layers only")
    lm = loaded or load_model(cfg.model or a.get("model_id"), cfg.device, model_weights=a.get("model_weights"))
    if a.get("model_fingerprint") and lm.fingerprint != a["model_fingerprint"]:
        raise ConfigError(f"--into {cfg.into}: the model's weights (fingerprint {lm.fingerprint}) are not the ones the "
                          f"store was harvested with ({a['model_fingerprint']}, model {a.get('model_id')}): pass that "
                          "model with --model")
    try:
        check_layers(cfg.layers, lm.n_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if lm.d_model != store.d_model:
        raise ConfigError(f"--into {cfg.into}: the model has d_model {lm.d_model}, the store {store.d_model}")
    writer = StoreWriter.add_hooks(cfg.into, hooks, storage_options=cfg.storage_options)
    run_cfg = replace(cfg, context_size=store.context_size, chunk_tokens=store.chunk_tokens, model=cfg.model or
                      (None if lm.model_weights else a.get("model_id")))
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
    there stay byte-identical. Everything is checked (store, layers, model fingerprint, the corpus
    still yielding the stored prefix, enough corpus left) before anything is written."""
    from ..store import ActivationStore

    store = ActivationStore(cfg.out, storage_options=cfg.storage_options)
    a = store.attrs
    if a.get("status") != "complete":
        raise StoreError(f"--extend {cfg.out}: the store is not complete; finish it with --resume first "
                         "(an interrupted --extend continues with the same --extend command)")
    if sorted(set(cfg.layers)) != sorted(a.get("layers") or []):
        raise ConfigError(f"--extend keeps the store's layers {a.get('layers')}: pass exactly those --layer values "
                          "(add layers with --into)")
    ctx, n1 = store.context_size, store.n_tokens
    n2 = -(-cfg.tokens // ctx) * ctx
    if n2 <= n1:
        raise ConfigError(f"--tokens {cfg.tokens}: {cfg.out} already holds {n1} tokens; --extend needs a larger "
                          "--tokens (the new total)")
    lm = loaded or load_model(cfg.model or a.get("model_id"), cfg.device, model_weights=a.get("model_weights"))
    if a.get("model_fingerprint") and lm.fingerprint != a["model_fingerprint"]:
        raise ConfigError(f"--extend {cfg.out}: the model's weights (fingerprint {lm.fingerprint}) are not the ones "
                          f"the store was harvested with ({a['model_fingerprint']}): pass that model with --model")
    docs = iter_documents(a["dataset"], a["split"], int(a.get("seed", 0)), a.get("text_column") or "text")
    seqs = pack_sequences((d.text for d in docs), lm.tokenizer, ctx, lm.bos_token_id)
    prefix = list(itertools.islice(seqs, n1 // ctx))
    if len(prefix) * ctx != n1 or not np.array_equal(np.stack(prefix).reshape(-1), store.tokens):
        raise ConfigError(f"--extend {cfg.out}: dataset {a['dataset']!r} no longer yields the stored tokens (the "
                          "corpus or tokenizer changed); harvest a new store instead")
    more = list(itertools.islice(seqs, (n2 - n1) // ctx))
    if len(more) * ctx < n2 - n1:
        have = n1 + len(more) * ctx
        raise ConfigError(f"--extend {cfg.out}: the corpus runs out at {have} tokens ({have - n1} more than stored); "
                          f"ask for --tokens {have} or fewer" if more else
                          f"--extend {cfg.out}: the corpus has no tokens beyond the {n1} already stored")
    writer = StoreWriter.extend(cfg.out, np.stack(more).reshape(-1), storage_options=cfg.storage_options)
    run_cfg = replace(cfg, context_size=ctx, chunk_tokens=store.chunk_tokens,
                      model=cfg.model or (None if lm.model_weights else a.get("model_id")))
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
                 ) -> None:  # noqa: ANN001
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

    def submit(self, fn, *args) -> Future:  # noqa: ANN001
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
