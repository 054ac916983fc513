#!/usr/bin/env bash
# The engine's GPU check, in one call on the lent GPU machine (H200, CUDA 13, PyTorch 2.11, no
# package registry): find the machine's CUDA toolkit and CUDA libtorch, check that everything the
# build and the run need is there (the preflight, seconds), build the engine and
# tests/gpu/gpu_bench against them, check fp32/bf16/fp16 embeddings against the CPU fp32
# reference (or PyTorch's goldens), measure faces/s for batch 1..512 and batch-1 latency, print
# one table last with the targets. Results go to $OUT (or /tmp/gpu-out). At most 7 minutes in
# all (TOTAL below), so that a second run still fits in a 15-minute device budget.
#
#   tests/gpu/device_check.sh --prepare   # here (Debian 12): fill .gpu-deps/ with the few Debian
#                                         # libraries the bench needs (abseil, protobuf,
#                                         # nlohmann-json, OpenSSL), unpacked, ≈25 MB
#   device run, carry [".gpu-deps"]:  bash tests/gpu/device_check.sh        (≈4-6 min)
#   tests/gpu/device_check.sh --preflight [--cuda-root DIR]
#                                         # only the checks (toolkit, libtorch, carried
#                                         # libraries, tools); exit 3 naming what is missing
#   tests/gpu/device_check.sh --dry-run --golden-dir DIR
#                                         # here: the same build path against Debian's CPU
#                                         # libtorch, and a tiny CPU run of the bench against
#                                         # PyTorch's embeddings of the golden r50 crops (ctest
#                                         # gpu_device_check_dry)
# Options: --build-dir DIR (default /tmp/arcface-gpu-build; the dry run: build/gpu-dry);
#          --golden-dir DIR: the goldens of tests/reference/make_goldens.py as the reference
#          (required by the dry run, where the other reference, the CPU engine, is the engine
#          under test; on the device the golden weights are too large to carry);
#          --cuda-root DIR: the CUDA toolkit to use instead of searching for nvcc;
#          --python PY: the Python whose torch to build against (default: the first of python3,
#          /opt/torch/.venv/bin/python3 that imports torch).
# Exit status: 0 all checks passed; 1 a bench check failed or a step failed; 2 bad arguments;
# 3 the preflight found something missing (each problem on its own line, with where it looked).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DEPS=$ROOT/.gpu-deps
MODE=device
BUILD=/tmp/arcface-gpu-build
GOLDEN=
CUDA_ROOT_ARG=
PYTHON_ARG=${PYTHON:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) MODE=prepare ;;
    --dry-run) MODE=dry; BUILD=$ROOT/build/gpu-dry ;;
    --preflight) MODE=preflight ;;
    --build-dir) BUILD=$2; shift ;;
    --golden-dir) GOLDEN=$(cd "$2" && pwd); shift ;;
    --cuda-root) CUDA_ROOT_ARG=$2; shift ;;
    --python) PYTHON_ARG=$2; shift ;;
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
# Seconds in all: 7 minutes on the device, so that a rerun fits in a 15-minute budget (the call's
# own limit is 600 s; what is under $OUT comes back even when a step is cut). The dry run shares
# 2 cores with other builds.
TOTAL=420
BUILD_LIMIT=240  # 16 cores
if [ "$MODE" = dry ]; then TOTAL=1100; BUILD_LIMIT=900; fi
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[device_check $(elapsed)s] $*"; }
# Seconds a step may take: at most $1, and never past TOTAL in all.
budget() {
  local left=$(( TOTAL - $(elapsed) ))
  echo $(( left < $1 ? (left > 1 ? left : 1) : $1 ))
}
STEP_START=$START
step_done() {
  local now; now=$(date +%s)
  log "$1 done in $(( now - STEP_START ))s; $(( TOTAL - (now - START) ))s of ${TOTAL}s left"
  STEP_START=$now
}
# The first errors of a failed step, with context, then the log's tail: a compiler's first
# error explains the rest, and the tail alone often shows only the last of many.
show_errors() {
  local file=$1
  echo "---- first errors in $file ----"
  grep -n -E -m 8 -B 2 -A 10 \
    'CMake Error|error:|undefined reference|fatal error|No rule to make target|cannot find -l' \
    "$file" || echo "(no error line found)"
  echo "---- last lines of $file ----"
  tail -20 "$file"
}

