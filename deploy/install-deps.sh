#!/usr/bin/env bash
# Installs every Debian package (and the npm peer used by tests/benchmarks) that the build, the
# tests and the tools need. Idempotent: when everything is present it only checks and returns.
# Usage: deploy/install-deps.sh [--runtime-only]
set -euo pipefail

BUILD_PKGS=(
  build-essential cmake ninja-build pkg-config git ca-certificates curl
  libtorch-dev                     # the model runtime (libtorch, CPU build)
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libopencv-dev                    # decode, crop, align
  opencv-data                      # Haar cascades for arcface-client detect
  libspdlog-dev libfmt-dev         # logging
  nlohmann-json3-dev               # safetensors header, JSON output
  libcli11-dev                     # flags
  libcpp-httplib-dev               # /metrics, /healthz
  libssl-dev                       # SHA-256 of the weights
  libgtest-dev libgmock-dev libbenchmark-dev
)
TEST_PKGS=(
  python3 python3-torch python3-numpy python3-grpcio python3-opencv
  python3-pytest nodejs prometheus openssl
)

want=("${BUILD_PKGS[@]}")
[[ ${1:-} == --runtime-only ]] || want+=("${TEST_PKGS[@]}")

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Debian's nodejs lacks npm, which is its own package; a NodeSource nodejs carries npm itself.
if [[ ${1:-} != --runtime-only ]] && ! command -v npm >/dev/null; then missing+=(npm); fi

if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}" >&2
  if [[ $(id -u) -ne 0 ]]; then
    SUDO=sudo
    command -v sudo >/dev/null || { echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  else
    SUDO=
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! $SUDO apt-get update -qq || ! $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    echo "install-deps: apt-get could not install: ${missing[*]}" >&2
    echo "install-deps: this project needs Debian 12 (bookworm) with its main archive reachable." >&2
    exit 1
  fi
fi
