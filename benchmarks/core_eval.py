"""Core evaluation of N SAEs: one pass over the held-out batches (``run_core_many``) vs N ``run_core`` calls.

Over the clean-log-prob memory budget (8 192 held-out tokens × Gemma 3's 262 144-token vocabulary
= 8 GiB of float32 against the 2 GiB default), a separate ``run_core`` per SAE recomputes the clean
forward for every batch: two LM passes per SAE. ``run_core_many`` computes it once per batch for
all SAEs: N + 1 passes instead of 2N. This script measures both side by side on the embedded model
with random TopK SAEs at the hook (the forward's cost does not depend on the SAE's weights),
checks that every metric is identical, and prints the wall-time ratio.

    python benchmarks/core_eval.py --saes 3 --tokens 1024
"""

from __future__ import annotations

import argparse
import time

import torch

from sae.evaluate.core import CoreConfig, compute_reference, resolve_config, run_core, run_core_many
from sae.model import load_model
from sae.rundir.sae import SAE


def random_saes(lm: object, n: int, layer: int, d_sae: int, k: int) -> list[SAE]:
    out = []
    for i in range(n):
        sae = SAE(lm.d_model, d_sae, activation="topk", k=k)
        sae.init_weights(torch.Generator().manual_seed(i))
        sae.cfg = {"model_name": lm.model_id, "model_weights": lm.model_weights,
                   "hook_name": f"blocks.{layer}.hook_resid_post", "hook_layer": layer,
                   "dataset_path": "embedded", "context_size": 128, "d_in": lm.d_model}
        out.append(sae)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saes", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=1024, help="held-out tokens")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--d-sae", type=int, default=5120)
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args()
    lm = load_model("embedded", "cpu", dtype=torch.float32)
    saes = random_saes(lm, args.saes, args.layer, args.d_sae, args.k)
    # budget 0: the regime of any realistic token count with a 262k vocabulary (see module doc)
    cfg = resolve_config(CoreConfig(n_eval_tokens=args.tokens, max_cached_logprob_gib=0.0, n_bootstrap=0),
                         saes[0].cfg)
    t0 = time.perf_counter()
    ref = compute_reference(lm, saes[0].cfg["hook_name"], cfg)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    separate = [run_core(s, lm, cfg, reference=ref) for s in saes]
    t_sep = time.perf_counter() - t0
    t0 = time.perf_counter()
    many = run_core_many(saes, lm, cfg, reference=ref)
    t_many = time.perf_counter() - t0
    same = all(a["metrics"] == b["metrics"] for a, b in zip(separate, many, strict=True))
    print(f"{args.saes} SAEs, {ref.n_tokens_total} held-out tokens (reference {t_ref:.1f} s, shared by both)")
    print(f"separate run_core calls: {t_sep:.1f} s ({t_sep / args.saes:.1f} s per SAE)")
    print(f"run_core_many:           {t_many:.1f} s ({t_many / args.saes:.1f} s per SAE)")
    print(f"speed-up: {t_sep / t_many:.2f}x (expected 2N/(N+1) = {2 * args.saes / (args.saes + 1):.2f}x); "
          f"metrics identical: {same}")
    if not same:
        raise SystemExit("error: run_core_many and run_core disagree")


if __name__ == "__main__":
    main()
