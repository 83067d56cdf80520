"""Storage codecs compared: bytes per token, shuffled read throughput, and the explained variance
of an SAE trained on each (evaluated on held-out rows in the source precision).

    python benchmarks/codecs.py --store acts.zarr [--tokens 262144] [--train-tokens 409600]

Each codec's store is made with ``sae store convert`` from the first ``--tokens`` rows of the
source store; the held-out rows are the source store's last 2 chunks (not in any converted copy).
Reference point: SAELens caches fp32 uncompressed (2 560 B/token at d_model 640).
Last line: ``int8: R x fewer bytes than bf16 zstd, EV change D``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sae.rundir.sae import SAE
from sae.store import ActivationStore, ShuffledBatches
from sae.store.convert import convert_store
from sae.train.config import TrainConfig
from sae.train.run import train

CODECS = [("none", "bfloat16"), ("zstd", "bfloat16"), ("bitround:4", "float32"), ("int8", "bfloat16"),
          ("fp8", "bfloat16")]


def heldout_ev(sae: SAE, store: ActivationStore, hook: str) -> float:
    """Explained variance on the source store's last 2 chunks, non-special rows, raw units."""
    start = max(0, store.n_chunks - 2) * store.chunk_tokens
    x = store.read_rows(hook, start, store.n_tokens)
    x = x[torch.from_numpy(store.valid_mask(store.tokens[start:store.n_tokens]))]
    with torch.no_grad():
        x_hat = torch.cat([sae(x[i:i + 4096]) for i in range(0, len(x), 4096)])
    return 1 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--train-tokens", type=int, default=409_600)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--codecs", default=",".join(c for c, _ in CODECS))
    a = ap.parse_args()
    src = ActivationStore(a.store)
    hook = src.hook_names[0]
    wanted = a.codecs.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for codec, dtype in CODECS:
            if codec not in wanted:
                continue
            path = convert_store(a.store, Path(tmp) / f"{codec.replace(':', '_')}.zarr", codec, dtype,
                                 n_tokens=min(a.tokens, (src.n_chunks - 2) * src.chunk_tokens))
            s = ActivationStore(path)
            bpt = s.nbytes_stored() / s.n_tokens
            loader = ShuffledBatches(s, hook, a.batch_size, scale=s.norm_scale(hook))
            it = iter(loader)
            t0 = time.perf_counter()
            n_batches = s.n_tokens // a.batch_size
            for _ in range(n_batches):
                next(it)
            read_tps = n_batches * a.batch_size / (time.perf_counter() - t0)
            run = train(TrainConfig(store=str(path), tokens=a.train_tokens, batch_size=a.batch_size,
                                    out=str(Path(tmp) / f"run_{codec.replace(':', '_')}"), log_every=1000), quiet=True)
            ev = heldout_ev(SAE.load(run), src, hook)
            rows.append((codec, dtype, bpt, read_tps, ev))
            print(f"{codec:>11} {dtype:>9}  {bpt:8.0f} B/token  {read_tps:10,.0f} tokens/s read  EV {ev:.4f}",
                  flush=True)
    print(f"(reference: fp32 uncompressed = {4 * src.d_model + 4} B/token)")
    by = {r[0]: r for r in rows}
    if "int8" in by and "zstd" in by:
        print(f"int8: {by['zstd'][2] / by['int8'][2]:.2f}x fewer bytes than bf16 zstd, "
              f"EV change {by['int8'][4] - by['zstd'][4]:+.4f}")


if __name__ == "__main__":
    main()
