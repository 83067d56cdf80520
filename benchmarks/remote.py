"""Shuffled store reads four ways, side by side in one run, against training demand.

    python benchmarks/remote.py --store acts.zarr [--tokens 131072] [--batches 48]

The first ``--tokens`` rows of ``--store`` are copied (``sae store convert``, same codec) to a local
directory, uploaded to an S3-compatible server (moto, started here on 127.0.0.1) and served by a
static HTTP server (127.0.0.1). Each copy is then read through the training loader
(``ShuffledBatches``: random chunk order, 4-chunk mixing windows, concurrent chunk fetches,
decompression included) for ``--batches`` batches of 4 096 rows:

* local disk;
* S3 (moto), uncached;
* HTTP (``http.server``);
* S3 with a warm ``--cache`` (fsspec ``simplecache``, filled by one earlier pass).

Training demand is one ``Trainer.step`` at the README's default shapes (TopK, B 4 096, d_in of the
store, d_sae 8·d_in, k 32) timed in the same run. Printed: tokens/s per way and its ratio to the
demand; last line ``S3 uncached / demand: R1 (goal >= 3); cached / local: R2 (goal >= 0.8)``.
moto is a single-process Python server: a real object store serves many connections in parallel,
so the S3 numbers here are a lower bound.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: for tests.remote_servers

from sae.store import ActivationStore, ShuffledBatches
from sae.store.convert import convert_store
from sae.store.location import StoreLocation
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer
from tests.remote_servers import http_server, s3_server


def read_rate(store: ActivationStore, batches: int, batch: int = 4096, read_workers: int | None = None) -> float:
    """Rows/s of the training loader over ``batches`` batches (the first window's latency included)."""
    loader = ShuffledBatches(store, store.hook_names[0], batch, seed=0, read_workers=read_workers)
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


def demand(d_in: int, batch: int = 4096, steps: int = 4) -> float:
    """Tokens/s one TopK ``Trainer.step`` consumes at d_sae = 8·d_in, k = 32 on this CPU."""
    tr = Trainer(TrainConfig(d_sae=8 * d_in, k=32, batch_size=batch, lr=1e-4), d_in=d_in, total_steps=10**6)
    xs = [torch.randn(batch, d_in) for _ in range(2)]
    tr.step(xs[0])
    t0 = time.perf_counter()
    for i in range(steps):
        tr.step(xs[i % 2])
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--tokens", type=int, default=131072, help="rows copied to the servers (whole chunks)")
    ap.add_argument("--batches", type=int, default=48)
    a = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    src = ActivationStore(a.store)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        local = convert_store(a.store, work / "www" / "acts.zarr", src.attrs["codec"], src.attrs["dtype"],
                              n_tokens=a.tokens)
        mb = ActivationStore(local).nbytes_stored() / 2**20
        print(f"store: {ActivationStore(local).n_tokens:,} rows, {mb:,.1f} MiB, codec {src.attrs['codec']}")
        need = demand(src.d_model)
        print(f"training demand (Trainer.step, B 4096, d_sae {8 * src.d_model}, k 32): {need:,.0f} tokens/s")
        rates: dict[str, float] = {}
        rates["local disk"] = read_rate(ActivationStore(local), a.batches)
        with s3_server("bench") as opts:
            url = "s3://bench/acts.zarr"
            t0 = time.perf_counter()
            StoreLocation(url, opts).fs.put(str(local), "bench/acts.zarr", recursive=True)
            print(f"upload to the loopback S3 server: {time.perf_counter() - t0:.1f} s")
            rates["S3 (moto), uncached"] = read_rate(ActivationStore(url, storage_options=opts), a.batches)
            rates["S3 (moto), 1 read thread"] = read_rate(ActivationStore(url, storage_options=opts), a.batches,
                                                          read_workers=1)
            cache = work / "cache"
            read_rate(ActivationStore(url, storage_options=opts, cache=str(cache)), a.batches)  # fill
            rates["S3 + warm --cache"] = read_rate(ActivationStore(url, storage_options=opts, cache=str(cache)),
                                                   a.batches)
        with http_server(work / "www") as base:
            rates["HTTP (http.server)"] = read_rate(ActivationStore(f"{base}/acts.zarr"), a.batches)
    print(f"{'way':<28} {'tokens/s':>12} {'/ demand':>9}")
    for way, r in rates.items():
        print(f"{way:<28} {r:>12,.0f} {r / need:>8.1f}x")
    print(f"S3 uncached / demand: {rates['S3 (moto), uncached'] / need:.2f} (goal >= 3); "
          f"cached / local: {rates['S3 + warm --cache'] / rates['local disk']:.2f} (goal >= 0.8)")


if __name__ == "__main__":
    main()
