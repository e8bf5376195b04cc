#!/usr/bin/env bash
# Installs batchserve with its runtime dependencies only into a virtual environment, the way both
# container images do (deploy/docker/Dockerfile, Dockerfile.cuda), and optionally proves the
# result serves: CI runs this same script, so the images' install steps are tested without a
# container engine.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: install.sh [--gpu] [--venv DIR] [--wheel-dir DIR] [--python PY] [--constraints FILE]
                  [--example-model NAME PATH] [--self-test [MODEL]]

Create a virtual environment and install batchserve into it with its runtime dependencies only
(never onnx, the test or the benchmark extras).

  --gpu                  onnxruntime-gpu in place of onnxruntime (never both)
  --venv DIR             the environment to create (default /opt/venv); must not exist yet
  --wheel-dir DIR        install the batchserve wheel found in DIR; when DIR has none, build it
                         there from this source tree first (default: a temporary directory)
  --python PY            interpreter the environment is made from (default python3)
  --constraints FILE     the versions to install (default: constraints.txt in this source tree,
                         the lock that `make lock` writes); every dependency comes from it
  --example-model NAME PATH
                         also write the example model NAME (mlp, wide-mlp, resnet50) to PATH;
                         onnx, which builds it, goes into a throwaway environment, not DIR
  --self-test [MODEL]    then serve MODEL (default: the --example-model, else a generated mlp)
                         on 127.0.0.1 from the new environment, wait until ready, send one V2
                         infer request, stop it with SIGTERM and require exit status 0
  -h, --help             this text

pip's own settings apply too (PIP_INDEX_URL, ...).
EOF
}

