#!/usr/bin/env bash
# The engine's GPU check, in one call on the lent GPU machine (H200, CUDA 13, PyTorch 2.11, no
# package registry): build the engine and tests/gpu/gpu_bench against the machine's own libtorch,
# check fp32/bf16/fp16 embeddings against the CPU fp32 reference (or PyTorch's goldens), measure
# faces/s for batch 1..512 and batch-1 latency, print a short table last. Results go to $OUT (or
# /tmp/gpu-out).
#
#   tests/gpu/device_check.sh --prepare   # here (Debian 12): fill .gpu-deps/ with the few Debian
#                                         # libraries the bench needs (abseil, protobuf,
#                                         # nlohmann-json, OpenSSL), unpacked, ≈25 MB
#   device run, carry [".gpu-deps"]:  bash tests/gpu/device_check.sh        (≈4-6 min)
#   tests/gpu/device_check.sh --dry-run --golden-dir DIR
#                                         # here: the same build path against Debian's CPU
#                                         # libtorch, and a tiny CPU run of the bench against
#                                         # PyTorch's embeddings of the golden r50 crops (ctest
#                                         # gpu_device_check_dry)
# Options: --build-dir DIR (default /tmp/arcface-gpu-build; the dry run: build/gpu-dry);
#          --golden-dir DIR: the goldens of tests/reference/make_goldens.py as the reference
#          (required by the dry run, where the other reference, the CPU engine, is the engine
#          under test; on the device the golden weights are too large to carry).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DEPS=$ROOT/.gpu-deps
MODE=device
BUILD=/tmp/arcface-gpu-build
GOLDEN=
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) MODE=prepare ;;
    --dry-run) MODE=dry; BUILD=$ROOT/build/gpu-dry ;;
    --build-dir) BUILD=$2; shift ;;
    --golden-dir) GOLDEN=$(cd "$2" && pwd); shift ;;
    *) echo "device_check.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done

