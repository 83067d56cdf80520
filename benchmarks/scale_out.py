"""Both ways of training beyond one process, measured in one run on one store:

    python benchmarks/scale_out.py --store acts.zarr [--device cpu] [--n 1,2]

1. a sweep spread over dask workers (``benchmarks/sweep_workers.py``: 4 TopK SAEs, local against
   ``--workers N``), SAE-tokens/s and the ratio to the local sweep;
2. one SAE trained data-parallel (``benchmarks/ddp.py``: 1 process against ``--nproc N``), the
   training loop's tokens/s and the ratio to one process.

Each part prints its own table (with its weights check). On this 2-core CPU the workers or ranks
share the two cores, so the ratios measure the machinery's cost, not a speed-up;
``benchmarks/device.sh`` measures the several-GPU case.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", default="1,2", help="worker and rank counts")
    ap.add_argument("--tokens", type=int, default=262_144)
    a = ap.parse_args()
    print("## sweep over dask workers", flush=True)
    subprocess.run([sys.executable, str(HERE / "sweep_workers.py"), "--store", a.store, "--device", a.device,
                    "--workers", a.n, "--configs", "4", "--tokens", str(a.tokens)], check=True)
    print("\n## one SAE, data-parallel ranks", flush=True)
    subprocess.run([sys.executable, str(HERE / "ddp.py"), "--store", a.store, "--device", a.device,
                    "--nproc", a.n, "--tokens", str(a.tokens)], check=True)


if __name__ == "__main__":
    main()
