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
  "$bin/cuda_ops" 2>&1 | tee "$OUT/cuda_ops.txt"
  "$bin/cuda_cache" 2>&1 | tee "$OUT/cuda_cache.txt"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  "$bin/gpu_bench" --csv "$OUT/bench.csv" 2>&1 | tee "$OUT/bench.txt"
fi
if [ "$what" = sanitize ] || [ "$what" = all ]; then
  timeout ${SAN_TIMEOUT:-400} compute-sanitizer --tool memcheck --leak-check no "$bin/cuda_ops" ${SANITIZE_FILTER:-} > "$OUT/memcheck.txt" 2>&1
  echo "compute-sanitizer exit: $?"; tail -25 "$OUT/memcheck.txt"
fi