# ---- preflight: everything the build and the run need, checked in seconds --------------------
PROBLEMS=()
problem() { PROBLEMS+=("$*"); }

# The Python whose torch we build against; its folder also holds pip's cmake and ninja.
PY=
TORCH_PREFIX=
TORCH_LIB=
NV_LIB_DIRS=()
find_torch() {
  local tried=() candidates=()
  if [ -n "$PYTHON_ARG" ]; then candidates=("$PYTHON_ARG"); else
    candidates=(python3 /opt/torch/.venv/bin/python3); fi
  local py info
  : > "$OUT/python_torch.err"
  for py in "${candidates[@]}"; do
    if ! command -v "$py" > /dev/null 2>&1; then
      tried+=("$py (not found)")
      continue
    fi
    tried+=("$py")
    # One interpreter start (importing torch takes seconds): version, CUDA, ABI, paths, and the
    # pip NVIDIA wheels' library folders (CUDA 13 wheels share nvidia/cu13/lib; cuDNN, NCCL and
    # the CUDA 12 wheels have nvidia/<name>/lib).
    info=$(timeout 90 "$py" -c '
import glob, os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
print("version", torch.__version__)
print("cuda", torch.version.cuda)
print("abi", int(torch.compiled_with_cxx11_abi()))
print("prefix", torch.utils.cmake_prefix_path)
print("lib", os.path.join(os.path.dirname(torch.__file__), "lib"))
for d in sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib"))):
    print("nvlib", d)
try:
    print("cudnn", torch.backends.cudnn.version())
except Exception as e:
    print("cudnn", None, e)
try:
    n = torch.cuda.device_count() if torch.version.cuda else 0
    print("gpus", n, torch.cuda.get_device_name(0) if n else "")
except Exception as e:
    print("gpus", 0, e)
' 2> "$OUT/python_torch.err") || continue
    PY=$(command -v "$py")
    TORCH_VERSION=$(sed -n 's/^version //p' <<< "$info")
    TORCH_CUDA=$(sed -n 's/^cuda //p' <<< "$info")
    TORCH_ABI=$(sed -n 's/^abi //p' <<< "$info")
    TORCH_PREFIX=$(sed -n 's/^prefix //p' <<< "$info")
    TORCH_LIB=$(sed -n 's/^lib //p' <<< "$info")
    TORCH_CUDNN=$(sed -n 's/^cudnn //p' <<< "$info")
    TORCH_GPUS=$(sed -n 's/^gpus //p' <<< "$info")
    mapfile -t NV_LIB_DIRS < <(sed -n 's/^nvlib //p' <<< "$info")
    echo "torch $TORCH_VERSION (cuda $TORCH_CUDA, cudnn $TORCH_CUDNN, cxx11 abi $TORCH_ABI) from $PY;" \
      "GPUs: $TORCH_GPUS"
    return 0
  done
  problem "no Python with torch: tried ${tried[*]} $(tail -1 "$OUT/python_torch.err")"
  return 1
}

check_torch() {
  find_torch || return 0
  [ -f "$TORCH_PREFIX/Torch/TorchConfig.cmake" ] ||
    problem "torch $TORCH_VERSION: no TorchConfig.cmake under $TORCH_PREFIX/Torch"
  [ "$TORCH_ABI" = 1 ] || problem "torch $TORCH_VERSION uses the pre-C++11 std::string ABI; the" \
    "carried Debian libraries (abseil, protobuf) use the C++11 one"
  if [ -z "$TORCH_CUDA" ] || [ "$TORCH_CUDA" = None ]; then
    problem "torch $TORCH_VERSION from $PY has no CUDA (torch.version.cuda is None)"
    return 0
  fi
  local lib
  for lib in libtorch_cuda.so libc10_cuda.so; do
    [ -e "$TORCH_LIB/$lib" ] || problem "torch $TORCH_VERSION: $lib missing in $TORCH_LIB"
  done
  # The bench would fail only after the build (minutes) without a device torch can use.
  case "$TORCH_GPUS" in
    ''|0*) problem "torch $TORCH_VERSION sees no CUDA device (torch.cuda.device_count():" \
             "$TORCH_GPUS; nvidia-smi above says what the driver sees)" ;;
  esac
  case "$TORCH_CUDNN" in
    ''|None*) problem "torch $TORCH_VERSION cannot load cuDNN (torch.backends.cudnn.version():" \
                "$TORCH_CUDNN; searched by libtorch_cuda's RUNPATH and ${NV_LIB_DIRS[*]:-no pip" \
                "nvidia folders})" ;;
  esac
  return 0
}