if [ "$MODE" = prepare ]; then
  # The libraries' runtime and development packages, unpacked (never installed) into .gpu-deps.
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -q libabsl-dev libabsl20220623 libprotobuf-dev libprotobuf32 \
     libprotoc32 protobuf-compiler nlohmann-json3-dev libssl-dev libssl3)
  rm -rf "$DEPS" && mkdir -p "$DEPS"
  for f in "$tmp"/*.deb; do dpkg -x "$f" "$DEPS"; done
  rm -rf "$tmp" "$DEPS"/usr/share/doc "$DEPS"/usr/share/man "$DEPS"/usr/share/lintian \
    "$DEPS"/usr/lib/x86_64-linux-gnu/engines-3 "$DEPS"/usr/lib/x86_64-linux-gnu/ossl-modules
  find "$DEPS" -name '*.a' -delete
  du -sh "$DEPS"
  exit 0
fi

if [ "$MODE" = dry ] && [ -z "$GOLDEN" ]; then
  echo "device_check.sh: --dry-run needs --golden-dir (the reference it checks against)" >&2
  exit 2
fi
if [ "$MODE" = dry ]; then OUT=$BUILD/out; else OUT=${OUT:-/tmp/gpu-out}; fi
golden_flag=()
[ -n "$GOLDEN" ] && golden_flag=(--golden-dir="$GOLDEN")
mkdir -p "$OUT" "$BUILD"
JOBS=$(nproc)
START=$(date +%s)
log() { echo "[device_check $(( $(date +%s) - START ))s] $*"; }
# Seconds a step may take: at most $1, and never past TOTAL in all (on the device 570 s: the
# call's limit is 600 s, and what is under $OUT comes back even when a step is cut).
TOTAL=570
[ "$MODE" = dry ] && TOTAL=1100
budget() {
  local left=$(( TOTAL - ($(date +%s) - START) ))
  echo $(( left < $1 ? (left > 1 ? left : 1) : $1 ))
}

# The policy floor lets a CMake 4 read the carried packages' older config files.
cmake_args=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_POLICY_VERSION_MINIMUM=3.5)
if command -v ccache > /dev/null; then
  cmake_args+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
if [ -d "$DEPS/usr" ]; then
  # Carried Debian libraries: found here before any system copy, loaded from here at run time.
  lib=$DEPS/usr/lib/x86_64-linux-gnu
  export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  cmake_args+=(-Dabsl_DIR="$lib/cmake/absl"
               -Dnlohmann_json_DIR="$DEPS/usr/share/cmake/nlohmann_json"
               -DProtobuf_INCLUDE_DIR="$DEPS/usr/include"
               -DProtobuf_LIBRARY="$lib/libprotobuf.so"
               -DProtobuf_PROTOC_EXECUTABLE="$DEPS/usr/bin/protoc"
               -DOPENSSL_ROOT_DIR="$DEPS/usr"
               -DOPENSSL_INCLUDE_DIR="$DEPS/usr/include"
               -DOPENSSL_CRYPTO_LIBRARY="$lib/libcrypto.so")
  log "using carried libraries from $DEPS"
elif [ "$MODE" = device ]; then
  log "no .gpu-deps: run 'tests/gpu/device_check.sh --prepare' here and carry .gpu-deps"
  exit 2
fi

if [ "$MODE" = device ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
    | tee "$OUT/env.txt" || true
  TORCH_PREFIX=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
              "cudnn", torch.backends.cudnn.version())' | tee -a "$OUT/env.txt"
  cmake_args+=(-DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DTORCH_CUDA_ARCH_LIST=9.0)
  [ -d /usr/local/cuda ] && cmake_args+=(-DCUDAToolkit_ROOT=/usr/local/cuda)
fi

log "configure ($BUILD)"
rm -f "$BUILD/CMakeCache.txt"  # no library paths cached from a run with(out) .gpu-deps
set -o pipefail
cmake -S "$ROOT/tests/gpu" -B "$BUILD" "${cmake_args[@]}" > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
grep "arcface engine:" "$OUT/build.log" || true
if [ "$MODE" = device ] && ! grep -q "CUDA path ON" "$OUT/build.log"; then
  log "libtorch has no CUDA libraries: this would measure nothing"; tail -40 "$OUT/build.log"; exit 1
fi
log "build gpu_bench with $JOBS jobs"
timeout "$(budget 900)" cmake --build "$BUILD" --target gpu_bench -j "$JOBS" >> "$OUT/build.log" 2>&1 \
  || { tail -60 "$OUT/build.log"; exit 1; }
log "built"

BENCH=$BUILD/gpu_bench
if [ "$MODE" = dry ]; then
  # The bench's own logic on the CPU engine (bf16 is the CPU's reduced precision), tiny sizes.
  "$BENCH" --device=cpu --precisions=fp32,bf16 --batches=1 --max-batch=2 --check-crops=3 \
    --seconds=0.01 --latency-runs=1 --callers=2 --json="$OUT/gpu_bench.jsonl" "${golden_flag[@]}"
  exit $?
fi

status=0
log "bench: fp32, bf16, fp16 with CUDA graphs, 2 lanes"
timeout "$(budget 330)" "$BENCH" --device=cuda --precisions=fp32,bf16,fp16 --json="$OUT/gpu_bench.jsonl" \
  "${golden_flag[@]}" \
  2>&1 | tee "$OUT/gpu_bench.log" || status=1
if [ "$(budget 60)" -ge 60 ]; then
  # What the graphs give: the same engine run eagerly (fp16, a few sizes).
  log "bench: fp16 without graphs"
  timeout "$(budget 90)" "$BENCH" --device=cuda --precisions=fp16 --graphs=0 --batches=1,32,512 \
    --latency-runs=100 --json="$OUT/gpu_bench_eager.jsonl" > "$OUT/gpu_bench_eager.log" 2>&1 \
    || status=1
  tail -6 "$OUT/gpu_bench_eager.log"
fi
log "done (status $status); the graphs run:"
sed -n '/^engine on/,$p' "$OUT/gpu_bench.log"
exit $status
