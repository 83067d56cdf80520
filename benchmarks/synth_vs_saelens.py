"""Side by side on a synthetic store: our TopK / BatchTopK / JumpReLU / Matryoshka trainers against SAELens'
``SyntheticSAERunner`` with its corresponding training SAEs, same budget (samples, batch, lr, constant
schedule, width, k), ≥ 3 seeds; both scored by SAELens' own ``eval_sae_on_synthetic_data`` on the same
held-out samples (our ``ground_truth`` evaluation equals it, ``tests/test_ground_truth.py``).

    python benchmarks/synth_vs_saelens.py --store gt/cpu.zarr --samples 262144 --seeds 0,1,2 --json gt/vs_saelens.json

Prints per (library, architecture): F1 and MCC as mean ± 95 % t-interval over seeds, the Welch interval of
ours − theirs, and samples/s of each (wall time of the training call; SAELens generates its samples on
the fly, as its runner does; ours reads them from the store), with the ratio ours ÷ theirs measured
here, in this one run. Resumable: finished (library, arch, seed) results are kept in ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

ARCHS = ("topk", "batchtopk", "jumprelu", "matryoshka")


def saelens_cfg(arch: str, d_in: int, d_sae: int, k: int, widths: list[int], extra: dict | None = None):
    import sae_lens

    kw = {"d_in": d_in, "d_sae": d_sae, **(extra or {})}
    if arch == "topk":
        return sae_lens.TopKTrainingSAEConfig(k=k, **kw)
    if arch == "batchtopk":
        return sae_lens.BatchTopKTrainingSAEConfig(k=k, **kw)
    if arch == "jumprelu":
        return sae_lens.JumpReLUTrainingSAEConfig(target_l0=k, **kw)
    return sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(k=k, matryoshka_widths=widths, **kw)


def run_theirs(model, arch: str, seed: int, a) -> tuple[object, float]:
    from sae_lens import LoggingConfig
    from sae_lens.synthetic import SyntheticSAERunner, SyntheticSAERunnerConfig

    torch.manual_seed(seed)
    cfg = SyntheticSAERunnerConfig(synthetic_model=model.cfg, sae=saelens_cfg(arch, model.cfg.hidden_dim, a.d_sae,
                                                                               a.k, a.widths, a.theirs),
                                   training_samples=a.samples, batch_size=a.batch_size, lr=a.lr, device="cpu",
                                   output_path=None, checkpoint_path=None, eval_samples=0, run_final_eval=False,
                                   dead_feature_window=a.dead_window,
                                   logger=LoggingConfig(log_to_wandb=False))
    runner = SyntheticSAERunner(cfg, override_synthetic_model=model)
    t0 = time.perf_counter()
    sae = runner.run().sae
    return sae, time.perf_counter() - t0


def run_ours(store: str, arch: str, seed: int, a, out: Path) -> tuple[object, float]:
    import sae_lens

    from sae.train.config import TrainConfig
    from sae.train.run import train

    params = {"groups": ",".join(map(str, a.widths))} if arch == "matryoshka" else {}
    cfg = TrainConfig(store=store, arch=arch, variant="none", d_sae=a.d_sae, k=a.k, batch_size=a.batch_size,
                      tokens=a.samples, lr=a.lr, lr_warmup_steps=0, lr_decay_frac=0.0, normalize=False,
                      init_seed=seed, seed=seed, device="cpu", out=str(out), overwrite=True, variant_params=params,
                      **a.ours)
    t0 = time.perf_counter()
    run = train(cfg, quiet=True)
    dt = time.perf_counter() - t0
    return sae_lens.SAE.load_from_disk(str(run)), dt


def score(sae, model, n: int) -> dict:
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    from sae.synth.store import EVAL_STREAM, stream_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(0, EVAL_STREAM, 0))
        r = eval_sae_on_synthetic_data(sae, model.feature_dict, model.activation_generator, num_samples=n,
                                       batch_size=4096)
    return {"f1": r.classification.f1_score, "mcc": r.mcc, "ev": r.explained_variance, "l0": r.sae_l0,
            "uniqueness": r.uniqueness, "dead": r.dead_latents}


def t_ci(v: list[float]) -> tuple[float, float]:
    from scipy import stats

    m = sum(v) / len(v)
    if len(v) < 2:
        return m, math.nan
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return m, float(stats.t.ppf(0.975, len(v) - 1)) * sd / math.sqrt(len(v))


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    from scipy import stats

    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    se2 = va / len(a) + vb / len(b)
    if se2 == 0:
        return ma - mb, 0.0
    df = se2 ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    return ma - mb, float(stats.t.ppf(0.975, df)) * math.sqrt(se2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--samples", type=int, default=262_144)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--widths", default="128,256,512,1024")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--eval-samples", type=int, default=50_000)
    ap.add_argument("--dead-window", type=int, default=None,
                    help="SAELens dead_feature_window in steps (default: ours, 200 000 samples / batch; the "
                         "runner's own default is 1000 steps, longer than short runs, so AuxK never engages)")
    ap.add_argument("--theirs", type=json.loads, default={},
                    help="extra SAELens training-SAE config fields as JSON, e.g. '{\"decoder_init_norm\": 1.0}'")
    ap.add_argument("--ours", type=json.loads, default={},
                    help="extra TrainConfig fields as JSON, e.g. '{\"aux_k_coefficient\": 1.0}'")
    ap.add_argument("--libs", default="ours,saelens", help="which trainers to run (e.g. ours, for an lr scan)")
    ap.add_argument("--tag", default="", help="suffix of the result keys, so that variants sit beside the defaults")
    ap.add_argument("--json", type=Path, default=Path("vs_saelens.json"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/vs_saelens"))
    a = ap.parse_args()
    a.widths = [int(w) for w in a.widths.split(",")]
    if a.dead_window is None:
        a.dead_window = -(-200_000 // a.batch_size)  # our TrainConfig.dead_tokens, in steps
    from sae.store import ActivationStore
    from sae.synth.store import load_synthetic_model

    torch.set_num_threads(torch.get_num_threads())
    model = load_synthetic_model(ActivationStore(a.store))
    results = json.loads(a.json.read_text()) if a.json.exists() else {}
    for arch in a.archs.split(","):
        for seed in map(int, a.seeds.split(",")):
            for lib in a.libs.split(","):
                key = f"{lib}{a.tag}/{arch}/{seed}"
                if key in results:
                    continue
                if lib == "ours":
                    sae, dt = run_ours(a.store, arch, seed, a, a.work / f"{arch}-{seed}")
                else:
                    sae, dt = run_theirs(model, arch, seed, a)
                results[key] = {**score(sae, model, a.eval_samples), "seconds": dt, "samples": a.samples}
                print(key, json.dumps(results[key]), flush=True)
                a.json.write_text(json.dumps(results, indent=1))
    print(f"\n{a.samples} samples, batch {a.batch_size}, lr {a.lr} (constant), d_sae {a.d_sae}, k {a.k}, "
          f"SAELens dead_feature_window {a.dead_window} steps; ours {a.ours or 'defaults'}, SAELens "
          f"{a.theirs or 'defaults'}; "
          f"{a.eval_samples} held-out samples scored by sae_lens eval_sae_on_synthetic_data")
    print("| arch | F1 ours | F1 SAELens | Δ F1 (Welch) | MCC ours | MCC SAELens | Δ MCC (Welch) | L0 ours "
          "| L0 SAELens | samples/s ours | samples/s SAELens | ratio |")
    print("| --- |" + " ---: |" * 11)
    for arch in a.archs.split(","):
        row = {lib: [results[f"{lib}{a.tag}/{arch}/{s}"] for s in a.seeds.split(",")
                     if f"{lib}{a.tag}/{arch}/{s}" in results] for lib in ("ours", "saelens")}
        if not row["ours"] or not row["saelens"]:
            continue
        cells = [arch]
        for m in ("f1", "mcc"):
            o, t = [r[m] for r in row["ours"]], [r[m] for r in row["saelens"]]
            cells += [fmt(*t_ci(o)), fmt(*t_ci(t))]
            d, h = welch(o, t) if len(o) > 1 and len(t) > 1 else (sum(o) / len(o) - sum(t) / len(t), math.nan)
            cells.append(f"{d:+.4f} ± {h:.4f}" + (" *" if h == h and abs(d) > h else ""))
        cells += [fmt(*t_ci([r["l0"] for r in row["ours"]]), 2), fmt(*t_ci([r["l0"] for r in row["saelens"]]), 2)]
        so = sum(r["samples"] / r["seconds"] for r in row["ours"]) / len(row["ours"])
        st = sum(r["samples"] / r["seconds"] for r in row["saelens"]) / len(row["saelens"])
        cells += [f"{so:,.0f}", f"{st:,.0f}", f"{so / st:.2f}×"]
        print("| " + " | ".join(cells) + " |")


def fmt(m: float, h: float, digits: int = 4) -> str:
    return f"{m:.{digits}f}" + ("" if h != h else f" ± {h:.{digits}f}")


if __name__ == "__main__":
    main()
