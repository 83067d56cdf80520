"""The harvest loop: corpus → packed sequences → one truncated forward → store chunks."""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..model import LoadedModel, capture_resid_post, check_device, check_layers, hook_name_for, load_model
from ..outputs import build_output, check_output_location, is_empty_dir, is_sae_store
from ..progress import progress_bar
from ..store import CodecSpec, StoreError, StoreWriter
from .corpus import iter_documents
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
        check_output_location(self.out, "--out")


def _positive(option: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option} {value!r} must be a positive integer")


def harvest(cfg: HarvestConfig, loaded: LoadedModel | None = None, quiet: bool = False) -> Path:
    """Run the harvest described by ``cfg`` and return the store path.

    Every option is validated, the output location and the corpus are checked before the model
    loads; the store is created only once the corpus has yielded a first full sequence. Writes
    ``chunk_tokens`` rows at a time; with ``cfg.resume`` continues from the last committed chunk
    (identical to an uninterrupted run: corpus order, packing and per-chunk batching are
    deterministic). ``cfg.overwrite`` replaces only a store of ours, built beside it and swapped in
    at the end: a failed or killed overwrite leaves the old store intact. A failed new harvest with
    no committed chunk removes what it created.

    Raises:
        ConfigError: bad option, layer, codec or dataset. StoreError: existing output, resume
        mismatch, not a store of ours. NonFiniteError: NaN/inf activations (chunk not committed).
    """
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and not is_empty_dir(out):
        if (cfg.resume or cfg.overwrite) and not is_sae_store(out):
            what = "resume" if cfg.resume else "delete"
            raise StoreError(f"{out} exists and is not an sae store; refusing to {what} it "
                             "(pick another --out)")
        if not (cfg.resume or cfg.overwrite):
            raise StoreError(f"{out} already exists: pass --resume to continue it or --overwrite to replace it")
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
    meta = {
        "model_id": lm.model_id, "model_fingerprint": lm.fingerprint,
        "tokenizer": getattr(lm.tokenizer, "name_or_path", ""),
        "layers": layers, "hook_point": "resid_post", "dataset": cfg.dataset, "split": cfg.split,
        "text_column": cfg.text_column, "seed": cfg.seed, "special_token_ids": lm.special_token_ids,
        "bos_token_id": lm.bos_token_id, "harvest_config": asdict(cfg),
    }
    args = (meta, hooks, lm.d_model, cfg.context_size, cfg.tokens)
    if cfg.resume and out.exists() and not is_empty_dir(out):
        codec = CodecSpec.parse(cfg.codec, cfg.dtype)
        writer = StoreWriter(out, *args, codec, cfg.chunk_tokens, "resume")
        _run_harvest(cfg, writer, lm, layers, seqs, quiet)
    else:
        holder: list[StoreWriter] = []
        with build_output(out, overwrite=cfg.overwrite, is_ours=is_sae_store, what="an sae store", error=StoreError,
                          keep_partial=lambda: bool(holder) and holder[0].n_written > 0) as target:
            writer = StoreWriter(target, *args, CodecSpec.parse(cfg.codec, cfg.dtype), cfg.chunk_tokens, "create")
            holder.append(writer)
            _run_harvest(cfg, writer, lm, layers, seqs, quiet)
    if not quiet:
        print(f"→ {out}")
    return out


def _run_harvest(cfg: HarvestConfig, writer: StoreWriter, lm: LoadedModel, layers: list[int], seqs, quiet: bool
                 ) -> None:  # noqa: ANN001
    """The chunk loop: model forward, encode, write and commit chunk after chunk, then finalize."""
    if writer.group.attrs.get("status") == "complete":
        return
    seq_per_chunk = cfg.chunk_tokens // cfg.context_size
    skip = writer.n_written // cfg.context_size
    seqs = itertools.islice(seqs, skip, None)
    special = np.asarray(lm.special_token_ids, dtype=np.int64)
    total = writer.n_target
    t0, done0 = time.perf_counter(), writer.n_written
    # On an accelerator, chunk i is encoded, compressed and written by one background thread while
    # chunk i+1 runs through the model (numcodecs/zarr release the GIL). On CPU the forward already
    # keeps every core busy and a concurrent writer only fights torch's OpenMP threads (measured:
    # harvest/bare-forward 0.87 with the thread vs 0.97 without, benchmarks/harvest.py), so writes
    # run inline there. At most one write is in flight, and a chunk only counts once its commit
    # (the attribute update) has happened, so --resume after a kill sees exactly the committed chunks.
    background = cfg.background_writes if cfg.background_writes is not None else lm.device.type != "cpu"
    workers = 1 if background else 0
    with progress_bar(quiet) as bar, _Writer(workers) as pool:
        task = bar.add_task("harvest", total=total, completed=writer.n_written)
        pending: Future | None = None
        queued = writer.n_written
        while queued < total:
            want = min(seq_per_chunk, (total - queued) // cfg.context_size)
            chunk = list(itertools.islice(seqs, want))
            if not chunk:
                break  # corpus exhausted
            tokens = np.stack(chunk)
            acts = _forward_chunk(lm, tokens, layers, cfg.batch_size)
            flat = tokens.reshape(-1)
            if pending is not None:
                pending.result()  # re-raises a failed write
                bar.update(task, completed=writer.n_written)
            pending = pool.submit(writer.append, flat, {hook_name_for(L): acts[L] for L in layers},
                                  ~np.isin(flat, special))
            queued += len(flat)
            if len(chunk) < want:
                break
        if pending is not None:
            pending.result()
            bar.update(task, completed=writer.n_written)
    if writer.n_written == 0:
        raise ConfigError(f"--dataset {cfg.dataset!r} yielded no complete sequence: nothing to store")
    writer.finalize()
    if not quiet:
        dt = time.perf_counter() - t0
        short = " (the corpus ran out)" if writer.n_written < total else ""
        print(f"harvested {writer.n_written - done0} tokens{short} in {dt:.1f}s "
              f"({(writer.n_written - done0) / max(dt, 1e-9):.0f} forward+write tokens/s, model load excluded)")


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


@torch.no_grad()
def _forward_chunk(lm: LoadedModel, tokens: np.ndarray, layers: list[int], batch_size: int) -> dict[int, torch.Tensor]:
    """``tokens [n_seq, ctx]`` → ``{L: [n_seq * ctx, d_model]}`` float32 on CPU, batched from chunk start."""
    parts: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    for i in range(0, len(tokens), batch_size):
        ids = torch.from_numpy(tokens[i:i + batch_size]).long().to(lm.device)
        got = capture_resid_post(lm.model, ids, layers)
        for L in layers:
            parts[L].append(got[L].reshape(-1, got[L].shape[-1]).float().cpu())
    return {L: torch.cat(v) for L, v in parts.items()}
