"""Cost of each orthogonality penalty relative to the base TopK SAE training step.

For every dictionary size F (4096 and 16384; 65536 with ``--big``) at batch B (4096), k = 32 and
d_in = 640, each variant runs in its own subprocess (so its peak memory can be read cleanly) that

1. builds a ``sae.train.trainer.Trainer`` (TopK, d_sae = F) for the variant and synthetic data (a
   sum of 8 planted unit features per token, Zipf-distributed feature frequencies);
2. warms up, then alternates ``--steps`` times a *base step* (``Trainer.step`` with the no-op penalty
   of plain ``topk``: encoder GEMM → top-k → sparse-backward gather of the k values →
   ``decode_sparse`` → FVU loss → backward → decoder-gradient projection → Adam → row
   renormalisation) and the same ``Trainer.step`` with the variant's penalty. Interleaving the
   two keeps their ratio meaningful on a shared machine; the medians are reported;
3. reports memory (:func:`step_peak_mb`: the peak allocated above what is live at the start — peak
   RSS after ``malloc_trim`` and a reset of the kernel's high-water mark on CPU,
   ``max_memory_allocated`` on CUDA): ``extra MB`` = peak of a penalised step minus peak of a base
   step (what the penalty adds to the training step's footprint; 0 when its temporaries fit in
   memory the base step has already released), ``pen MB`` = peak of the penalty's own forward +
   backward run alone, ``state MB`` = its persistent buffers.

The *dense* row is the research logs' formulation, timed once (forward + backward of the penalty only):
dense codes ``f [B, F]``, co-activation ``AᵀA/B`` with ``A = [f > 0]`` (``B·F²`` MACs), cosines
``W_dec W_decᵀ`` (``F²·d`` MACs) and ``Σ_{i<j} co_ij |cos_ij|`` — the common core of every research log
(the penalty of log ``002_7519ceacfbae4f80.txt``; the others add elementwise work on the same ``F×F``
matrices). It is skipped at F = 65536 (each ``F×F`` matrix would be 17 GB). Speed-up = dense time / a variant's extra
time.

Notes: the SAE is at initialisation, so its codes are close to random and the number of distinct
co-firing pairs is near its maximum ``B·k(k−1)/2`` — the worst case for the co-firing variants.
``adaptive``'s group refresh runs once every 100 steps and is reported separately (``periodic``).
CPU runs default to one intra-op thread (``--threads``): on a busy machine OpenMP threads that
wait for each other make small kernels erratic, which would swamp the ratios.

Usage: ``python benchmarks/penalties.py [--quick] [--big] [--batch 4096] [--steps 3] [--device cuda]``.
The last line printed is the headline: worst variant/base ratio and minimum speed-up vs dense.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

VARIANTS = ("topk_pairs", "adaptive", "progressive", "temporal", "static_ortho", "ortsae")
DENSE_MAX_F = 16384


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=str, default="4096,16384", help="comma-separated dictionary sizes F")
    ap.add_argument("--big", action="store_true", help="also F = 65536")
    ap.add_argument("--quick", action="store_true", help="F = 4096 only, 2 timed steps (smoke test)")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--d-in", type=int, default=640)
    ap.add_argument("--steps", type=int, default=4, help="timed (base, penalised) step pairs")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each kind first")
    ap.add_argument("--device", type=str, default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads on CPU (0 = torch default)")
    ap.add_argument("--variants", type=str, default=",".join(VARIANTS))
    ap.add_argument("--no-dense", action="store_true", help="skip the research logs' dense formulation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.steps, args.big = "4096", 2, False
    return args


# -- worker side --------------------------------------------------------------------------------------
def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def step_peak_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory ``fn()`` allocates above what is live when it starts, in MiB.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU (Linux): free heap pages
    are returned to the OS (``malloc_trim``), the peak-RSS mark is reset (``/proc/self/clear_refs``)
    and the peak RSS reached during ``fn`` minus the RSS before it is reported; where that is not
    possible, the growth of ``ru_maxrss`` (a lower bound).
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_mb("VmRSS")
        fn()
        return _proc_status_mb("VmHWM") - before
    except (OSError, KeyError):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before


def synthetic_batches(n: int, B: int, d_in: int, n_feat: int, seed: int, device: str) -> list[torch.Tensor]:
    """``n`` batches ``[B, d_in]``: 8 planted unit features per token, Zipf(1) frequencies, U(1,2) sizes."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_feat, d_in, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    probs = 1.0 / torch.arange(1, n_feat + 1, dtype=torch.float64)
    out = []
    for _ in range(n):
        idx = torch.multinomial(probs.float(), B * 8, replacement=True, generator=g).view(B, 8)
        mags = 1 + torch.rand(B, 8, 1, generator=g)
        x = (mags * feats[idx]).sum(1) + 0.05 * torch.randn(B, d_in, generator=g)
        out.append(x.to(device))
    return out


