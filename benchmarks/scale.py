"""Production-scale throughput with random weights (no download): harvest, store read, training
step, one-stream sweep, and how the read rate compares with what training consumes.

    python benchmarks/scale.py --small            # 1-1.5 min on 2 CPU cores (CI runs it as a smoke test)
    python benchmarks/scale.py --json out.json    # full size: gemma-2-2b shapes (for a GPU; see device.sh)

Parts (every number measured in this one run, side by side):

1. **harvest** of layer ``L`` of a randomly initialised Gemma 2 model at gemma-2-2b's sizes (d_model 2304,
   8 heads of 256, 4 KV heads, MLP 9216, vocab 256 000; layers after ``L`` = 12 are never run, so only
   13 are built), bf16 on CUDA and fp32 on CPU, as tokens/s and as a ratio to the bare forward
   stopped after layer ``L`` (the work any harvester must do). The corpus is the Python standard
   library's own source (present on every machine) with a byte-level BPE tokenizer trained on it
   in a few seconds; token ids only index the embedding, so the FLOPs are those of gemma-2-2b.
2. **read**: the shuffled loader over the harvested store (bf16, Blosc-zstd) with 1, 2, 4 … N decode
   threads, tokens/s: the median of 3 interleaved rounds, and the N-vs-1 speedup paired by round.
3. **step**: one TopK training step (no dead latents, then 10 % dead so AuxK runs) at ``d_in``,
   ``d_sae`` ∈ {16 384, 65 536}, ``k`` 64, ``B`` 4096, in tokens/s; its counted FLOPs
   (``2·B·d_in·d_sae`` for the encoder GEMM plus ``10·B·k·d_in`` for the sparse encoder backward
   and the decoder forward/backward) per second, as a fraction of the measured dense GEMM rate of
   the same ``[B, d_in] × [d_in, d_sae]`` product ("executed-FLOP ratio"); the AuxK cost as the
   step time with 10 % dead latents ÷ without; fp32, and on CUDA also ``--autocast bf16`` against the bf16 GEMM rate.
   Both ratios are paired within each of 3 rounds (step, GEMM, dead step) and printed as the median
   with every round's value: on a shared 2-core machine one round alone can be off by 20 %.
4. **sweep**: 8 TopK SAEs trained from one stream (``train_many``) vs the same 8 trained one after
   another: wall time, store bytes decoded, and the per-SAE throughput ratio.
5. **read ÷ demand**: read rate at N threads ÷ the single-SAE training rate of part 3.

``--small`` keeps d_model 2304 but builds one layer with a 2304-wide MLP and trains small SAEs
(d_sae 4096/8192, k 32, B 2048), to run in 1-1.5 min on this CPU. Results print as lines and,
with ``--json``, as one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stream_timing import stream_tokens_per_s  # benchmarks/ (this script's folder is on sys.path)
from sweep import one_pass_vs_separate  # benchmarks/sweep.py

from sae.harvest.corpus import iter_documents
from sae.harvest.harvest import HarvestConfig, harvest
from sae.harvest.tokens import pack_sequences
from sae.model import LoadedModel, capture_resid_post, hook_name_for, weights_fingerprint
from sae.store import ActivationStore, ShuffledBatches
from sae.train.config import TrainConfig
from sae.train.host_memory import keep_freed_memory
from sae.train.trainer import Trainer

FULL = dict(d_model=2304, layers=13, layer=12, heads=8, kv_heads=4, head_dim=256, mlp=9216, vocab=256_000,
            harvest_tokens=262_144, context=1024, harvest_batch=16, d_sae=[16_384, 65_536], k=64, batch=4096,
            step_repeats=10, step_rounds=3, step_warmup=10, gemm_repeats=5,
            read_batches=128, read_warmup=8, read_rounds=3,
            sweep_d_sae=16_384, sweep_steps=24, chunk_tokens=16_384)
SMALL = dict(d_model=2304, layers=1, layer=0, heads=8, kv_heads=4, head_dim=256, mlp=2304, vocab=4096,
             harvest_tokens=8192, context=128, harvest_batch=16, d_sae=[4096, 8192], k=32, batch=2048,
             step_repeats=2, step_rounds=3, step_warmup=5, gemm_repeats=3,
             read_batches=48, read_warmup=8, read_rounds=3,
             sweep_d_sae=1024, sweep_steps=4, chunk_tokens=1024)
"""``--small``: gemma-2-2b's width (so the store read is at d_model 2304) but one layer with a
2304-wide MLP, and small SAEs: 1-1.5 min on 2 CPU cores."""


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n: int, dev: torch.device, warmup: int = 1) -> float:
    """Median seconds per call over ``n`` calls (after ``warmup``), device-synchronised."""
    for _ in range(warmup):
        fn()
    sync(dev)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def corpus_dir(root: Path, max_files: int = 400) -> Path:
    """Python standard-library sources as .txt files (a corpus every machine has)."""
    src = Path(sysconfig.get_paths()["stdlib"])
    out = root / "corpus"
    out.mkdir()
    for i, f in enumerate(sorted(src.glob("*.py"))[:max_files]):
        (out / f"{i:04d}_{f.stem}.txt").write_text(f.read_text(encoding="utf-8", errors="replace"))
    return out


def build_model(s: dict[str, Any], corpus: Path, dev: torch.device) -> LoadedModel:
    """A random-weight Gemma 2 of the given sizes and a BPE tokenizer trained on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [d.text for d in itertools.islice(iter_documents(str(corpus), "all"), 200)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=min(4096, s["vocab"]), show_progress=False,
                                                       special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                     unk_token="<unk>")
    cfg = Gemma2Config(vocab_size=s["vocab"], hidden_size=s["d_model"], intermediate_size=s["mlp"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                       num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
                       max_position_embeddings=max(8192, s["context"]), bos_token_id=hf_tok.bos_token_id,
                       eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(dev):
        model = Gemma2ForCausalLM(cfg).to(dtype).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=hf_tok, model_id="random-gemma2", fingerprint=weights_fingerprint(model),
                       device=dev)


def bench_harvest(s: dict[str, Any], lm: LoadedModel, corpus: Path, out: Path, repeats: int) -> dict[str, Any]:
    L, ctx, bs = s["layer"], s["context"], s["harvest_batch"]
    n_seq = s["harvest_tokens"] // ctx
    docs = (d.text for d in iter_documents(str(corpus), "train"))
    seqs = np.stack(list(itertools.islice(pack_sequences(itertools.cycle(list(docs)), lm.tokenizer, ctx,
                                                         lm.bos_token_id), n_seq)))

    def bare() -> None:
        with torch.no_grad():
            for i in range(0, n_seq, bs):
                capture_resid_post(lm.model, torch.from_numpy(seqs[i:i + bs]).long().to(lm.device), [L])

    stores: list[Path] = []

    def run_harvest() -> None:
        path = out / f"h{len(stores)}.zarr"
        cfg = HarvestConfig(layers=[L], tokens=n_seq * ctx, context_size=ctx, batch_size=bs, dataset=str(corpus),
                            out=str(path), device=str(lm.device), chunk_tokens=s["chunk_tokens"])
        harvest(cfg, loaded=lm, quiet=True)
        stores.append(path)

    bare()  # warm-up (kernels, allocator)
    bares, harvests = [], []
    for _ in range(repeats):  # interleaved pairs: a slow phase of the machine hits both
        bares.append(timed(bare, 1, lm.device, warmup=0))
        harvests.append(timed(run_harvest, 1, lm.device, warmup=0))
    tokens = n_seq * ctx
    ratios = [b / h for b, h in zip(bares, harvests, strict=True)]
    return {"tokens": tokens, "layer": L, "bare_tokens_per_s": tokens / statistics.median(bares),
            "harvest_tokens_per_s": tokens / statistics.median(harvests), "ratio_to_bare": statistics.median(ratios),
            "store": str(stores[-1])}


def bench_read(store_path: str, s: dict[str, Any], dev: torch.device) -> dict[str, Any]:
    """Shuffled-read tokens/s with 1, 2, 4 … N decode threads, in ``read_rounds`` interleaved rounds
    (1, 2, …, N, 1, 2, …): a slow phase of the machine then hits every thread count, and the N-vs-1
    ratio is paired within a round. Each measurement first drains the loader's read-ahead
    (``read_warmup`` batches), so it times decoding, not the queue filled before the clock started."""
    store = ActivationStore(store_path)
    hook = hook_name_for(s["layer"])
    n = os.cpu_count() or 1
    counts = sorted({1, *[2 ** i for i in range(1, 8) if 2 ** i < n], n})
    per: dict[int, list[float]] = {w: [] for w in counts}
    for _ in range(s["read_rounds"]):
        for w in counts:
            it = iter(ShuffledBatches(store, hook, s["batch"], seed=1, device=dev, read_workers=w))
            per[w].append(stream_tokens_per_s(it, s["read_batches"], s["batch"], s["read_warmup"], lambda: sync(dev)))
            it.close()
    top = counts[-1]
    paired = [a / b for a, b in zip(per[top], per[1], strict=True)]
    return {"d_model": store.d_model, "codec": f"{store.attrs['codec']} {store.attrs['dtype']}",
            "batch": s["batch"], "rounds": s["read_rounds"],
            "tokens_per_s": {w: statistics.median(v) for w, v in per.items()},
            "tokens_per_s_rounds": per, "max_threads": top,
            "speedup_max_vs_1": statistics.median(paired), "speedup_max_vs_1_rounds": paired}


def step_flops(B: int, d_in: int, d_sae: int, k: int) -> float:
    """Counted FLOPs of one TopK step: the dense encoder GEMM plus the sparse encoder backward
    (2 products) and decoder forward/backward (3 products) over ``B·k`` entries."""
    return 2.0 * B * d_in * d_sae + 10.0 * B * k * d_in


def gemm_rate(B: int, d_in: int, d_sae: int, dtype: torch.dtype, dev: torch.device, repeats: int = 5) -> float:
    a = torch.randn(B, d_in, device=dev, dtype=dtype)
    b = torch.randn(d_in, d_sae, device=dev, dtype=dtype)
    t = timed(lambda: a @ b, repeats, dev)
    return 2.0 * B * d_in * d_sae / t


def bench_step(s: dict[str, Any], dev: torch.device) -> list[dict[str, Any]]:
    """The TopK step at each shape, in ``step_rounds`` rounds of (dead-free step, dense GEMM rate,
    step with 10 % dead latents), each a median over ``step_repeats`` calls. The first round first
    runs ``step_warmup`` untimed steps: a fresh trainer's first steps fault in its buffers (with 2,
    the first round's executed-FLOP ratio was 0.45–0.54 against 0.60–0.63 for the later ones). The
    executed-FLOP ratio and the AuxK cost are paired within a round (a slow phase of the machine
    hits both sides) and reported as the median over rounds, with every round's value beside it."""
    D, B, k = s.get("step_d_in", s["d_model"]), s["batch"], s["k"]
    rows = []
    modes = ["none", "bf16"] if dev.type == "cuda" else ["none"]
    for F in s["d_sae"]:
        for mode in modes:
            tr = Trainer(TrainConfig(d_sae=F, k=k, batch_size=B, autocast=mode), d_in=D, total_steps=10**6, device=dev)
            tr.cfg.dead_tokens = 10**12
            xs = [torch.randn(B, D, device=dev) for _ in range(2)]
            i = itertools.count()
            n_dead = F // 10
            flops = step_flops(B, D, F, k)

            def clean_step(tr=tr, xs=xs, i=i) -> None:
                tr.step(xs[next(i) % 2], sync=False)

            def dead_step(tr=tr, xs=xs, i=i, n_dead=n_dead) -> None:  # 10 % of the latents dead: AuxK on
                tr.tokens_since_fired.zero_()
                tr.tokens_since_fired[:n_dead] = 2 * 10**12
                tr.step(xs[next(i) % 2], sync=False)

            t_clean, rates, t_dead = [], [], []
            for _ in range(s["step_rounds"]):
                tr.tokens_since_fired.zero_()
                tr.refresh_aux_capacity()  # no dead latent: AuxK off
                t_clean.append(timed(clean_step, s["step_repeats"], dev, warmup=1 if t_clean else s["step_warmup"]))
                rates.append(gemm_rate(B, D, F, torch.bfloat16 if mode == "bf16" else torch.float32, dev,
                                       s["gemm_repeats"]))
                tr.tokens_since_fired[:n_dead] = 2 * 10**12
                tr.refresh_aux_capacity()
                t_dead.append(timed(dead_step, s["step_repeats"], dev, warmup=1))
            ratios = [flops / t / r for t, r in zip(t_clean, rates, strict=True)]
            aux = [d / t for d, t in zip(t_dead, t_clean, strict=True)]
            t = statistics.median(t_clean)
            rows.append({"d_in": D, "d_sae": F, "k": k, "batch": B, "autocast": mode, "rounds": s["step_rounds"],
                         "step_s": t, "tokens_per_s": B / t, "flops_per_s": flops / t,
                         "gemm_flops_per_s": statistics.median(rates),
                         "executed_flop_ratio": statistics.median(ratios), "executed_flop_ratio_rounds": ratios,
                         "step_s_10pct_dead": statistics.median(t_dead),
                         "auxk_cost_ratio": statistics.median(aux), "auxk_cost_ratio_rounds": aux})
            if s.get("compile") and mode == "none":
                rows[-1].update(compiled_step(tr, xs, s["step_repeats"], dev))
            del tr
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def compiled_step(tr: Trainer, xs: list[torch.Tensor], repeats: int, dev: torch.device) -> dict[str, Any]:
    """``torch.compile`` of the step's forward and loss (``Trainer.losses``) against the same trainer
    eager, interleaved step by step (after the compile): ``{"compiled_step_s", "eager_step_s",
    "compile_speedup"}`` (eager ÷ compiled, > 1 = compile helps) and the compile time."""
    tr.tokens_since_fired.zero_()
    tr.refresh_aux_capacity()  # dead-free, as the main measurement
    eager = tr.losses
    compiled = torch.compile(eager)
    t0 = time.perf_counter()
    tr.losses = compiled
    for i in range(2):
        tr.step(xs[i % 2], sync=False)
    sync(dev)
    compile_s = time.perf_counter() - t0
    te, tc = [], []
    for i in range(repeats):
        for fn, acc in ((eager, te), (compiled, tc)):
            tr.losses = fn
            sync(dev)
            t1 = time.perf_counter()
            tr.step(xs[i % 2], sync=False)
            sync(dev)
            acc.append(time.perf_counter() - t1)
    tr.losses = eager
    e, c = statistics.median(te), statistics.median(tc)
    return {"compiled_step_s": c, "eager_step_s": e, "compile_speedup": e / c, "compile_s": compile_s}


def bench_sweep(store_path: str, s: dict[str, Any], dev: torch.device, out: Path) -> dict[str, Any]:
    B = s["batch"]
    base = TrainConfig(store=store_path, d_sae=s["sweep_d_sae"], batch_size=B, tokens=B * s["sweep_steps"],
                       device=str(dev), log_every=10**6, checkpoint_every=10**6)
    cfgs = [dataclasses.replace(base, lr=lr, out=str(out / f"sweep/lr{lr}")) for lr in
            (1e-4, 2e-4, 3e-4, 5e-4, 7e-4, 1e-3, 2e-3, 3e-3)]
    sweep_s, sweep_bytes, alone_s, alone_bytes = one_pass_vs_separate(cfgs, "/sweep/", "/alone/")
    return {"n_saes": len(cfgs), "d_sae": s["sweep_d_sae"], "tokens_per_sae": base.tokens,
            "sweep_wall_s": sweep_s, "separate_wall_s": alone_s, "sweep_bytes_read": sweep_bytes,
            "separate_bytes_read": alone_bytes,
            # per-SAE throughput of the sweep ÷ that of one run = (8 runs' time) ÷ (sweep time)
            "per_sae_throughput_ratio": alone_s / sweep_s}


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="small shapes: 1-1.5 min on a 2-core CPU")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved (bare, harvest) pairs")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: harvest,read,step,sweep")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--compile", action="store_true", help="also time the fp32 step with torch.compile(Trainer.losses)")
    ap.add_argument("--step-shape", default=None, help="D_IN,D_SAE,K,BATCH: time the step at this one shape "
                                                         "(e.g. 640,5120,32,4096; the other parts still run)")
    a = ap.parse_args()
    s = dict(SMALL if a.small else FULL)
    if a.step_shape:
        d_in, d_sae, k, b = (int(v) for v in a.step_shape.split(","))
        s.update(step_d_in=d_in, d_sae=[d_sae], k=k, batch=b)
    s["compile"] = a.compile
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    skip = {p.strip() for p in a.skip.split(",") if p.strip()}
    if dev.type == "cpu":
        keep_freed_memory()  # as `sae train` does on the CPU
    res: dict[str, Any] = {"mode": "small" if a.small else "full", "device": str(dev),
                           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "torch": torch.__version__, "python": platform.python_version(),
                           "date": time.strftime("%Y-%m-%d"), "shapes": s}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = corpus_dir(root)
        lm = build_model(s, corpus, dev)
        if "harvest" in skip:
            cfg = HarvestConfig(layers=[s["layer"]], tokens=s["harvest_tokens"], context_size=s["context"],
                                batch_size=s["harvest_batch"], dataset=str(corpus), out=str(root / "h.zarr"),
                                device=str(dev), chunk_tokens=s["chunk_tokens"])
            harvest(cfg, loaded=lm, quiet=True)
            store = str(root / "h.zarr")
        else:
            h = bench_harvest(s, lm, corpus, root, a.repeats)
            store = h.pop("store")
            res["harvest"] = h
            print(f"harvest L{h['layer']} ({lm.model.config.hidden_size}-d, {dev}): {h['harvest_tokens_per_s']:,.0f} "
                  f"tokens/s; bare forward {h['bare_tokens_per_s']:,.0f} tokens/s; ratio {h['ratio_to_bare']:.2f}")
        del lm
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if "read" not in skip:
            r = bench_read(store, s, dev)
            res["read"] = r
            rates = r["tokens_per_s"]
            print(f"store read ({r['codec']}, d_model {r['d_model']}, median of {r['rounds']} interleaved rounds): " +
                  ", ".join(f"{w} thread(s) {v:,.0f} tokens/s" for w, v in rates.items()) +
                  f"; {r['max_threads']} vs 1 thread, paired by round: {r['speedup_max_vs_1']:.2f}x "
                  f"(rounds: {_fmt(r['speedup_max_vs_1_rounds'])})")
        if "step" not in skip:
            res["step"] = bench_step(s, dev)
            for row in res["step"]:
                print(f"TopK step d_in {row['d_in']} d_sae {row['d_sae']} k {row['k']} B {row['batch']} autocast "
                      f"{row['autocast']}: {row['tokens_per_s']:,.0f} tokens/s, "
                      f"{row['flops_per_s'] / 1e9:,.1f} GFLOP/s "
                      f"= {row['executed_flop_ratio']:.2f} of the measured GEMM rate "
                      f"({row['gemm_flops_per_s'] / 1e9:,.1f} GFLOP/s; "
                      f"rounds: {_fmt(row['executed_flop_ratio_rounds'])}); "
                      f"with 10 % dead latents (AuxK) {row['auxk_cost_ratio']:.2f}x the step "
                      f"(rounds: {_fmt(row['auxk_cost_ratio_rounds'])})")
                if "compile_speedup" in row:
                    print(f"  torch.compile(Trainer.losses): {row['compiled_step_s'] * 1e3:.1f} ms vs eager "
                          f"{row['eager_step_s'] * 1e3:.1f} ms per step (interleaved): {row['compile_speedup']:.2f}x "
                          f"(compile {row['compile_s']:.0f} s)")
        if "read" in res and "step" in res:
            best = max(res["read"]["tokens_per_s"].values())
            res["read_over_demand"] = {f"{r['d_sae']}/{r['autocast']}": best / r["tokens_per_s"] for r in res["step"]}
            print("read rate / training demand: " + ", ".join(f"d_sae {k}: {v:.2f}"
                                                              for k, v in res["read_over_demand"].items()))
        if "sweep" not in skip:
            sw = bench_sweep(store, s, dev, root)
            res["sweep"] = sw
            print(f"sweep of {sw['n_saes']} SAEs (d_sae {sw['d_sae']}) from one stream: {sw['sweep_wall_s']:.1f} s, "
                  f"{sw['sweep_bytes_read'] / 1e6:,.1f} MB decoded; {sw['n_saes']} separate runs: "
                  f"{sw['separate_wall_s']:.1f} s, {sw['separate_bytes_read'] / 1e6:,.1f} MB; per-SAE throughput "
                  f"ratio {sw['per_sae_throughput_ratio']:.2f}x")
    res["wall_s"] = time.perf_counter() - t_all
    print(f"total {res['wall_s']:.0f} s")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
