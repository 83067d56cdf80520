"""Harvest throughput vs a bare forward pass (same model, layers, batch).

    python benchmarks/harvest.py [--model embedded] [--layer 6] [--tokens 65536] [--batch-size 32]

Bare forward = the model run up to the deepest hooked layer (the work any harvester must do),
activations discarded. Harvest = the full `sae harvest` path (corpus, tokenisation, forward,
bf16 encode, Blosc-zstd compression, Zarr writes, statistics, commits) into a temporary store.
With ``--full``, a full forward with ``output_hidden_states`` (what a naive cache does) is timed for
reference. ``--repeats`` interleaved (bare, harvest) pairs; the headline is the median per-pair ratio.
Last line: ``harvest/bare-forward throughput ratio: R`` (goal ≥ 0.90).

``--workers 1,2`` instead times the distributed harvest (a dask LocalCluster of that many worker
processes, each loading the model once; cluster start-up and worker model loads included) against
the in-process harvest, and prints tokens/s per setting and the scaling ratio to 1 worker.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae.harvest.corpus import iter_documents
from sae.harvest.harvest import HarvestConfig, harvest
from sae.harvest.tokens import pack_sequences
from sae.model import capture_resid_post, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--layer", type=int, action="append")
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--codec", default="zstd")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved (bare, harvest) pairs; medians reported")
    ap.add_argument("--full", action="store_true", help="also time a full forward with output_hidden_states")
    ap.add_argument("--workers", default=None, help="comma-separated dask worker counts, e.g. 1,2")
    a = ap.parse_args()
    layers = a.layer or [6]
    lm = load_model(a.model, a.device)
    n_seq = a.tokens // a.context_size
    docs = (d.text for d in iter_documents("embedded", "train"))
    seqs = np.stack(list(itertools.islice(pack_sequences(docs, lm.tokenizer, a.context_size, lm.bos_token_id), n_seq)))

    def bare(full: bool = False) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, n_seq, a.batch_size):
                ids = torch.from_numpy(seqs[i:i + a.batch_size]).long().to(lm.device)
                if full:
                    lm.model(input_ids=ids, output_hidden_states=True, use_cache=False)
                else:
                    capture_resid_post(lm.model, ids, layers)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        return n_seq * a.context_size / (time.perf_counter() - t0)

    def run_harvest(i: int) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = HarvestConfig(layers=layers, model=a.model, tokens=n_seq * a.context_size,
                                context_size=a.context_size, batch_size=a.batch_size, codec=a.codec,
                                out=str(Path(tmp) / f"b{i}.zarr"), device=a.device)
            t0 = time.perf_counter()
            harvest(cfg, loaded=lm, quiet=True)
            return n_seq * a.context_size / (time.perf_counter() - t0)

    if a.workers:
        counts = [int(w) for w in a.workers.split(",")]
        tps: dict[str, float] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for w in [0, *counts]:
                cfg = HarvestConfig(layers=layers, model=a.model, tokens=n_seq * a.context_size,
                                    context_size=a.context_size, batch_size=a.batch_size, codec=a.codec,
                                    out=str(Path(tmp) / f"w{w}.zarr"), device=a.device, workers=w or None,
                                    chunk_tokens=max(a.context_size, (4096 // a.context_size) * a.context_size))
                t0 = time.perf_counter()
                harvest(cfg, loaded=lm, quiet=True)
                tps["in-process" if w == 0 else f"{w} worker(s)"] = n_seq * a.context_size / (time.perf_counter() - t0)
        print(f"model {lm.model_id}  layers {layers}  batch {a.batch_size}x{a.context_size}  "
              f"{n_seq * a.context_size} tokens  {torch.get_num_threads()} torch threads in-process")
        for k, v in tps.items():
            print(f"{k:>12}: {v:,.0f} tokens/s")
        base = tps[f"{counts[0]} worker(s)"]
        for w in counts[1:]:
            print(f"scaling {w} vs {counts[0]} worker(s): {tps[f'{w} worker(s)'] / base:.2f}")
        return
    bare()  # warm-up
    bares, harvests = [], []
    for i in range(a.repeats):  # interleaved, so slow phases of a shared machine hit both
        bares.append(bare())
        harvests.append(run_harvest(i))
    bare_tps, harvest_tps = statistics.median(bares), statistics.median(harvests)
    ratios = [h / b for h, b in zip(harvests, bares, strict=True)]
    print(f"model {lm.model_id}  layers {layers}  batch {a.batch_size}x{a.context_size}  device {lm.device}")
    print(f"bare forward (stop after layer {max(layers)}): {bare_tps:,.0f} tokens/s")
    if a.full:
        full_tps = bare(full=True)
        print(f"full forward + output_hidden_states:       {full_tps:,.0f} tokens/s")
        print(f"harvest/full-forward ratio: {harvest_tps / full_tps:.2f}")
    print(f"sae harvest (forward+encode+compress+write): {harvest_tps:,.0f} tokens/s")
    print(f"per-pair ratios: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"harvest/bare-forward throughput ratio: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