die() {
  echo "install.sh: error: $*" >&2
  exit 1
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SOURCE="$(cd "$HERE/../.." && pwd)"
GPU=0
VENV=/opt/venv
WHEEL_DIR=""
PYTHON=python3
CONSTRAINTS="$SOURCE/constraints.txt"
EXAMPLE_NAME=""
EXAMPLE_PATH=""
SELF_TEST=0
TEST_MODEL=""

while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) GPU=1 ;;
    --venv) [ $# -ge 2 ] || die "--venv needs a directory"; VENV="$2"; shift ;;
    --wheel-dir) [ $# -ge 2 ] || die "--wheel-dir needs a directory"; WHEEL_DIR="$2"; shift ;;
    --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PYTHON="$2"; shift ;;
    --constraints) [ $# -ge 2 ] || die "--constraints needs a file"; CONSTRAINTS="$2"; shift ;;
    --example-model)
      [ $# -ge 3 ] || die "--example-model needs NAME and PATH"
      EXAMPLE_NAME="$2"; EXAMPLE_PATH="$3"; shift 2 ;;
    --self-test)
      SELF_TEST=1
      # The model is optional: take the next word unless it is another option.
      if [ $# -ge 2 ] && [ "${2#-}" = "$2" ]; then TEST_MODEL="$2"; shift; fi ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

[ -e "$VENV" ] && die "$VENV already exists: give a new --venv directory"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (--python)"
# Unpinned, a fresh install takes whatever is newest that day (a new onnxruntime, say): refuse.
[ -f "$CONSTRAINTS" ] || die "no constraints file at $CONSTRAINTS (--constraints; make lock writes it)"
CONSTRAINTS="$(cd "$(dirname "$CONSTRAINTS")" && pwd)/$(basename "$CONSTRAINTS")"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "batchserve needs Python >= 3.11; $PYTHON is $("$PYTHON" -V 2>&1)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
step() { echo "install.sh: $*"; }

step "creating $VENV with $("$PYTHON" -V 2>&1)"
if ! "$PYTHON" -m venv "$VENV" 2>"$WORK/venv.log"; then
  cat "$WORK/venv.log" >&2
  rm -rf "$VENV"
  # Debian and Ubuntu ship the venv module's pip bootstrap in a separate package.
  die "$PYTHON cannot create a virtual environment: install python3-venv (apt-get install python3-venv)"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
"${PIP[@]}" install -q --upgrade pip

if [ -z "$WHEEL_DIR" ]; then WHEEL_DIR="$WORK/wheels"; fi
mkdir -p "$WHEEL_DIR"
find_wheel() { find "$WHEEL_DIR" -maxdepth 1 -name 'batchserve-*.whl' | sort | tail -n 1; }
WHEEL="$(find_wheel)"
if [ -z "$WHEEL" ]; then
  step "building the batchserve wheel from $SOURCE"
  "${PIP[@]}" wheel -q --no-deps --wheel-dir "$WHEEL_DIR" "$SOURCE"
  WHEEL="$(find_wheel)"
  [ -n "$WHEEL" ] || die "no batchserve wheel was built in $WHEEL_DIR"
fi

# batchserve depends on onnxruntime, but GPU hosts need onnxruntime-gpu, which provides the same
# module: installing both leaves whichever was unpacked last. So the wheel goes in without its
# dependencies, and they are installed from its metadata with the runtime swapped.
step "installing $(basename "$WHEEL")"
"${PIP[@]}" install -q --no-deps "$WHEEL"
mapfile -t REQUIREMENTS < <("$VENV/bin/python" - "$GPU" <<'EOF'
import re
import sys
from importlib.metadata import requires

gpu = sys.argv[1] == "1"
for requirement in requires("batchserve") or []:
    if "extra ==" in requirement:
        continue  # optional groups (examples, test, bench, ...) never go into an image
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    if gpu and name and name.group(0).lower() == "onnxruntime":
        requirement = "onnxruntime-gpu" + requirement[name.end():]
    print(requirement)
EOF
)
step "installing the runtime dependencies: ${REQUIREMENTS[*]}, as pinned in $CONSTRAINTS"
"${PIP[@]}" install -q -c "$CONSTRAINTS" "${REQUIREMENTS[@]}"
# With --gpu, batchserve's own onnxruntime requirement is unmet on purpose (pip says so above);
# every other inconsistency fails the install.
if ! CHECK="$("${PIP[@]}" check 2>&1)"; then
  EXPECTED='^batchserve [^ ]+ requires onnxruntime(>=[^,]*)?, which is not installed\.$'
  if [ "$GPU" = 1 ]; then CHECK="$(grep -Ev "$EXPECTED" <<<"$CHECK" || true)"; fi
  [ -z "$CHECK" ] || die "pip check: $CHECK"
fi

"$VENV/bin/python" - "$GPU" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

import onnxruntime

gpu = sys.argv[1] == "1"
wanted, unwanted = ("onnxruntime-gpu", "onnxruntime") if gpu else ("onnxruntime", "onnxruntime-gpu")
try:
    version(unwanted)
except PackageNotFoundError:
    pass
else:
    sys.exit(f"install.sh: error: {unwanted} is installed beside {wanted}")
providers = onnxruntime.get_available_providers()
if gpu and "CUDAExecutionProvider" not in providers:
    sys.exit(f"install.sh: error: onnxruntime-gpu offers no CUDA provider: {providers}")
print(f"install.sh: {wanted} {version(wanted)}, providers {', '.join(providers)}")
EOF

# The images run with PYTHONDONTWRITEBYTECODE and a read-only root filesystem: compile now, once.
"$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib" >/dev/null
"$VENV/bin/batchserve" --help >/dev/null

# onnx builds example graphs but must not ship: it goes into a throwaway environment that sees
# the new one's packages through a .pth file, so pip adds only onnx and what it needs beyond them.
write_example() {
  local generator="$WORK/generator"
  if [ ! -d "$generator" ]; then
    "$PYTHON" -m venv "$generator"
    "$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))' \
      >"$("$generator/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/runtime.pth"
    "$generator/bin/python" -m pip --disable-pip-version-check --no-input install -q \
      -c "$CONSTRAINTS" 'onnx>=1.15'
  fi
  mkdir -p "$(dirname "$2")"
  "$generator/bin/python" -m batchserve example-model "$1" -o "$2"
}

if [ -n "$EXAMPLE_NAME" ]; then
  step "writing the example model $EXAMPLE_NAME to $EXAMPLE_PATH"
  write_example "$EXAMPLE_NAME" "$EXAMPLE_PATH"
fi

if [ "$SELF_TEST" = 1 ]; then
  if [ -z "$TEST_MODEL" ]; then
    TEST_MODEL="$EXAMPLE_PATH"
  fi
  if [ -z "$TEST_MODEL" ]; then
    TEST_MODEL="$WORK/self-test.onnx"
    write_example mlp "$TEST_MODEL"
  fi
  [ -f "$TEST_MODEL" ] || die "no model file at $TEST_MODEL (--self-test)"
  step "self-test: serving $TEST_MODEL from $VENV"
  "$VENV/bin/python" "$HERE/selftest.py" --venv "$VENV" "$TEST_MODEL"
fi
step "done: $VENV"
