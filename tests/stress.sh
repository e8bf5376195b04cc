#!/usr/bin/env bash
# The full suite RUNS times in a row (default 5) while every core is kept busy by a CPU-bound
# process of its own: a test that leans on this machine's speed fails here. Stops at the first
# failing run, with its exit status; the busy processes are stopped by PID whatever happens.
#   tests/stress.sh [RUNS] [pytest arguments...]
set -euo pipefail
runs=${1:-5}
shift || true
python=${PYTHON:-.venv/bin/python}
cores=$(nproc)
hogs=()

stop_hogs() {
  for pid in "${hogs[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${hogs[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
trap stop_hogs EXIT

for _ in $(seq "$cores"); do
  "$python" -c "while True: pass" &
  hogs+=("$!")
done

for run in $(seq "$runs"); do
  echo "run $run of $runs, with $cores busy processes beside it (pids ${hogs[*]})"
  status=0
  "$python" -m pytest -q "$@" || status=$?
  if [ "$status" -ne 0 ]; then
    echo "run $run of $runs failed (exit status $status)" >&2
    exit "$status"
  fi
done
echo "$runs runs passed with every core busy"