class Bench:
    """One :class:`~sae.train.trainer.Trainer` (the real training step: fused-bias encoder GEMM, TopK,
    sparse backward, AuxK bookkeeping, Adam as configured there, decoder projection and renorm),
    stepped with its penalty attached or swapped for the no-op penalty of the plain baseline."""

    def __init__(self, F: int, args: argparse.Namespace, variant: str | None) -> None:
        from sae.train.config import TrainConfig
        from sae.train.trainer import Trainer
        from sae.train.variants import build_penalty

        self.args, self.dev = args, torch.device(args.device)
        cfg = TrainConfig(d_sae=F, k=args.k, batch_size=args.batch, lr=1e-4, seed=args.seed,
                          variant=variant or "topk")
        self.trainer = Trainer(cfg, d_in=args.d_in, total_steps=10_000, device=self.dev)
        self.sae = self.trainer.sae
        self.no_penalty = build_penalty("topk", F, args.d_in).to(self.dev)
        self.penalty = self.trainer.penalty if variant else None
        self.data = synthetic_batches(4, args.batch, args.d_in, 2 * F, args.seed, args.device)
        self.n = 0
        self.pen_step = 0

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def codes(self, x: torch.Tensor):
        """The trainer's TopK codes of ``x`` (differentiable values, sparse backward)."""
        from sae.train.archs.topk import topk_codes

        return topk_codes(self.sae, x - self.sae.b_dec, self.sae.k)[0]

    def context(self, codes: Any):
        from sae.train.variants import PenaltyContext

        gen = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.pen_step)
        ctx = PenaltyContext(W_dec=self.sae.W_dec, codes=codes, step=self.pen_step, total_steps=10_000,
                             generator=gen)
        self.pen_step += 1
        return ctx

    def penalty_alone(self, codes: Any) -> None:
        """The penalty's forward and backward on ``codes`` (no SAE update)."""
        assert self.penalty is not None
        pen, _ = self.penalty(self.context(codes))
        pen.backward()
        self.sae.W_dec.grad = None

    def step(self, with_penalty: bool) -> float:
        """One ``Trainer.step``; returns its wall time in seconds."""
        x = self.data[self.n % len(self.data)]
        self.n += 1
        self.trainer.penalty = self.penalty if with_penalty and self.penalty is not None else self.no_penalty
        self.sync()
        t0 = time.perf_counter()
        self.trainer.step(x)
        self.sync()
        return time.perf_counter() - t0


