"""One-pass sweep vs separate runs: bytes read from the store and wall time.

    python benchmarks/sweep.py --store acts.zarr [--configs 4] [--tokens 81920]

Trains K TopK configurations (k = 16, 24, 32, 48) once with ``train_many`` (each batch read and
decompressed once, fed to all K SAEs) and once as K separate ``train`` runs, counting the bytes
of every store window read. Last line: ``one pass / K separate runs: bytes R1, wall time R2``.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from sae.store import ActivationStore, ShuffledBatches
from sae.train.config import TrainConfig
from sae.train.run import train, train_many

_read_bytes = {"n": 0}
_real_start = ShuffledBatches._start_window


def _counting_start(self: ShuffledBatches, *args):
    before = self.bytes_read
    out = _real_start(self, *args)
    _read_bytes["n"] += self.bytes_read - before  # stored bytes decoded for this window
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--configs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=81_920)
    ap.add_argument("--batch-size", type=int, default=4096)
    a = ap.parse_args()
    ShuffledBatches._start_window = _counting_start  # type: ignore[method-assign]
    ks = [16, 24, 32, 48][: a.configs]
    s = ActivationStore(a.store)
    print(f"store {a.store}: {s.n_tokens:,} tokens, {s.attrs['codec']} {s.attrs['dtype']}; "
          f"{len(ks)} TopK configs k={ks}, {a.tokens:,} tokens each")
    with tempfile.TemporaryDirectory() as tmp:
        base = TrainConfig(store=a.store, tokens=a.tokens, batch_size=a.batch_size, log_every=1000)
        cfgs = [dataclasses.replace(base, k=k, out=str(Path(tmp) / f"one/k{k}")) for k in ks]
        _read_bytes["n"] = 0
        t0 = time.perf_counter()
        train_many(cfgs, quiet=True)
        one_t, one_b = time.perf_counter() - t0, _read_bytes["n"]
        _read_bytes["n"] = 0
        t0 = time.perf_counter()
        for c in cfgs:
            train(dataclasses.replace(c, out=c.out.replace("/one/", "/sep/")), quiet=True)
        sep_t, sep_b = time.perf_counter() - t0, _read_bytes["n"]
    print(f"one pass:      {one_b / 2**20:8.1f} MiB read, {one_t:6.1f} s")
    print(f"separate runs: {sep_b / 2**20:8.1f} MiB read, {sep_t:6.1f} s")
    print(f"one pass / {len(ks)} separate runs: bytes {one_b / sep_b:.2f}, wall time {one_t / sep_t:.2f}")


if __name__ == "__main__":
    main()
