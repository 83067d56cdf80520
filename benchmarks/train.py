"""SAE training-step efficiency and store-read headroom.

    python benchmarks/train.py [--store acts.zarr] [--d-in 640] [--expansion 8] [--k 32] [--batch 4096]

(a) FLOP efficiency: time of one TopK training step (``Trainer.step``: encoder, TopK, sparse
decoder, FVU loss, sparse backward, Adam, decoder renorm) vs a plain ``[B, d_in] @ [d_in, d_sae]``
matmul measured in the same run. FLOPs counted are those the step executes:
2·B·d·F (encoder forward) + 2·B·k·d (sparse decoder) + 3·2·B·k·d (sparse backward of encoder and
decoder). We also print the dense-equivalent count 6·B·d·F + 6·B·k·d (what a dense-backward
implementation spends), i.e. the MFU convention.
(b) Store headroom: shuffled-batch read throughput from the store (tokens/s, decompression
included) divided by training consumption (tokens/s). Goal ≥ 3.
Last line: ``step FLOP/s / matmul FLOP/s: R1 (goal >= 0.6); store read / train consumption: R2 (goal >= 3)``.

(c) ``--arch batchtopk,jumprelu,matryoshka``: each architecture's training-step time as a ratio to
TopK's at the same shapes, measured side by side in one run (interleaved rounds, median of each;
batches from ``--store`` when given, else Gaussian). Goals: BatchTopK ≤ 1.2×, JumpReLU ≤ 1.5×,
Matryoshka ≤ 1.5×. Last line: ``step time / TopK: batchtopk R (goal <= 1.2), ...``.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from sae.model import resolve_device
from sae.store import ActivationStore, ShuffledBatches
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer


def timeit(fn, n: int, device: torch.device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="store for the read-throughput part (skipped if absent)")
    ap.add_argument("--d-in", type=int, default=640)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--arch", default="", help="comma-separated archs to time against topk (part c only)")
    ap.add_argument("--variant", default="none", help="penalty of every timed run in part (c)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if a.arch:
        compare_archs(a)
        return
    dev = resolve_device(a.device)
    B, d, F, k = a.batch, a.d_in, a.d_in * a.expansion, a.k
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(B, d, generator=g).to(dev) for _ in range(4)]
    tr = Trainer(TrainConfig(d_sae=F, k=k, batch_size=B, lr=1e-4), d_in=d, total_steps=10**6, device=dev)
    it = itertools.cycle(xs)
    step_s = timeit(lambda: tr.step(next(it)), a.steps, dev)
    W = torch.randn(d, F, generator=g).to(dev)
    mm_s = timeit(lambda: xs[0] @ W, a.steps, dev)
    mm_flops = 2 * B * d * F / mm_s
    executed = 2 * B * d * F + 8 * B * k * d
    dense_equiv = 6 * B * d * F + 6 * B * k * d
    r1 = executed / step_s / mm_flops
    print(f"device {dev}  B={B} d_in={d} d_sae={F} k={k}")
    print(f"matmul [B,d]@[d,F]: {mm_s * 1e3:.1f} ms  ({mm_flops / 1e9:.1f} GFLOP/s)")
    print(f"train step: {step_s * 1e3:.1f} ms  = {step_s / mm_s:.2f} matmuls; {B / step_s:,.0f} tokens/s")
    print(f"executed FLOP/s: {executed / step_s / 1e9:.1f} G  (ratio {r1:.2f});  "
          f"dense-equivalent (MFU) FLOP/s: {dense_equiv / step_s / 1e9:.1f} G "
          f"(ratio {dense_equiv / step_s / mm_flops:.2f})")
    r2_text = "n/a (no --store)"
    if a.store:
        s = ActivationStore(a.store)
        hook = s.hook_names[0]
        loader = ShuffledBatches(s, hook, B, scale=s.norm_scale(hook), device=dev)
        n_batches = min(60, max(8, s.n_tokens // B))
        it2 = iter(loader)
        next(it2)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(it2)
        read_tps = n_batches * B / (time.perf_counter() - t0)
        r2 = read_tps / (B / step_s)
        print(f"store read (shuffled, decoded, {s.attrs['codec']}): {read_tps:,.0f} tokens/s over {n_batches} batches")
        r2_text = f"{r2:.1f} (goal >= 3)"
    print(f"step FLOP/s / matmul FLOP/s: {r1:.2f} (goal >= 0.6); store read / train consumption: {r2_text}")


GOALS = {"batchtopk": 1.2, "jumprelu": 1.5, "matryoshka": 1.5}


def compare_archs(a: argparse.Namespace) -> None:
    """Part (c): step time of each ``--arch`` / TopK's, interleaved rounds, medians."""
    import statistics

    dev = resolve_device(a.device)
    B, k = a.batch, a.k
    if a.store:
        s = ActivationStore(a.store)
        hook = s.hook_names[0]
        loader = iter(ShuffledBatches(s, hook, B, scale=s.norm_scale(hook), device=dev))
        xs = [next(loader) for _ in range(4)]
    else:
        g = torch.Generator().manual_seed(0)
        xs = [torch.randn(B, a.d_in, generator=g).to(dev) for _ in range(4)]
    d = xs[0].shape[1]
    F = d * a.expansion
    archs = ["topk", *[x for x in a.arch.split(",") if x and x != "topk"]]
    trainers = {}
    for arch in archs:
        cfg = TrainConfig(arch=arch, variant=a.variant, d_sae=F, k=k, batch_size=B, lr=1e-4)
        trainers[arch] = Trainer(cfg, d_in=d, total_steps=10**6, device=dev)
    its = {arch: itertools.cycle(xs) for arch in archs}
    for arch, tr in trainers.items():  # warm-up: thresholds set, buffers allocated
        for _ in range(3):
            tr.step(next(its[arch]))
    times: dict[str, list[float]] = {arch: [] for arch in archs}
    for _ in range(a.rounds):
        for arch, tr in trainers.items():
            times[arch].append(timeit(lambda tr=tr, arch=arch: tr.step(next(its[arch])), a.steps, dev))
    med = {arch: statistics.median(v) for arch, v in times.items()}
    data = "store" if a.store else "gaussian"
    print(f"device {dev}  B={B} d_in={d} d_sae={F} k={k} variant={a.variant}  data={data}")
    for arch in archs:
        l0 = trainers[arch].step(xs[0])["l0"]
        spread = (max(times[arch]) - min(times[arch])) * 1e3
        print(f"{arch:>10}: {med[arch] * 1e3:7.1f} ms/step (range {spread:.1f} ms over {a.rounds} rounds)  "
              f"L0 {l0:.1f}  ratio {med[arch] / med['topk']:.2f}")
    parts = [f"{arch} {med[arch] / med['topk']:.2f} (goal <= {GOALS[arch]})" if arch in GOALS
             else f"{arch} {med[arch] / med['topk']:.2f}" for arch in archs[1:]]
    print("step time / TopK: " + ", ".join(parts))


if __name__ == "__main__":
    main()
