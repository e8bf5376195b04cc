#!/usr/bin/env bash
# On the GPU machine, in the repository root: put onnxruntime-gpu and batchserve's
# dependencies on /tmp/site (from the parts and wheels carried there), then run the check.
#
#   bash benchmarks/gpu/device_run.sh [gpu_check.py flags]     # writes to $OUT
#
# onnxruntime-gpu: its parts arrive one transfer at a time (README.md); each call that
# runs this script copies whatever .ortgpu/part-* it carried to /tmp/ortgpu, and once
# .ortgpu/NAME is there too the parts are joined and installed. With no gpu_check.py flags
# and ONLY_INSTALL=1 it stops after installing (for the part-carrying calls).
set -euo pipefail
py=${PYTHON:-python3}
site=${SITE:-/tmp/site}
mkdir -p /tmp/ortgpu "$site"
if compgen -G ".ortgpu/part-*" > /dev/null; then
  cp .ortgpu/part-* /tmp/ortgpu/
fi
if [ ! -d "$site/onnxruntime" ] && [ -f .ortgpu/NAME ]; then
  wheel="/tmp/ortgpu/$(cat .ortgpu/NAME)"
  cat /tmp/ortgpu/part-* > "$wheel"
  "$py" -m pip install -q --no-index --no-deps --target "$site" "$wheel"
fi
if [ -d .gpudeps ] && [ ! -d "$site/aiohttp" ]; then
  "$py" -m pip install -q --no-index --no-deps --target "$site" .gpudeps/*.whl
fi
# onnxruntime.preload_dlls() looks for CUDA and cuDNN next to the onnxruntime package, which
# is $site here, where none are installed: give the loader the lib dirs of the machine's own
# nvidia-* packages (torch's CUDA 13 and cuDNN 9) instead.
nvlibs=$("$py" -c "import glob, os, nvidia; print(':'.join(d for p in nvidia.__path__ \
for d in sorted(glob.glob(os.path.join(p, '*', 'lib')))))" 2>/dev/null || true)
if [ -n "$nvlibs" ]; then
  export LD_LIBRARY_PATH="$nvlibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "LD_LIBRARY_PATH += $nvlibs"
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import onnxruntime as o; getattr(o, 'preload_dlls', lambda: None)(); \
print('onnxruntime', o.__version__, o.get_available_providers())"
if [ "${ONLY_INSTALL:-0}" = 1 ]; then
  ls /tmp/ortgpu
  exit 0
fi
exec "$py" benchmarks/gpu/gpu_check.py --out "${OUT:-/tmp/gpu-check}" "$@"
