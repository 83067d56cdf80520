#!/usr/bin/env bash
# GPU checks of issue 11 in one script, for a CUDA machine (under 8 minutes on one H100/H200):
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
if [ -n "${OUT:-}" ]; then cp -f "$out" "$comp" /tmp/cuda-tests.log /tmp/scale.log /tmp/compile.log "$OUT"/ 2>/dev/null || true; fi
echo "results: $out"
exit $status
