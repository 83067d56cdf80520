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
from typing import Any

from sae.store import ActivationStore, ShuffledBatches
from sae.train.config import TrainConfig
from sae.train.run import train, train_many


def one_pass_vs_separate(cfgs: list[TrainConfig], one: str, sep: str) -> tuple[float, int, float, int]:
    """Train ``cfgs`` from one stream (``train_many``), then each alone with ``one`` replaced by ``sep``
    in its ``out``; returns ``(one_pass_s, one_pass_bytes, separate_s, separate_bytes)``, the bytes
    being the store bytes decoded (``ShuffledBatches.bytes_read`` summed over every loader)."""
    counted = {"n": 0}
    real = ShuffledBatches._start_window

    def counting(self: ShuffledBatches, *args: Any) -> Any:
        before = self.bytes_read
        out = real(self, *args)
        counted["n"] += self.bytes_read - before  # stored bytes decoded for this window
        return out

    ShuffledBatches._start_window = counting  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        train_many(cfgs, quiet=True)
        one_t, one_b = time.perf_counter() - t0, counted["n"]
        counted["n"] = 0
        t0 = time.perf_counter()
        for c in cfgs:
            train(dataclasses.replace(c, out=c.out.replace(one, sep)), quiet=True)
        return one_t, one_b, time.perf_counter() - t0, counted["n"]
    finally:
        ShuffledBatches._start_window = real  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--configs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=81_920)
    ap.add_argument("--batch-size", type=int, default=4096)
    a = ap.parse_args()
    ks = [16, 24, 32, 48][: a.configs]
    s = ActivationStore(a.store)
    print(f"store {a.store}: {s.n_tokens:,} tokens, {s.attrs['codec']} {s.attrs['dtype']}; "
          f"{len(ks)} TopK configs k={ks}, {a.tokens:,} tokens each")
    with tempfile.TemporaryDirectory() as tmp:
        base = TrainConfig(store=a.store, tokens=a.tokens, batch_size=a.batch_size, log_every=1000)
        cfgs = [dataclasses.replace(base, k=k, out=str(Path(tmp) / f"one/k{k}")) for k in ks]
        one_t, one_b, sep_t, sep_b = one_pass_vs_separate(cfgs, "/one/", "/sep/")
    print(f"one pass:      {one_b / 2**20:8.1f} MiB read, {one_t:6.1f} s")
    print(f"separate runs: {sep_b / 2**20:8.1f} MiB read, {sep_t:6.1f} s")
    print(f"one pass / {len(ks)} separate runs: bytes {one_b / sep_b:.2f}, wall time {one_t / sep_t:.2f}")


if __name__ == "__main__":
    main()
