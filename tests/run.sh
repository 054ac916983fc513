#!/usr/bin/env bash
# Installs what is missing, configures, builds, and runs every test (C++ via ctest, the Python
# reference's own tests, ONNX Runtime as the peer). Exits non-zero on any failure.
# Usage: tests/run.sh [ctest arguments, e.g. -R engine]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${ARCFACE_BUILD_DIR:-build}

deploy/install-deps.sh
if [[ ! -d tests/reference/node_modules/onnxruntime-node ]]; then
  # --ignore-scripts: the package's post-install step downloads extra binaries (unreachable
  # here); its CPU library for Linux x64 ships inside the package itself.
  (cd tests/reference && npm install --ignore-scripts --no-audit --no-fund --loglevel=error)
fi

cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DARCFACE_BUILD_TESTS=ON >/dev/null
cmake --build "$BUILD" -j"$(nproc)"
ctest --test-dir "$BUILD" --output-on-failure "$@"
