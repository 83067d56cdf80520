"""The shuffled loader of this checkout against an older commit's, side by side on the same stores.

    python benchmarks/loader_ab.py --base 51f5624            # the two default stores below
    python benchmarks/loader_ab.py --base main --store acts.zarr --threads 1,2

The base commit is checked out into a temporary ``git worktree`` (removed at the end; nothing else
is touched). Every measurement runs in a fresh child process that imports ``sae`` from either that
worktree or this checkout, and the measurements are interleaved (round → store → decode threads →
base, this), so a slow phase of the machine hits both versions. Each child drains the loader's
read-ahead (8 batches), then times three blocks of ``--batches`` batches of ``--batch`` rows on the
CPU and reports the middle one (a fresh process first page-faults its window buffers in).

Default stores (built once in a temporary directory):

* ``scale-small``: what ``scale.py --small`` harvests (a one-layer random Gemma 2 at d_model 2304,
  8 192 tokens in 1 024-token chunks, bf16 + zstd; random activations barely compress, so
  decoding is little more than a copy);
* ``gaussian``: ``read.py``'s synthetic store (65 536 Gaussian rows, d_model 2304, 8 192-token
  chunks, bf16 + zstd, which compresses to ~73 %: decoding costs real time).

Prints the median tokens/s of each (store, threads, version), every round's value, and this ÷ base.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Only long-standing public API of ``sae`` (both versions must run it), and the timing helper
# from this checkout's benchmarks/ (it imports nothing from ``sae``).
CHILD = """
import sys
sys.path.insert(0, sys.argv[5])
from stream_timing import stream_tokens_per_s
from sae.train.host_memory import keep_freed_memory
keep_freed_memory()
from sae.store import ActivationStore, ShuffledBatches
path, w, batch, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
st = ActivationStore(path)
it = iter(ShuffledBatches(st, st.hook_names[0], batch, seed=1, read_workers=w))
rates = [stream_tokens_per_s(it, n, batch, warmup=8 if i == 0 else 0) for i in range(3)]
print(sorted(rates)[1])
it.close()
"""


def default_stores(tmp: Path) -> dict[str, str]:
    import torch
    from read import synthetic_store  # benchmarks/read.py (this script's folder is on sys.path)
    from scale import SMALL, build_model, corpus_dir

    from sae.harvest.harvest import HarvestConfig, harvest

    s = dict(SMALL)
    corpus = corpus_dir(tmp)
    lm = build_model(s, corpus, torch.device("cpu"))
    harvest(HarvestConfig(layers=[s["layer"]], tokens=s["harvest_tokens"], context_size=s["context"],
                          batch_size=s["harvest_batch"], dataset=str(corpus), out=str(tmp / "small.zarr"),
                          device="cpu", chunk_tokens=s["chunk_tokens"]), loaded=lm, quiet=True)
    synthetic_store(tmp / "gauss.zarr", 65_536, 2304, 8192, "zstd", "bfloat16")
    return {"scale-small": str(tmp / "small.zarr"), "gaussian": str(tmp / "gauss.zarr")}


def package_dir(tmp: Path, name: str, tree: Path) -> Path:
    """A folder holding only ``sae`` → ``tree``, to put first on ``PYTHONPATH``."""
    d = tmp / name
    d.mkdir()
    (d / "sae").symlink_to(tree, target_is_directory=True)
    return d


def rate(pkg: Path, store: str, threads: int, batch: int, batches: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(pkg), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, store, str(threads), str(batch), str(batches),
                          str(Path(__file__).resolve().parent)],
                         capture_output=True, text=True, env=env, timeout=600, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the commit to compare against (any git revision)")
    ap.add_argument("--store", action="append", default=None, help="a store to read (repeatable; default: two built)")
    ap.add_argument("--threads", default="1,2", help="decode thread counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--batches", type=int, default=48)
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", a.base + "^{commit}"],
                         capture_output=True, text=True)
    if rev.returncode != 0:
        sys.exit(f"error: {a.base!r} is not a commit of {ROOT}: pass a revision `git log` shows")
    for s in a.store or []:
        if not Path(s).is_dir():
            sys.exit(f"error: no store at {s}: pass a store directory written by `sae harvest`")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        wt = tmp / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(wt), rev.stdout.strip()],
                       check=True)
        try:
            versions = {"base": package_dir(tmp, "pkg_base", wt), "this": package_dir(tmp, "pkg_this", ROOT)}
            stores = {Path(s).name: s for s in a.store} if a.store else default_stores(tmp)
            res: dict[tuple[str, int, str], list[float]] = {}
            for r in range(a.rounds):
                for name, path in stores.items():
                    for w in threads:
                        for v, pkg in versions.items():
                            res.setdefault((name, w, v), []).append(rate(pkg, path, w, a.batch, a.batches))
                print(f"round {r + 1}/{a.rounds} done", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)], check=False)
    print(f"base {a.base} ({rev.stdout.strip()[:7]}) vs this checkout; {os.cpu_count()} CPUs; median of "
          f"{a.rounds} interleaved rounds, tokens/s")
    for name in stores:
        for w in threads:
            b, n = res[(name, w, "base")], res[(name, w, "this")]
            print(f"{name}, {w} decode thread(s): base {statistics.median(b):,.0f} "
                  f"({', '.join(f'{x / 1e3:,.0f} k' for x in b)}); this {statistics.median(n):,.0f} "
                  f"({', '.join(f'{x / 1e3:,.0f} k' for x in n)}); this / base "
                  f"{statistics.median(n) / statistics.median(b):.2f}x")


if __name__ == "__main__":
    main()
