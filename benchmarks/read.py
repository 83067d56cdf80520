"""Store read throughput: Zarr's own read path vs the direct chunk decoder, side by side.

    python benchmarks/read.py                       # synthetic bf16 store, d_model 2304, 8 192-token chunks
    python benchmarks/read.py --store acts.zarr     # an existing store
    python benchmarks/read.py --no-keep-freed-memory   # glibc's default allocator settings

Two measurements, each with 1, 2, 4 … N decode threads, interleaved (zarr, direct, zarr, direct …)
so a slow phase of the machine hits both:

1. **chunk decode**: every chunk of the hook read as whole chunks, through ``zarr.Array[a:b]``
   (Zarr's event loop and codec pipeline) vs :class:`~sae.store.chunk_decode.DirectChunks` into a
   per-thread reused buffer; both give the same bytes (checked here for one chunk).
2. **shuffled stream**: :class:`~sae.store.ShuffledBatches` on the CPU (decode, stored-form shuffle,
   dequantise to float32) with its direct decoder vs the same loader forced through Zarr.

By default the process applies :func:`~sae.train.host_memory.keep_freed_memory`, as ``sae train``
does on the CPU. The synthetic store holds Gaussian activations (``--tokens``, ``--chunk-tokens``);
they compress a little worse than a model's. Last line: the best direct ÷ zarr stream ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from stream_timing import stream_tokens_per_s  # benchmarks/ (this script's folder is on sys.path)

from sae.store import ActivationStore, CodecSpec, ShuffledBatches, StoreWriter
from sae.store.chunk_decode import ChunkScratch, DirectChunks
from sae.train.host_memory import keep_freed_memory


def synthetic_store(path: Path, n: int, d: int, chunk: int, codec: str, dtype: str) -> Path:
    g = torch.Generator().manual_seed(0)
    meta = {"model_id": "synthetic", "model_fingerprint": "0", "tokenizer": "", "dataset": "synthetic",
            "split": "train", "seed": 0, "special_token_ids": [2], "bos_token_id": 2}
    w = StoreWriter(path, meta, ["blocks.0.hook_resid_post"], d, 1024, n, CodecSpec.parse(codec, dtype), chunk)
    for s in range(0, n, chunk):
        tok = (np.arange(s, min(s + chunk, n), dtype=np.int32) % 97) + 10
        tok[(np.arange(s, s + len(tok)) % 1024) == 0] = 2
        w.append(tok, {"blocks.0.hook_resid_post": torch.randn(len(tok), d, generator=g)}, tok != 2)
    w.finalize()
    return path


def thread_counts() -> list[int]:
    n = os.cpu_count() or 1
    return sorted({1, *[2 ** i for i in range(1, 8) if 2 ** i < n], n})


def decode_rate(store: ActivationStore, hook: str, workers: int, direct: bool) -> float:
    dc = DirectChunks.for_array(hook, store.array(hook))
    arr = store.array(hook)
    tls: dict[int, ChunkScratch] = {}

    def one(c: int) -> None:
        a, b = store.chunk_bounds(c)
        if direct:
            dc.read(store.loc, c, tls.setdefault(threading.get_ident(), ChunkScratch()))
        else:
            np.asarray(arr[a:b])

    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(one, range(min(store.n_chunks, workers))))  # warm-up: every thread's buffers
        t0 = time.perf_counter()
        list(ex.map(one, range(store.n_chunks)))
        dt = time.perf_counter() - t0
    return store.n_tokens / dt


def stream_rate(store: ActivationStore, hook: str, workers: int, direct: bool, batch: int, batches: int) -> float:
    real = ActivationStore._read_direct
    if not direct:
        ActivationStore._read_direct = lambda self, *a, **k: None  # type: ignore[method-assign]
    try:
        it = iter(ShuffledBatches(store, hook, batch, seed=1, read_workers=workers))
        rate = stream_tokens_per_s(it, batches, batch)
        it.close()
    finally:
        ActivationStore._read_direct = real  # type: ignore[method-assign]
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None)
    ap.add_argument("--tokens", type=int, default=131_072)
    ap.add_argument("--d-model", type=int, default=2304)
    ap.add_argument("--chunk-tokens", type=int, default=8192)
    ap.add_argument("--codec", default="zstd")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-keep-freed-memory", action="store_true")
    a = ap.parse_args()
    if not a.no_keep_freed_memory:
        keep_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:
        path = a.store or str(synthetic_store(Path(tmp) / "s.zarr", a.tokens, a.d_model, a.chunk_tokens, a.codec,
                                              a.dtype))
        store = ActivationStore(path)
        hook = store.hook_names[0]
        dc = DirectChunks.for_array(hook, store.array(hook))
        if dc is None:
            raise SystemExit(f"error: {hook}'s codec chain is not one the direct decoder reads (Zarr only)")
        a0, b0 = store.chunk_bounds(0)
        assert np.array_equal(dc.read(store.loc, 0), np.asarray(store.array(hook)[a0:b0]))
        print(f"store {path}: {store.n_tokens:,} tokens, d_model {store.d_model}, {store.chunk_tokens}-token chunks, "
              f"{store.attrs['codec']} {store.attrs['dtype']}; keep_freed_memory: {not a.no_keep_freed_memory}; "
              f"{os.cpu_count()} CPUs")
        best = 0.0
        for name, fn in (("chunk decode", lambda w, d: decode_rate(store, hook, w, d)),
                         ("shuffled stream", lambda w, d: stream_rate(store, hook, w, d, a.batch, a.batches))):
            for w in thread_counts():
                z, r = [], []
                for _ in range(a.repeats):
                    z.append(fn(w, False))
                    r.append(fn(w, True))
                zm, rm = statistics.median(z), statistics.median(r)
                print(f"{name}, {w} thread(s): zarr {zm:,.0f} tokens/s, direct {rm:,.0f} tokens/s: {rm / zm:.2f}x")
                if name == "shuffled stream":
                    best = max(best, rm / zm)
        print(f"best shuffled-stream ratio direct / zarr: {best:.2f}x")


if __name__ == "__main__":
    main()