def run_variant(F: int, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    b = Bench(F, args, variant)
    assert b.penalty is not None
    for _ in range(args.warmup):
        b.step(False)
    # enough penalised warm-up steps for temporal's first token window to complete
    extra_warm = math.ceil(b.penalty.config.window_tokens / args.batch) if variant == "temporal" else 0
    for _ in range(args.warmup + extra_warm):
        b.step(True)
    base, pen = [], []
    for _ in range(args.steps):
        base.append(b.step(False))
        pen.append(b.step(True))
    mem_base = step_peak_mb(lambda: b.step(False), b.dev)
    mem_pen = step_peak_mb(lambda: b.step(True), b.dev)
    with torch.no_grad():
        codes = b.codes(b.data[b.n % len(b.data)])
    mem_alone = step_peak_mb(lambda: b.penalty_alone(codes), b.dev)
    out: dict[str, Any] = {"F": F, "variant": variant, "base_s": statistics.median(base),
                           "pen_s": statistics.median(pen), "base_mb": mem_base,
                           "extra_mb": max(mem_pen - mem_base, 0.0), "alone_mb": mem_alone,
                           "state_mb": sum(t.numel() * t.element_size() for t in b.penalty.buffers()) / 2**20}
    if variant == "adaptive":
        t0 = time.perf_counter()
        b.penalty.refresh(b.trainer.step_idx)
        out["periodic"] = f"refresh {time.perf_counter() - t0:.2f}s/{b.penalty.config.refresh_every} steps"
    return out


def run_dense(F: int, args: argparse.Namespace) -> dict[str, Any]:
    """The research logs' dense penalty (forward + backward only), timed once after building the codes."""
    b = Bench(F, args, None)
    codes = b.codes(b.data[0])
    W = b.sae.W_dec
    times = []

    def dense_step() -> None:
        b.sync()
        t0 = time.perf_counter()
        A = (codes.to_dense(F).detach() > 0).float()
        co = (A.T @ A) / A.shape[0]
        del A
        cos = W @ W.T
        pen = (co.triu_(1) * cos.abs()).sum()
        pen.backward(retain_graph=True)
        b.sync()
        times.append(time.perf_counter() - t0)

    mb = step_peak_mb(dense_step, b.dev)
    return {"F": F, "variant": "dense (seeds)", "pen_s": times[0], "extra_mb": max(mb, 0.0)}


def worker(spec: str) -> None:
    job = json.loads(spec)
    args = parse_args(job["argv"])
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    F, variant = job["F"], job["variant"]
    res = run_dense(F, args) if variant == "dense" else run_variant(F, variant, args)
    print("RESULT " + json.dumps(res))


# -- driver side --------------------------------------------------------------------------------------
def spawn(F: int, variant: str, argv: list[str]) -> dict[str, Any]:
    spec = json.dumps({"F": F, "variant": variant, "argv": argv})
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"F": F, "variant": variant, "error": " | ".join(tail) or f"exit code {proc.returncode}"}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.big and 65536 not in sizes:
        sizes.append(65536)
    variants = [v for v in args.variants.split(",") if v]
    threads = args.threads or torch.get_num_threads()
    print(f"# B={args.batch} k={args.k} d_in={args.d_in} device={args.device} threads={threads} "
          f"steps={args.steps} (medians of interleaved base/penalised steps)")
    header = (f"{'F':>6} {'variant':<14} {'base s':>8} {'+pen s':>8} {'ratio':>7} {'extra s':>8} "
              f"{'extra MB':>9} {'pen MB':>7} {'state MB':>9}  notes")
    print(header)
    print("-" * len(header))
    results: list[dict[str, Any]] = []
    for F in sizes:
        jobs = list(variants) + ([] if args.no_dense or F > DENSE_MAX_F else ["dense"])
        for v in jobs:
            r = spawn(F, v, argv)
            results.append(r)
            if "error" in r:
                print(f"{F:>6} {r['variant']:<14} ERROR {r['error']}")
            elif v == "dense":
                print(f"{F:>6} {r['variant']:<14} {'':>8} {r['pen_s']:>8.2f} {'':>7} {r['pen_s']:>8.2f} "
                      f"{r['extra_mb']:>9.0f} {r['extra_mb']:>7.0f} {'':>9}  penalty fwd+bwd only")
            else:
                r["ratio"] = r["pen_s"] / r["base_s"]
                r["extra_s"] = max(r["pen_s"] - r["base_s"], 1e-6)
                print(f"{F:>6} {v:<14} {r['base_s']:>8.2f} {r['pen_s']:>8.2f} {r['ratio']:>6.2f}x "
                      f"{r['extra_s']:>8.2f} {r['extra_mb']:>9.0f} {r['alone_mb']:>7.0f} "
                      f"{r['state_mb']:>9.1f}  base step peak {r['base_mb']:.0f} MB {r.get('periodic', '')}")
            sys.stdout.flush()
    headline_F = 16384 if 16384 in sizes else max(sizes)
    summary = {}
    for F in sizes:
        rows = [r for r in results if r["F"] == F and "ratio" in r]
        dense = next((r for r in results if r["F"] == F and r["variant"] == "dense (seeds)" and "pen_s" in r),
                     None)
        if not rows:
            continue
        worst = max(rows, key=lambda r: r["ratio"])
        slowest = max(rows, key=lambda r: r["extra_s"])
        speed = dense["pen_s"] / slowest["extra_s"] if dense else float("nan")
        summary[F] = (worst["ratio"], speed)
        print(f"F={F}: worst ratio {worst['ratio']:.2f}x ({worst['variant']}); "
              f"min speed-up vs dense {speed:.1f}x ({slowest['variant']})")
    worst, speed = summary.get(headline_F, (float("nan"), float("nan")))
    print(f"worst variant/base step ratio at F={headline_F}: {worst:.2f}x; "
          f"min speed-up vs dense: {speed:.1f}x")


if __name__ == "__main__":
    main()
