"""Training speed with experiment trackers on against off, interleaved in one run.

    python benchmarks/tracking.py --store acts.zarr [--tokens 262144] [--rounds 3] [--log-every 10]

Trains the same TopK SAE ``--rounds`` times each way (no tracker; tensorboard; mlflow to a local SQLite
store; wandb offline), alternating, and prints the median seconds per run, the ratio to no tracker and
the range of each round's own ratio (the spread to read a ratio against).
Trackers only act at log steps (every ``--log-every`` steps), on values ``metrics.jsonl`` already read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from sae.tracking import TrackingConfig
from sae.train.config import TrainConfig
from sae.train.run import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trackers", default="tensorboard,mlflow,wandb")
    a = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    work = Path(tempfile.mkdtemp(prefix="tracking_bench_"))
    ways = ["none", *a.trackers.split(",")]
    times: dict[str, list[float]] = {w: [] for w in ways}
    total: dict[str, list[float]] = {w: [] for w in ways}
    for r in range(a.rounds):
        for w in ways:
            cfg = TrainConfig(store=a.store, expansion=8, k=32, tokens=a.tokens, batch_size=a.batch_size,
                              log_every=a.log_every, device="cpu", out=str(work / f"{w}-{r}"))
            tracking = None if w == "none" else TrackingConfig(backends=[w], dir=str(work / "tracking"),
                                                               mlflow_uri=f"sqlite:///{work / 'mlflow.db'}")
            t0 = time.perf_counter()
            run = train(cfg, quiet=True, tracking=tracking)
            total[w].append(time.perf_counter() - t0)
            last = (run / "metrics.jsonl").read_text().splitlines()[-1]
            times[w].append(json.loads(last)["elapsed_s"])  # the training loop alone
    steps = a.tokens // a.batch_size
    base = statistics.median(times["none"])
    base_total = statistics.median(total["none"])
    print(f"TopK, expansion 8, {steps} steps of {a.batch_size}, log every {a.log_every} steps, {a.rounds} rounds "
          "interleaved; loop = the training loop (metrics.jsonl elapsed_s), total = with start-up and finish")
    print("per-round range = the lowest and highest of each round's own ratio (the ways run back to back)")
    print("| trackers | loop s (median) | ms/step | loop ÷ none | per-round range | total s | total ÷ none |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for w in ways:
        m, t = statistics.median(times[w]), statistics.median(total[w])
        per_round = [x / n for x, n in zip(times[w], times["none"], strict=True)]
        print(f"| {w} | {m:.2f} | {m / steps * 1000:.1f} | {m / base:.3f}× | "
              f"{min(per_round):.3f}–{max(per_round):.3f} | {t:.2f} | {t / base_total:.3f}× |")


if __name__ == "__main__":
    main()
