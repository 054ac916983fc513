#!/usr/bin/env bash
# The device script's preflight, on toolkits made up here (no GPU, no CUDA libtorch needed):
# 1. an empty folder: it fails within seconds, naming nvcc and every missing CUDA library with
#    the folders it looked in;
# 2. a toolkit laid out like the pip wheels (only versioned libraries, libcudart.so.13), one
#    library missing: link names are made for the others, and only the missing one is named.
# ctest gpu_device_check_preflight; exit status 0 when every expectation holds.
set -euo pipefail

SCRIPT=$(cd "$(dirname "$0")" && pwd)/device_check.sh
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
passes=0
failures=0
expect() {  # expect <description> <command...>: the command must succeed
  local what=$1; shift
  if "$@"; then echo "ok: $what"; passes=$((passes + 1)); else echo "FAILED: $what"; failures=$((failures + 1)); fi
}
has() { grep -qF -- "$1" "$WORK/out.txt"; }
lacks() { ! grep -qF -- "$1" "$WORK/out.txt"; }

run_preflight() {  # run_preflight <cuda root>: output in out.txt, status in $rc, seconds in $took
  local start=$SECONDS
  rc=0
  OUT=$WORK/out timeout 60 "$SCRIPT" --preflight --cuda-root "$1" --python /nonexistent \
    --build-dir "$WORK/build" > "$WORK/out.txt" 2>&1 || rc=$?
  took=$((SECONDS - start))
}

# 1. Nothing there.
mkdir -p "$WORK/empty"
run_preflight "$WORK/empty"
cat "$WORK/out.txt"
expect "empty toolkit: exit status 3 (got $rc)" test "$rc" = 3
expect "empty toolkit: within 10 s (took ${took}s)" test "$took" -le 10
expect "empty toolkit: nvcc named" has "no CUDA toolkit: no nvcc with headers beside it; tried $WORK/empty/bin/nvcc"
for lib in cudart cublas cublasLt cufft curand nvrtc; do
  expect "empty toolkit: lib$lib named with where it looked" \
    has "CUDA library lib$lib missing: no lib$lib.so or lib$lib.so.N in $WORK/empty/lib64 $WORK/empty/lib"
done
expect "empty toolkit: NVTX named" has "NVTX missing: no nvtx3/ in $WORK/empty/include"
expect "empty toolkit: the Python named" has "no Python with torch: tried /nonexistent (not found)"

# 2. The pip wheels' layout: versioned libraries only, no libnvrtc.
tk=$WORK/pip-cuda
mkdir -p "$tk/bin" "$tk/include/nvtx3" "$tk/lib/stubs"
cat > "$tk/bin/nvcc" << EOF
#!/bin/sh
case "\$*" in
  *--version*) echo "Cuda compilation tools, release 13.0, V13.0.88" ;;
  *--dryrun*) echo "#\\\$ TOP=$tk/bin/.." >&2 ;;
esac
EOF
chmod +x "$tk/bin/nvcc"
touch "$tk/include/cuda_runtime_api.h" "$tk/lib/libcudart.so.13" "$tk/lib/libcublas.so.13" \
  "$tk/lib/libcublasLt.so.13" "$tk/lib/libcufft.so.12" "$tk/lib/libcurand.so.10" \
  "$tk/lib/stubs/libcuda.so"
run_preflight "$tk"
cat "$WORK/out.txt"
expect "pip toolkit: exit status 3 (got $rc)" test "$rc" = 3
expect "pip toolkit: nvcc and its root found" has "nvcc 13.0: $tk/bin/nvcc (toolkit root $tk)"
expect "pip toolkit: link name for libcudart.so.13" \
  test "$(readlink "$WORK/build/cuda-link-names/libcudart.so")" = "$tk/lib/libcudart.so.13"
expect "pip toolkit: link name for libcufft.so.12" \
  test "$(readlink "$WORK/build/cuda-link-names/libcufft.so")" = "$tk/lib/libcufft.so.12"
expect "pip toolkit: the driver stub as it is" has "libcuda.so in $tk/lib/stubs"
expect "pip toolkit: only libnvrtc named missing" has "CUDA library libnvrtc missing"
for lib in cudart cublas cublasLt cufft curand; do
  expect "pip toolkit: lib$lib not named missing" lacks "CUDA library lib$lib missing"
done
expect "pip toolkit: NVTX found" lacks "NVTX missing"

echo "$passes passed, $failures failed"
[ "$failures" -eq 0 ]
