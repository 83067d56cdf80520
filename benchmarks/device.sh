#!/usr/bin/env bash
# GPU checks of issues 11, 29 and 30 in one script, for a CUDA machine (under 8 minutes for 1–3, then the optional
# SynthSAEBench-16k step 4 (≤ 10 minutes) on one H100/H200):
#   1. the CUDA tests (`pytest -m cuda`): pinned/non-blocking loader with on-GPU dequantisation,
#      sync-free TopK step (torch.cuda.set_sync_debug_mode("error")), bf16 autocast;
#   2. benchmarks/scale.py at full size (gemma-2-2b shapes, random weights) →
#      benchmarks/results/<date>-<gpu>.json (and a copy in $OUT when set, as the device tool returns it);
#   3. torch.compile of the step at d_sae 16 384 (fp32), interleaved with eager → <date>-<gpu>-compile.json.
# Run from anywhere:  bash benchmarks/device.sh
# Packages the GPU image lacks (zarr, numcodecs, donfig, google-crc32c) travel as wheels in .whl/
# (make them here with `bash benchmarks/device_wheels.sh`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import sae.train" 2>/dev/null; then  # the repo root is the package: expose it as `sae`
  mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/sae
  export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
out="benchmarks/results/$(date +%F)-$gpu.json"
mkdir -p benchmarks/results
status=0
timeout 180 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_scale.py 2>&1 | tee /tmp/cuda-tests.log || status=1
timeout 330 "$PY" benchmarks/scale.py --json "$out" 2>&1 | tee /tmp/scale.log || status=1
comp="${out%.json}-compile.json"  # optional: a failure here does not fail the script
timeout 120 "$PY" benchmarks/scale.py --skip harvest,read,sweep --compile --step-shape 2304,16384,64,4096 \
  --json "$comp" 2>&1 | tee /tmp/compile.log || true
# 4. SynthSAEBench-16k (issue 29): the published model on the GPU, BatchTopK, Matryoshka and ortsae on
#    BatchTopK at the published width 4096, k 25, batch 1024, lr 3e-4, bf16 autocast, on as many samples as
#    the budget allows (2M here; the paper trains on 200M), scored by --eval ground_truth on 50k held-out
#    samples. Compare with the table in docs/results.md ("Ground truth", published column). Optional.
synth_log=/tmp/synth16k.log
if ! "$PY" -c "import sae_lens.synthetic" 2>/dev/null; then
  echo "step 4 skipped: sae_lens (the synth extra) is not importable on this image" | tee "$synth_log"
else ( set -e
  echo 'd_sae = 4096' > /tmp/d4096.toml
  timeout 150 "$PY" -m sae store synth synthsaebench-16k --device cuda --tokens 2097152 --dtype bfloat16 --codec none \
    --chunk-tokens 65536 --out /tmp/synth16k.zarr --overwrite
  for arch in batchtopk matryoshka; do
    v=none; [ "$arch" = batchtopk ] && v=none,ortsae
    timeout 150 "$PY" -m sae sweep --store /tmp/synth16k.zarr --config /tmp/d4096.toml --arch "$arch" --variants "$v" \
      --k 25 --batch-size 1024 --lr 3e-4 --tokens 2097152 --autocast bf16 --device cuda --quiet \
      --out "/tmp/synth16k-runs/$arch"
  done
  timeout 240 "$PY" -m sae evaluate /tmp/synth16k-runs/*/* --store /tmp/synth16k.zarr --eval ground_truth \
    -p ground_truth.n_samples=50000 --quiet
  "$PY" - <<'PY'
import glob, json
for f in sorted(glob.glob("/tmp/synth16k-runs/*/*/eval_results/ground_truth.json")):
    m = json.load(open(f))["eval_result_metrics"]
    print(f.split("/")[3], f.split("/")[4], "F1 %.4f MCC %.4f uniq %.4f EV %.4f L0 %.1f absorption %.4f" % (
        m["classification"]["f1_score"], m["recovery"]["mcc"], m["recovery"]["uniqueness"],
        m["reconstruction"]["explained_variance"], m["sparsity"]["sae_l0"], m["absorption"]["absorption_rate"]))
PY
) 2>&1 | tee "$synth_log" || true
fi
# 5. Distributed sweep (issue 30): 4 SAEs on the step-4 store, local against --workers auto (one dask worker
#    per visible GPU, each pinned to its GPU), weights compared. Optional; needs the step-4 store.
sweep_log=/tmp/sweep-workers.log
if [ -e /tmp/synth16k.zarr/zarr.json ]; then
  timeout 200 "$PY" benchmarks/sweep_workers.py --store /tmp/synth16k.zarr --device cuda --workers auto --configs 4 \
    --tokens 1048576 --batch-size 1024 --expansion 4 2>&1 | grep -v "distributed\." | tee "$sweep_log" || true
else
  echo "step 5 skipped: no step-4 store" | tee "$sweep_log"
fi
# 6. Data-parallel training of one SAE (issue 30): 1 process against --nproc <GPUs> (NCCL, one rank per GPU) on the
#    step-4 store, tokens/s and the weights' difference. Optional; needs the step-4 store and ≥ 2 GPUs.
ddp_log=/tmp/ddp.log
ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ -e /tmp/synth16k.zarr/zarr.json ] && [ "$ngpu" -ge 2 ]; then
  timeout 200 "$PY" benchmarks/ddp.py --store /tmp/synth16k.zarr --device cuda --nproc "1,$ngpu" --tokens 4194304 \
    --batch-size 4096 --expansion 4 --k 25 2>&1 | tee "$ddp_log" || true
else
  echo "step 6 skipped: needs the step-4 store and at least 2 GPUs ($ngpu visible)" | tee "$ddp_log"
fi
if [ -n "${OUT:-}" ]; then cp -f "$out" "$comp" /tmp/cuda-tests.log /tmp/scale.log /tmp/compile.log "$synth_log" "$sweep_log" "$ddp_log" "$OUT"/ 2>/dev/null || true; fi
echo "results: $out"
exit $status
