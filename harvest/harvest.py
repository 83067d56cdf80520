"""The harvest loop: corpus → packed sequences → one truncated forward → store chunks."""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..model import LoadedModel, capture_resid_post, check_layers, hook_name_for, load_model
from ..progress import progress_bar
from ..store import CodecSpec, StoreWriter
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


def harvest(cfg: HarvestConfig, loaded: LoadedModel | None = None, quiet: bool = False) -> Path:
    """Run the harvest described by ``cfg`` and return the store path.

    Writes ``chunk_tokens`` rows at a time; with ``cfg.resume`` continues from the last committed
    chunk (the result is identical to an uninterrupted run because corpus order, packing and
    per-chunk batching are deterministic).

    Raises:
        ValueError: bad layer, codec or dataset. StoreError: existing output, resume mismatch.
    """
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite are exclusive: pick one")
    codec = CodecSpec.parse(cfg.codec, cfg.dtype)
    if cfg.chunk_tokens % cfg.context_size:
        raise ValueError(f"--chunk-tokens {cfg.chunk_tokens} must be a multiple of --context-size {cfg.context_size}")
    out = Path(cfg.out)
    if out.exists() and not (cfg.resume or cfg.overwrite):
        from ..store import StoreError

        raise StoreError(f"{out} already exists: pass --resume to continue it or --overwrite to replace it")
    lm = loaded or load_model(cfg.model, cfg.device)
    check_layers(cfg.layers, lm.n_layers)
    layers = sorted(set(cfg.layers))
    hooks = [hook_name_for(L) for L in layers]
    meta = {
        "model_id": lm.model_id, "model_fingerprint": lm.fingerprint,
        "tokenizer": getattr(lm.tokenizer, "name_or_path", ""),
        "layers": layers, "hook_point": "resid_post", "dataset": cfg.dataset, "split": cfg.split,
        "text_column": cfg.text_column, "seed": cfg.seed, "special_token_ids": lm.special_token_ids,
        "bos_token_id": lm.bos_token_id, "harvest_config": asdict(cfg),
    }
    mode = "resume" if cfg.resume else ("overwrite" if cfg.overwrite else "create")
    writer = StoreWriter(out, meta, hooks, lm.d_model, cfg.context_size, cfg.tokens, codec, cfg.chunk_tokens, mode)
    if writer.group.attrs.get("status") == "complete":
        return out
    seq_per_chunk = cfg.chunk_tokens // cfg.context_size
    docs = (d.text for d in iter_documents(cfg.dataset, cfg.split, cfg.seed, cfg.text_column))
    seqs = pack_sequences(docs, lm.tokenizer, cfg.context_size, lm.bos_token_id)
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
    writer.finalize()
    if not quiet:
        dt = time.perf_counter() - t0
        print(f"harvested {writer.n_written - done0} tokens in {dt:.1f}s "
              f"({(writer.n_written - done0) / max(dt, 1e-9):.0f} tokens/s) → {out}")
    return out


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
