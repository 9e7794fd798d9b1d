#!/usr/bin/env bash
# spinkv: the end-to-end decode measurement of docs/BENCHMARKS.md ("Serving engine end to end"),
# run on the GPU machine from the repository root after scripts/gpu-package.sh:
#   bash .device/gpu-e2e.sh      (results: $OUT/r5.tgz)
# The anchor, then the engine with graphs at B=1,16 (64 new tokens) and B=64 (256 new
# tokens: a steady-state window where all 64 requests decode), with the host time of the
# steps by part (--host-timing). E2E_LRU=1 adds dense B=64 over the LRU at a fast
# fraction of 0.99; E2E_EAGER=1 adds eager runs at B=64; E2E_TESTS=1 runs the graph and
# cache GPU tests first.
set -u
here=$(cd "$(dirname "$0")" && pwd)
source "$here/device-env.sh"
export OUT=${OUT:-./gpu-out}
R=$OUT/r5; mkdir -p $R
bin=/tmp/spinkv-bin; mkdir -p $bin
for f in "$here"/*.xz; do xz -dc "$f" > "$bin/$(basename "$f" .xz)"; chmod +x "$bin/$(basename "$f" .xz)"; done
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $R/gpu.txt 2>&1
if [ "${E2E_TESTS:-0}" = 1 ]; then
  for t in cuda_graphs cuda_cache; do $bin/$t --nocapture > $R/$t.txt 2>&1; echo "$t exit $?"; grep -E "test result|panicked" $R/$t.txt; done
fi
# Warm-up: the first CUDA process on a fresh machine loads and JIT-compiles the kernels.
timeout 120 $bin/serve_bench offline --cuda --shape smollm2-135m --random-weights --context 1024 --batch 4 \
  --budget 256 --algo shadowkv --new-tokens 8 > $R/warm-up.txt 2>&1; echo "warm-up exit $?"
python3 "$here/torch_e2e_decode.py" --shape smollm2 --runs 8192:1,8192:16,8192:64 > $R/anchor_smollm2.jsonl 2> $R/anchor.err
cat $R/anchor_smollm2.jsonl
e2e() { # algo tag batch new flags
  timeout 150 $bin/serve_bench offline --cuda --shape smollm2-135m --random-weights \
    --context 8192 --new-tokens $4 --batch $3 --algo $1 --budget 1024 --max-prefill-tokens 4096 $5 \
    --host-timing --csv "$R/e2e_$1_$2.csv" > "$R/e2e_$1_$2.txt" 2>&1
  echo "serve_bench $1 $2 exit $?"; grep -E "decode (Graphs|Eager)|^\| offline|padded\.begin|plan\.|decode\.(launch|end_step)" "$R/e2e_$1_$2.txt"
}
e2e dense graphs_b1_16 1,16 64 ""
e2e quest graphs_b1_16 1,16 64 ""
e2e dense graphs_b64 64 256 ""
e2e quest graphs_b64 64 256 ""
if [ "${E2E_LRU:-0}" = 1 ]; then
  # The same dense B=64 run over the set-associative LRU at 99% of the pages (the
  # cache's behaviour before direct mapping, for comparison).
  e2e dense lru99_b64 64 256 "--fast-fraction 0.99"
fi
if [ "${E2E_EAGER:-0}" = 1 ]; then
  e2e dense eager_b64 64 256 "--no-graphs"
  e2e quest eager_b64 64 256 "--no-graphs"
fi
tar czf $OUT/r5.tgz -C $OUT r5 && rm -rf $R