# The toolkit: nvcc, and its root as nvcc itself reports it (a wrapper script on PATH, such as
# /usr/local/bin/nvcc, runs the real one elsewhere).
NVCC=
CUDA_ROOT=
NVTX_INCLUDE=
LINK_SHIMS=$BUILD/cuda-link-names
nvcc_root() {
  local top
  top=$("$1" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1 ||
        true)
  [ -n "$top" ] || top=$(dirname "$(dirname "$(readlink -f "$1")")")
  (cd "$top" 2> /dev/null && pwd -P)
}
find_nvcc() {
  local candidates=() tried=() c root
  if [ -n "$CUDA_ROOT_ARG" ]; then
    candidates=("$CUDA_ROOT_ARG/bin/nvcc")
  else
    [ -n "${CUDACXX:-}" ] && candidates+=("$CUDACXX")
    command -v nvcc > /dev/null 2>&1 && candidates+=("$(command -v nvcc)")
    [ -n "${CUDA_HOME:-}" ] && candidates+=("$CUDA_HOME/bin/nvcc")
    [ -n "${CUDA_PATH:-}" ] && candidates+=("$CUDA_PATH/bin/nvcc")
    candidates+=(/usr/local/cuda/bin/nvcc)
    for c in $(ls -d /usr/local/cuda-*/bin/nvcc 2> /dev/null | sort -rV || true); do
      candidates+=("$c")
    done
    # pip's nvidia-cuda-nvcc wheel, beside torch's libraries.
    for c in "${NV_LIB_DIRS[@]}"; do candidates+=("$(dirname "$c")/bin/nvcc"); done
  fi
  for c in "${candidates[@]}"; do
    tried+=("$c")
    [ -x "$c" ] || continue
    root=$(nvcc_root "$c") || continue
    if [ -f "$root/include/cuda_runtime_api.h" ]; then
      NVCC=$c
      CUDA_ROOT=$root
      return 0
    fi
    tried+=("(its root $root has no include/cuda_runtime_api.h)")
  done
  problem "no CUDA toolkit: no nvcc with headers beside it; tried ${tried[*]}"
  return 1
}

# A library the link needs, by link name (libNAME.so). A pip-assembled toolkit may hold only
# the versioned file (libNAME.so.13): then a link name in $LINK_SHIMS points at it, and CMake
# finds it there (CMAKE_LIBRARY_PATH).
need_lib() {
  local name=$1; shift
  local dir f
  for dir in "$@"; do
    [ -d "$dir" ] || continue
    if [ -e "$dir/lib$name.so" ]; then
      FOUND_LIBS+=("lib$name.so in $dir")
      return 0
    fi
  done
  for dir in "$@"; do
    [ -d "$dir" ] || continue
    f=$(ls "$dir/lib$name.so."[0-9]* 2> /dev/null | sort -V | tail -1 || true)
    if [ -n "$f" ]; then
      mkdir -p "$LINK_SHIMS"
      ln -sfn "$f" "$LINK_SHIMS/lib$name.so"
      FOUND_LIBS+=("lib$name.so -> $f (link name made in $LINK_SHIMS)")
      return 0
    fi
  done
  problem "CUDA library lib$name missing: no lib$name.so or lib$name.so.N in $*"
}

