"""The ground-truth results of docs/results.md ("Ground truth"): every architecture and every orthogonality
penalty (on TopK) at two L0 values × 3 seeds on the CPU synthetic preset, scored against the true
features, tabulated with 95 % intervals and Welch differences, plotted.

Resumable: each step skips what is already on disk (a sweep whose run directories all exist, an
evaluation whose result file exists), so rerunning after a kill continues. Steps, in order:

    python benchmarks/ground_truth.py --root /work/gt            # store, sweeps, evaluations, tables
    python benchmarks/ground_truth.py --root /work/gt --only tables

Every command it runs is printed first (the reproduction recipe), and the tables go to
``<root>/tables.md`` with the plots in ``<root>/report/``.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

PENALTIES = ("none", "topk_pairs", "adaptive", "progressive", "temporal", "static_ortho", "ortsae")
ARCHS = ("batchtopk", "jumprelu", "matryoshka")
SEEDS = "0,1,2"
D_SAE = 1024  # a quarter of the preset's 4 096 features, as SynthSAEBench trains 4 096 of 16 384
L0S = (12, 10)  # ≈ the true L0 of the 1 024 most frequent features, and 0.8× it (the published 25 / 20)
RELU_L1 = "0.004,0.008"  # ReLU has no L0 target: L1 coefficients (--relu-l1), its attained L0 reported


def sh(cmd: list[str], log: Path) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    with log.open("a") as fh:
        fh.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        fh.flush()
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)
        fh.write(f"# {time.perf_counter() - t0:.0f} s\n")
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def done(out: Path, names: list[str]) -> bool:
    return all((out / n / "sae_weights.safetensors").exists() for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("gt"))
    ap.add_argument("--tokens", type=int, default=1_048_576, help="training samples per SAE")
    ap.add_argument("--store-tokens", type=int, default=2_097_152)
    ap.add_argument("--eval-samples", type=int, default=100_000)
    ap.add_argument("--lr", default="0.006",
                    help="Adam learning rate of every SAE (0.006: the best of 1e-3, 3e-3, 6e-3, 1e-2 for TopK at "
                         "524 288 samples, python benchmarks/synth_vs_saelens.py-style scan in docs/results.md)")
    ap.add_argument("--relu-l1", default=RELU_L1, help="comma-separated ReLU L1 coefficients")
    ap.add_argument("--only", choices=("store", "sweeps", "evaluate", "tables"), default=None)
    a = ap.parse_args()
    root = a.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "commands.log"
    store = root / "cpu.zarr"
    steps = [a.only] if a.only else ["store", "sweeps", "evaluate", "tables"]
    common = ["--store", str(store), "--batch-size", "1024", "--lr", a.lr, "--tokens", str(a.tokens),
              "--seeds", SEEDS, "--quiet"]
    cfg = root / "train.toml"
    cfg.write_text(f"d_sae = {D_SAE}\n")
    out_dirs = [root / f"k={k}" for k in L0S] + [root / "relu"]
    if "store" in steps and not (store / "zarr.json").exists():
        sh(["sae", "store", "synth", "synthsaebench-cpu", "--tokens", str(a.store_tokens), "--out", str(store)], log)
    if "sweeps" in steps:
        for k in L0S:
            out = root / f"k={k}"
            names = [f"{'topk' if p == 'none' else p}-init_seed={s}" for p in PENALTIES for s in SEEDS.split(",")]
            if not done(out, names):
                sh(["sae", "sweep", *common, "--config", str(cfg), "--arch", "topk", "--variants", ",".join(PENALTIES),
                    "--k", str(k), "--out", str(out), "--resume"], log)
            for arch in ARCHS:
                if not done(out, [f"{arch}-init_seed={s}" for s in SEEDS.split(",")]):
                    sh(["sae", "sweep", *common, "--config", str(cfg), "--arch", arch, "--variants", "none",
                        "--k", str(k), "--out", str(out), "--resume"], log)
        relu = root / "relu"
        l1s = a.relu_l1.split(",")
        if not done(relu, [f"relu-l1_coefficient={c}-init_seed={s}" for c in l1s for s in SEEDS.split(",")]):
            sh(["sae", "sweep", *common, "--config", str(cfg), "--arch", "relu", "--variants", "none",
                "--grid", f"l1_coefficient={a.relu_l1}", "--out", str(relu), "--resume"], log)
    if "evaluate" in steps:
        for out in out_dirs:
            runs = sorted(p for p in out.glob("*") if (p / "sae_weights.safetensors").exists()
                          and not (p / "eval_results" / "ground_truth.json").exists())
            if runs:
                sh(["sae", "evaluate", *map(str, runs), "--store", str(store), "--eval", "ground_truth,geometry",
                    "-p", f"ground_truth.n_samples={a.eval_samples}", "--quiet"], log)
    if "tables" in steps:
        tables(root, out_dirs, log)


def tables(root: Path, out_dirs: list[Path], log: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from sae.report.seeds import difference_table_markdown, plot_seed_means, seed_table_markdown

    parts = []
    for out in out_dirs:
        if not any(out.glob("*/eval_results/ground_truth.json")):
            continue
        parts += [f"### {out.name}", "", seed_table_markdown([out]), "Differences from the base (95 % Welch; "
                  "* = excludes 0):", "", difference_table_markdown([out]), ""]
        rep = root / "report"
        plot_seed_means([out], rep, "GT L0", "GT F1", f"{out.name}_f1_l0.png")
        plot_seed_means([out], rep, "GT expl. var.", "GT absorption", f"{out.name}_absorption_ev.png")
    (root / "tables.md").write_text("\n".join(parts))
    print(f"→ {root / 'tables.md'}; commands in {log}")


if __name__ == "__main__":
    main()
