#!/usr/bin/env bash
# Wheels of batchserve's pure-Python-side dependencies for the GPU machine (Python 3.12, no
# internet, no venv): downloaded here into .gpudeps/ (git-ignored), carried there, and
# installed with `pip install --no-index --no-deps --target /tmp/site .gpudeps/*.whl`.
#
# Run in the project's root:   bash benchmarks/gpu/prepare_deps.sh
#
# numpy is left out on purpose: the GPU machine has one that its torch and CuPy were built
# against, and a second copy on PYTHONPATH would shadow it. onnxruntime-gpu travels on its
# own (benchmarks/gpu/split_wheel.sh). The total stays under 30 MB (a transfer carries at
# most 64 MiB).
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
grep -qx '/.gpudeps/' .git/info/exclude 2>/dev/null || echo '/.gpudeps/' >> .git/info/exclude
mkdir -p .gpudeps
# --no-deps with the full list: the resolver would otherwise add numpy (through onnx).
packages=(
  # the server
  aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl idna
  uvloop orjson prometheus-client redis
  # the load generator's HTTP/1.1 response parser
  httptools
  # the gRPC front end (imported by every server) and the protocol's messages
  grpcio 'grpcio-health-checking>=1.81,<1.82' tritonclient python-rapidjson packaging
  # building the example models; --fp16 and the FP16 input variant convert with
  # onnxconverter-common
  onnx protobuf ml_dtypes typing_extensions onnxconverter-common
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  -d .gpudeps "${packages[@]}"
ls -l .gpudeps
echo "wheels: $(ls .gpudeps/*.whl | wc -l); total: $(du -sh .gpudeps | cut -f1)"
