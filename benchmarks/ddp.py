"""Data-parallel training of one SAE: 1 process against ``--nproc N`` ranks, side by side in one run.

    python benchmarks/ddp.py --store acts.zarr [--nproc 1,2] [--tokens 262144] [--batch-size 4096]

Trains the same TopK SAE with ``sae train`` (one process) and ``sae train --nproc N`` for each N
(torch.distributed: gloo on the CPU, NCCL with one GPU per rank on CUDA). Prints, for each, the
training loop's tokens/s (from ``metrics.jsonl``'s ``elapsed_s`` at the last step: the rank start-up
and the final save are left out, and printed apart as the wall time), the ratio to one process, and
the largest |Δ| of the final weights against the one-process run (float32 rounding: the ranks add
their partial gradients in another order). A last row trains one process at one intra-op thread: its
difference from the default (all cores) is what reordering float32 sums alone does, the yardstick
for the ranks' difference. On a 2-core CPU, N ranks share the 2 cores, so expect no
speed-up; ``benchmarks/device.sh`` runs it with one rank per GPU where several GPUs are lent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file


def run(store: str, out: Path, nproc: int, a: argparse.Namespace, threads: int | None = None
        ) -> tuple[float, float, float]:
    """Train once; returns (loop tokens/s, wall seconds, final training FVU)."""
    cmd = [sys.executable, "-m", "sae", "train", "--store", store, "--variant", "none", "--expansion",
           str(a.expansion), "--k", str(a.k), "--batch-size", str(a.batch_size), "--tokens", str(a.tokens),
           "--device", a.device, "--log-every", "1000000", "--out", str(out), "--quiet"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return last["tokens"] / last["elapsed_s"], wall, last["fvu"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--nproc", default="1,2")
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ddp_bench_"))
    counts = [int(n) for n in a.nproc.split(",")]
    if 1 not in counts:
        counts = [1, *counts]
    print(f"# {a.tokens} tokens, batch {a.batch_size}, TopK k={a.k}, expansion {a.expansion}, device {a.device}, "
          f"{os.cpu_count()} CPU cores")
    print("| ranks | loop tokens/s | ÷ 1 process | wall s (start-up + save included) | final FVU | "
          "max abs Δ weights vs 1 process | ‖ΔW_dec‖/‖W_dec‖ |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = 0.0
    ref: dict | None = None
    # the last row: one process at one intra-op thread, the size of float32 reordering noise alone
    for n, threads in [*((n, None) for n in counts), (1, 1)]:
        out = work / f"n{n}t{threads}"
        tps, wall, fvu = run(a.store, out, n, a, threads)
        w = load_file(out / "sae_weights.safetensors")
        if n == 1 and threads is None:
            base, ref = tps, w
            delta = rel = "—"
        else:
            assert ref is not None
            delta = f"{max(float((w[k] - ref[k]).abs().max()) for k in w):.1e}"
            rel = f"{float((w['W_dec'] - ref['W_dec']).norm() / ref['W_dec'].norm()):.1e}"
        label = f"{n} (1 process, 1 thread: reordering noise)" if threads else str(n)
        print(f"| {label} | {tps:,.0f} | {tps / base:.2f}× | {wall:.1f} | {fvu:.6f} | {delta} | {rel} |", flush=True)


if __name__ == "__main__":
    main()
