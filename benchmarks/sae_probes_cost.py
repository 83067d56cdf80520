"""What the whole sae-probes benchmark costs on this machine, measured by sampling.

For every dataset of the installed ``sae-probes`` package, the forward pass of ``--sample`` random
prompts (seeded) through the embedded model up to ``--layer`` is timed exactly as
``sae evaluate --eval sae_probes`` runs it (``evaluate.sae_probes.last_token_acts``), and scaled to
the dataset's size; the sum is the time to capture every dataset once (cached afterwards). The CPU
default set (``evaluate.sae_probes.CPU_DATASETS``) is summed separately. Token counts are exact.

    python benchmarks/sae_probes_cost.py --sample 16 --layer 6

Prints one line per dataset (prompts, tokens, estimated seconds) and the totals.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=16, help="prompts timed per dataset")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from sae_probes.utils_data import read_numbered_dataset_df

    from sae.evaluate import sae_probes as P
    from sae.evaluate.registry import EvalContext
    from sae.model import hook_name_for, load_model

    lm = load_model(None, device=args.device)
    ctx = EvalContext(lm=lm, hook_name=hook_name_for(args.layer), layer=args.layer, dataset="embedded",
                      context_size=1024, run_dir=Path("."), quiet=True)
    cfg = P.Config()
    rng = random.Random(args.seed)
    P.last_token_acts(ctx, ["warm-up"] * 4, cfg.max_seq_len, cfg.llm_batch_tokens, "warm-up")
    total_s = cpu_s = 0.0
    total_tok = cpu_tok = total_n = 0
    for name in P.all_datasets():
        prompts = [str(p) for p in read_numbered_dataset_df(name)["prompt"].tolist()]
        n_tok = sum(len(r) for r in P._prompt_ids(lm.tokenizer, prompts, cfg.max_seq_len))
        sample = rng.sample(prompts, min(args.sample, len(prompts)))
        t0 = time.perf_counter()
        P.last_token_acts(ctx, sample, cfg.max_seq_len, cfg.llm_batch_tokens, name)
        est = (time.perf_counter() - t0) * len(prompts) / len(sample)
        total_s, total_tok, total_n = total_s + est, total_tok + n_tok, total_n + len(prompts)
        if name in P.CPU_DATASETS:
            cpu_s, cpu_tok = cpu_s + est, cpu_tok + n_tok
        print(f"{name:45s} {len(prompts):6d} prompts {n_tok:10,d} tokens  ~{est:8.1f} s", flush=True)
    print(f"all {len(P.all_datasets())} datasets: {total_n:,} prompts, {total_tok:,} tokens, "
          f"estimated capture {total_s / 3600:.2f} h")
    print(f"cpu set ({len(P.CPU_DATASETS)} datasets): {cpu_tok:,} tokens, estimated capture {cpu_s / 60:.1f} min")


if __name__ == "__main__":
    main()