check_toolkit() {
  if find_nvcc; then
    local version major
    version=$("$NVCC" --version 2>&1 | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p' || true)
    echo "nvcc $version: $NVCC (toolkit root $CUDA_ROOT)"
    major=${version%%.*}
    if [ -n "${TORCH_CUDA:-}" ] && [ "$TORCH_CUDA" != None ] &&
       [ "${TORCH_CUDA%%.*}" != "$major" ]; then
      problem "nvcc $version ($NVCC) and torch's CUDA $TORCH_CUDA differ in the major version"
    fi
  elif [ -n "$CUDA_ROOT_ARG" ]; then
    CUDA_ROOT=$CUDA_ROOT_ARG  # no nvcc there: still say what else it lacks
  else
    return 0
  fi
  local dirs=() d
  for d in "$CUDA_ROOT/lib64" "$CUDA_ROOT/lib" "$CUDA_ROOT/targets/x86_64-linux/lib"; do
    if [ -d "$d" ]; then dirs+=("$(cd "$d" && pwd -P)"); else dirs+=("$d"); fi
  done
  rm -rf "$LINK_SHIMS"
  FOUND_LIBS=()
  # What libtorch's CMake config links (cudart, the math libraries, NVRTC), in the toolkit
  # first, then in the pip wheels torch itself loads.
  local name
  for name in cudart cublas cublasLt cufft curand nvrtc; do
    need_lib "$name" "${dirs[@]}" "${NV_LIB_DIRS[@]}"
  done
  # The driver API: the toolkit's link stub, or the driver itself.
  local stubs=()
  for d in "${dirs[@]}"; do stubs+=("$d/stubs"); done
  need_lib cuda "${stubs[@]}" "${dirs[@]}" /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu \
    /usr/lib64
  [ ${#FOUND_LIBS[@]} -eq 0 ] || printf '  %s\n' "${FOUND_LIBS[@]}"
  # NVTX: CUDA 12.9 and later ship only the header library nvtx3; libtorch's config falls back
  # to the removed libnvToolsExt unless it is told where nvtx3 is (nvtx3_dir).
  for d in "$CUDA_ROOT/include" "${NV_LIB_DIRS[@]/%\/lib//include}"; do
    if [ -d "$d/nvtx3" ]; then NVTX_INCLUDE=$d; break; fi
  done
  if [ -n "$NVTX_INCLUDE" ]; then
    echo "  nvtx3 headers in $NVTX_INCLUDE"
  elif ! ls "${dirs[@]/%//libnvToolsExt.so}" > /dev/null 2>&1; then
    problem "NVTX missing: no nvtx3/ in $CUDA_ROOT/include (nor in the pip nvidia folders) and" \
      "no libnvToolsExt.so in ${dirs[*]}"
  fi
  return 0
}

check_tools() {
  local t
  for t in cmake c++; do
    command -v "$t" > /dev/null 2>&1 || problem "$t not found on PATH ($PATH)"
  done
  command -v cmake > /dev/null 2>&1 && echo "$(cmake --version | head -1); c++: $(c++ --version | head -1)"
  command -v ninja > /dev/null 2>&1 || echo "no ninja: the build uses make"
  return 0
}

check_deps() {
  if [ ! -d "$DEPS/usr" ]; then
    [ "$MODE" = dry ] && return 0  # the dry run may use the system's copies
    problem "no carried libraries in $DEPS: run 'tests/gpu/device_check.sh --prepare' here and" \
      "carry .gpu-deps"
    return 0
  fi
  local lib=$DEPS/usr/lib/x86_64-linux-gnu f
  for f in "$lib/cmake/absl/abslConfig.cmake" "$DEPS/usr/share/cmake/nlohmann_json" \
           "$lib/libprotobuf.so" "$DEPS/usr/bin/protoc" "$lib/libcrypto.so" \
           "$DEPS/usr/include/openssl/sha.h"; do
    [ -e "$f" ] || problem "carried libraries incomplete: $f missing (rerun --prepare here)"
  done
  if [ -x "$DEPS/usr/bin/protoc" ] &&
     ! LD_LIBRARY_PATH=$lib "$DEPS/usr/bin/protoc" --version > /dev/null 2>&1; then
    problem "the carried protoc does not run here: $(LD_LIBRARY_PATH=$lib "$DEPS/usr/bin/protoc" \
      --version 2>&1 | head -1)"
  fi
  return 0
}

log "preflight"
if [ "$MODE" != dry ]; then
  # The dry run builds against the system's CPU libtorch, whatever python3 holds.
  if command -v nvidia-smi > /dev/null 2>&1; then
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
      --format=csv 2>&1 | tee "$OUT/env.txt" || true
  fi
  check_torch
  if [ -n "$PY" ]; then export PATH=$(dirname "$PY"):$PATH; fi  # pip's cmake and ninja
  check_toolkit
fi
check_tools
check_deps
if [ ${#PROBLEMS[@]} -gt 0 ]; then
  echo "device_check: PREFLIGHT FAILED ($(elapsed)s):" >&2
  printf '  - %s\n' "${PROBLEMS[@]}" >&2
  exit 3
fi
if [ "$MODE" != dry ]; then
  echo "torch $TORCH_VERSION cuda $TORCH_CUDA cudnn $TORCH_CUDNN ($PY); nvcc $NVCC" \
    "(toolkit $CUDA_ROOT)" >> "$OUT/env.txt"
fi
step_done preflight
[ "$MODE" = preflight ] && exit 0

# ---- configure -----------------------------------------------------------------------------
# The policy floor lets a CMake 4 read the carried packages' older config files.
cmake_args=(-DCMAKE_BUILD_TYPE=Release -DCMAKE_POLICY_VERSION_MINIMUM=3.5)
if command -v ninja > /dev/null 2>&1; then cmake_args+=(-G Ninja); fi
if command -v ccache > /dev/null; then
  cmake_args+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
LIB_PATH=
if [ -d "$DEPS/usr" ]; then
  # Carried Debian libraries: found here before any system copy, loaded from here at run time.
  lib=$DEPS/usr/lib/x86_64-linux-gnu
  LIB_PATH=$lib
  cmake_args+=(-Dabsl_DIR="$lib/cmake/absl"
               -Dnlohmann_json_DIR="$DEPS/usr/share/cmake/nlohmann_json"
               -DProtobuf_INCLUDE_DIR="$DEPS/usr/include"
               -DProtobuf_LIBRARY="$lib/libprotobuf.so"
               -DProtobuf_PROTOC_EXECUTABLE="$DEPS/usr/bin/protoc"
               -DOPENSSL_ROOT_DIR="$DEPS/usr"
               -DOPENSSL_INCLUDE_DIR="$DEPS/usr/include"
               -DOPENSSL_CRYPTO_LIBRARY="$lib/libcrypto.so")
  log "using carried libraries from $DEPS"
fi

if [ "$MODE" = device ]; then
  # CMake looks for nvcc only through CUDACXX and PATH (CUDAToolkit_ROOT alone is not enough
  # for enable_language(CUDA) in libtorch's config): name it, and point every other spelling
  # of the toolkit's location at the same one.
  export CUDACXX=$NVCC CUDA_HOME=$CUDA_ROOT CUDA_PATH=$CUDA_ROOT
  export PATH=$CUDA_ROOT/bin:$PATH
  cmake_args+=(-DCMAKE_PREFIX_PATH="$TORCH_PREFIX"
               -DCMAKE_CUDA_COMPILER="$NVCC" -DCUDAToolkit_ROOT="$CUDA_ROOT"
               -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" -DTORCH_CUDA_ARCH_LIST=9.0
               # Nothing here is CUDA code: only CMake's compiler check runs nvcc, and a host
               # compiler newer than this nvcc knows must not stop it.
               -DCMAKE_CUDA_FLAGS=-allow-unsupported-compiler
               -DPYTHON_EXECUTABLE="$PY" -DPython3_EXECUTABLE="$PY")
  [ -n "$NVTX_INCLUDE" ] && cmake_args+=(-Dnvtx3_dir="$NVTX_INCLUDE" -DUSE_SYSTEM_NVTX=ON)
  [ -d "$LINK_SHIMS" ] && cmake_args+=(-DCMAKE_LIBRARY_PATH="$LINK_SHIMS")
  # The libraries torch itself loads in Python (its own folder, the pip NVIDIA wheels) come
  # first for the linker's search of indirect dependencies and at run time, so that the bench
  # runs on the same cuDNN, cuBLAS and runtime as PyTorch does.
  for d in "$TORCH_LIB" "${NV_LIB_DIRS[@]}"; do LIB_PATH=$d${LIB_PATH:+:$LIB_PATH}; done
fi
[ -n "$LIB_PATH" ] && export LD_LIBRARY_PATH=$LIB_PATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

log "configure ($BUILD)"
rm -f "$BUILD/CMakeCache.txt"  # no library paths cached from a run with(out) .gpu-deps
if ! timeout "$(budget 120)" cmake -S "$ROOT/tests/gpu" -B "$BUILD" "${cmake_args[@]}" \
     > "$OUT/build.log" 2>&1; then
  log "configure failed (full log: $OUT/build.log)"; show_errors "$OUT/build.log"; exit 1
fi
grep -E "arcface engine:|PyTorch: CUDA|Caffe2: CUDA|Found CUDAToolkit|CUDA compiler identification" \
  "$OUT/build.log" || true
if [ "$MODE" = device ] && ! grep -q "CUDA path ON" "$OUT/build.log"; then
  log "libtorch's config lists no CUDA libraries: this would measure nothing"
  show_errors "$OUT/build.log"; exit 1
fi
step_done configure

# ---- build: gpu_bench and what it links, nothing else ---------------------------------------
log "build gpu_bench with $JOBS jobs"
if ! timeout "$(budget $BUILD_LIMIT)" cmake --build "$BUILD" --target gpu_bench -j "$JOBS" \
     >> "$OUT/build.log" 2>&1; then
  log "build failed or ran out of time (full log: $OUT/build.log)"
  show_errors "$OUT/build.log"; exit 1
fi
BENCH=$BUILD/gpu_bench
if ldd "$BENCH" | grep -q "not found"; then
  log "gpu_bench cannot load every library (LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}):"
  ldd "$BENCH" | grep "not found"; exit 1
fi
ldd "$BENCH" | grep -E "torch_cuda|c10_cuda|cudart|cublas|cudnn|nvrtc" | tee -a "$OUT/env.txt" || true
step_done build

if [ "$MODE" = dry ]; then
  # The bench's own logic on the CPU engine (bf16 is the CPU's reduced precision), tiny sizes.
  "$BENCH" --device=cpu --precisions=fp32,bf16 --batches=1 --max-batch=2 --check-crops=3 \
    --seconds=0.01 --latency-runs=1 --callers=2 --json="$OUT/gpu_bench.jsonl" "${golden_flag[@]}"
  exit $?
fi

# ---- bench ----------------------------------------------------------------------------------
status=0
log "bench: bf16, fp16, fp32 with CUDA graphs, 2 lanes"
timeout "$(budget 200)" "$BENCH" --device=cuda --precisions=bf16,fp16,fp32 --seconds=0.3 \
  --json="$OUT/gpu_bench.jsonl" "${golden_flag[@]}" 2>&1 | tee "$OUT/gpu_bench.log" || status=1
step_done "bench (graphs)"
if [ "$(budget 45)" -ge 45 ]; then
  # What the graphs give: the same engine run eagerly (fp16, a few sizes).
  log "bench: fp16 without graphs"
  timeout "$(budget 60)" "$BENCH" --device=cuda --precisions=fp16 --graphs=0 --batches=1,32,512 \
    --latency-runs=100 --json="$OUT/gpu_bench_eager.jsonl" > "$OUT/gpu_bench_eager.log" 2>&1 \
    || status=1
  sed -n '/^engine on/,$p' "$OUT/gpu_bench_eager.log"
  step_done "bench (eager)"
else
  log "no time left for the eager comparison"
fi
log "done (status $status); the graphs run:"
sed -n '/^engine on/,$p' "$OUT/gpu_bench.log"
exit $status
