#!/usr/bin/env bash
# spinkv: runs the packed CUDA tests, compute-sanitizer and the bench on a GPU machine
# (see scripts/gpu-package.sh). Results go to $OUT (default ./gpu-out).
# Usage: bash .device/gpu-run.sh [tests|sanitize|bench|all]
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/device-env.sh"
OUT=${OUT:-./gpu-out}; mkdir -p "$OUT"
bin=/tmp/spinkv-bin; mkdir -p "$bin"
for f in "$here"/*.xz; do xz -dc "$f" > "$bin/$(basename "$f" .xz)"; chmod +x "$bin/$(basename "$f" .xz)"; done
what=${1:-all}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
if [ "$what" = tests ] || [ "$what" = all ]; then
  for t in cuda_ops cuda_cache cuda_tiered cuda_pinned device_lru device_tables; do
    "$bin/$t" 2>&1 | tee "$OUT/$t.txt" | grep -E "test result|panicked|FAILED|error" 
  done
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  "$bin/tiered_step_bench" --csv "$OUT/tiered.csv" 2>&1 | tee "$OUT/tiered.txt"
fi
if [ "$what" = sanitize ] || [ "$what" = all ]; then
  for t in cuda_tiered cuda_pinned device_lru device_tables; do
    timeout ${SAN_TIMEOUT:-120} compute-sanitizer --tool memcheck --leak-check no "$bin/$t" > "$OUT/memcheck_$t.txt" 2>&1
    echo "compute-sanitizer $t exit: $?"; grep -E "ERROR SUMMARY|test result" "$OUT/memcheck_$t.txt"
  done
fi
