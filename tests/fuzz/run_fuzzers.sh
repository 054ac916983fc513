#!/usr/bin/env bash
# Runs fuzz targets already built in BUILD_DIR (a -DARCFACE_FUZZ=ON build folder's tests/fuzz),
# each for SECONDS on a copy of its seed corpus (tests/fuzz/corpus/<target>, where every input
# that once crashed is kept, so each run replays them first) with its dictionary. Fails on any
# crash, sanitizer report, leak, slow input (-timeout=10), or memory over 2 GB. Prints one
# summary line per target: executions, exec/s, coverage (cov: edges, ft: features), corpus.
# Usage: tests/fuzz/run_fuzzers.sh BUILD_DIR SECONDS [TARGET...]   (default: every target)
#   FUZZ_KEEP=DIR keeps each target's grown corpus, log and crash inputs under DIR/<target>.
set -euo pipefail

if (($# < 2)); then
  echo "usage: $0 BUILD_DIR SECONDS [TARGET...]" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
build=$1
seconds=$2
shift 2
targets=("$@")
if ((${#targets[@]} == 0)); then
  targets=(fuzz_face_crop fuzz_safetensors fuzz_onnx fuzz_service fuzz_server_flags
           fuzz_tfjs_weights)
fi

if [[ -n ${FUZZ_KEEP:-} ]]; then
  work=$FUZZ_KEEP
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
# Symbolized reports; UBSan's stack too.
export ASAN_OPTIONS=${ASAN_OPTIONS:-symbolize=1:detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

failed=()
for t in "${targets[@]}"; do
  bin=$build/$t
  if [[ ! -x $bin ]]; then
    echo "$t: FAIL: $bin is not built" >&2
    failed+=("$t")
    continue
  fi
  dir=$work/$t
  rm -rf "$dir"
  mkdir -p "$dir/corpus" "$dir/crashes"
  cp "$here/corpus/$t/"* "$dir/corpus/"
  args=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
        -artifact_prefix="$dir/crashes/")
  [[ -f $here/dict/$t.dict ]] && args+=(-dict="$here/dict/$t.dict")
  # fuzz_service runs LeakSanitizer itself (see its header): libFuzzer's check is too costly there.
  [[ $t == fuzz_service ]] && args+=(-detect_leaks=0)
  status=0
  "$bin" "${args[@]}" "$dir/corpus" >"$dir/log" 2>&1 || status=$?

  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$dir/log" | tail -1 || true)
  stat_of() { grep -E "^stat::$1:" "$dir/log" | awk '{print $2}' | tail -1; }
  if ((status != 0)) || [[ -z $done_line ]]; then
    echo "$t: FAIL (exit $status); the last lines of its log:" >&2
    tail -n 60 "$dir/log" >&2
    ls "$dir/crashes" >&2 || true
    failed+=("$t")
    continue
  fi
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$done_line")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$done_line")
  corp=$(sed -nE 's/.* corp: ([0-9]+\/[^ ]+).*/\1/p' <<<"$done_line")
  echo "$t: OK ${seconds}s: $(stat_of number_of_executed_units) runs," \
       "$(stat_of average_exec_per_sec) exec/s, cov: $cov ft: $ft, corpus $corp," \
       "$(stat_of new_units_added) new units, peak RSS $(stat_of peak_rss_mb) MB"
done

if ((${#failed[@]})); then
  echo "fuzzing failed: ${failed[*]}" >&2
  exit 1
fi
