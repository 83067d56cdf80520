"""A sweep on one process against the same sweep spread over dask workers, side by side in one run.

    python benchmarks/sweep_workers.py --store acts.zarr [--configs 4] [--tokens 262144] [--workers 1,2]

Trains ``--configs`` TopK configurations (k = 8, 12, 16, …) three ways: the local one-pass sweep, and
``sae sweep --workers N`` for each N (a fresh ``LocalCluster``, its start-up included, as a user sees it).
Prints the wall time and SAE-tokens/s (configurations × tokens ÷ seconds) of each, the ratio to the
local sweep, and whether every run's weights equal the local sweep's (at the workers' thread count).
On a 2-core machine two workers have one core each, so expect no speed-up; on a machine with one GPU
per worker, ``--workers auto --device cuda`` measures the multi-GPU case.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from sae.rundir.sae import SAE
from sae.train.config import TrainConfig
from sae.train.sweep import expand, parse_grid, run_sweep


def timed(cfgs: list[TrainConfig], out: Path, workers: int | str | None,
          threads: int | None) -> tuple[float, list[Path]]:
    cfgs = [dataclasses.replace(c, out=str(out / Path(c.out).name)) for c in cfgs]
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        dirs = run_sweep(cfgs, workers=workers, quiet=True)
        return time.perf_counter() - t0, dirs
    finally:
        torch.set_num_threads(saved)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--configs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", default="1,2")
    a = ap.parse_args()
    ks = ",".join(str(8 + 4 * i) for i in range(a.configs))
    base = TrainConfig(store=a.store, expansion=a.expansion, tokens=a.tokens, batch_size=a.batch_size, device=a.device)
    cfgs = expand(base, ["none"], parse_grid([f"k={ks}"]), "sweep")
    work = Path(tempfile.mkdtemp(prefix="sweep_workers_"))
    sae_tokens = len(cfgs) * (a.tokens // a.batch_size) * a.batch_size
    cores = torch.get_num_threads()
    rows = []
    local_s, _ = timed(cfgs, work / "local", None, None)
    rows.append(("local (1 process)", local_s, None))
    for w in a.workers.split(","):
        n = int(w) if w.isdigit() else w
        threads = max(1, cores // n) if isinstance(n, int) else None
        # the reference at the workers' thread count, for the equality check
        _, ref_dirs = timed(cfgs, work / f"ref{w}", None, threads)
        s, dirs = timed(cfgs, work / f"w{w}", n, None)
        same = all(all(torch.equal(getattr(SAE.load(p), t), getattr(SAE.load({q.name: q for q in ref_dirs}[p.name]), t))
                       for t in ("W_enc", "W_dec", "b_enc", "b_dec")) for p in dirs)
        rows.append((f"--workers {w}", s, same))
    print(f"{len(cfgs)} TopK SAEs × {a.tokens:,} tokens, batch {a.batch_size}, expansion {a.expansion}, "
          f"device {a.device}, {cores} intra-op threads here")
    print("| sweep | wall s | SAE-tokens/s | ÷ local | weights equal the local sweep's |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, s, same in rows:
        print(f"| {name} | {s:.1f} | {sae_tokens / s:,.0f} | {local_s / s:.2f}× | "
              f"{'—' if same is None else 'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
