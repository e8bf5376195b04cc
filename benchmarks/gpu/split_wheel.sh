#!/usr/bin/env bash
# The onnxruntime-gpu wheel (about 250 MB, cp312) in 50 MiB parts, for a GPU host without
# internet access that receives files in bounded transfers. Run in the project's root:
#   bash benchmarks/gpu/split_wheel.sh [VERSION]
# Writes .ortgpu/part-NN and .ortgpu/NAME (the wheel's file name); git-ignored.
set -euo pipefail
version=${1:-1.31.1}
top=$(git rev-parse --show-toplevel)
cd "$top"
grep -qx '/.ortgpu/' .git/info/exclude 2>/dev/null || echo '/.ortgpu/' >> .git/info/exclude
rm -rf .ortgpu && mkdir -p .ortgpu/whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  -d .ortgpu/whl "onnxruntime-gpu==$version"
wheel=$(ls .ortgpu/whl/*.whl)
basename "$wheel" > .ortgpu/NAME
split -b 50M -d "$wheel" .ortgpu/part-
rm -rf .ortgpu/whl
ls -l .ortgpu
