#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels benchmarks/device.sh needs on the GPU image
# (Python 3.12, manylinux x86_64), into .whl/ (git-ignored; it travels with the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for spec in zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$spec"
done
ls -la .whl
