#!/usr/bin/env bash
# spinkv: does the page layout move the kernels at long context? Run on the GPU machine
# from the repository root after scripts/gpu-package.sh:
#   bash .device/gpu-layout.sh        (results: $OUT/layout.tgz; ~8 minutes)
# In one call, next to the anchor:
#   1. prefill_bench's chunked prefill over the pages interleaved as the cache lays them out
#      (--dirs 256, Llama-3-8B: 32 layers × 8 KV heads), by directory in the same pool
#      (--dirs 256 --by-directory), and shuffled over a pool of one layer (--dirs 0);
#   2. gpu_bench's decode kernels at 32K/128K, B = 8, over shuffled pages and over one run
#      per (sequence, KV head) (--page-order by-head);
#   3. TTFT through the engine at the 8B shape, Quest, 8K chunks, 32K and 128K prompts, with
#      --page-layout interleaved and by-directory;
#   4. the PyTorch prefill anchor (one-shot flash SDPA) at 32K and 128K (and, with 1,
#      PyTorch's SDPA kernel alone at the same lengths, scripts/sdpa_prefill.py).
# The SM clock and power are sampled every 200 ms throughout (clocks.csv).
# LAYOUT_SKIP_128K=1 leaves out the 128K engine runs and anchor (the longest parts).
# LAYOUT_PHASE=kernels runs 1 and 2 only, LAYOUT_PHASE=ttft 3 and 4 only (two calls of
# under 10 minutes each, when one call would run past the limit).
set -u
here=$(cd "$(dirname "$0")" && pwd)
source "$here/device-env.sh"
export OUT=${OUT:-./gpu-out}
R=$OUT/layout; mkdir -p "$R"
bin=/tmp/spinkv-bin; mkdir -p $bin
for f in prefill_bench gpu_bench serve_bench; do
  xz -dc "$here/$f.xz" > "$bin/$f" && chmod +x "$bin/$f"
done
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$R/gpu.txt" 2>&1
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv -lms 200 > "$R/clocks.csv" 2>&1 &
smi=$!
run() { # name timeout command...
  local name=$1 t=$2; shift 2
  timeout "$t" "$@" > "$R/$name.txt" 2>&1
  echo "$name exit $?"
}
# Warm-up: kernel modules load on the first CUDA process.
run warm-up 120 $bin/serve_bench offline --cuda --shape smollm2-135m --random-weights --context 1024 \
  --batch 4 --budget 256 --algo quest --new-tokens 8
phase=${LAYOUT_PHASE:-all}
if [ "$phase" != ttft ]; then
for lay in "256" "256 --by-directory" "0"; do
  tag=$(echo "dirs$lay" | tr -d ' -')
  run "prefill_$tag" 150 $bin/prefill_bench --no-factor --lengths 32768,131072 --dirs $lay --csv "$R/prefill_$tag.csv"
  grep -E "chunk|TFLOP" "$R/prefill_$tag.txt" | head -12
done
timeout 150 python3 "$here/sdpa_prefill.py" 32768,131072 > "$R/sdpa_prefill.jsonl" 2> "$R/sdpa.err"
echo "sdpa exit $?"; cat "$R/sdpa_prefill.jsonl"
for o in random by-head; do
  run "gpu_bench_$o" 150 $bin/gpu_bench --contexts 32768,131072 --batches 8 --page-order $o --csv "$R/gpu_bench_$o.csv"
  grep -E "sparse attention|Quest step|score" "$R/gpu_bench_$o.txt" | head -12
done
fi
if [ "$phase" != kernels ]; then
lens="32768 131072"
[ "${LAYOUT_SKIP_128K:-0}" = 1 ] && lens="32768"
for L in $lens; do
  for lay in interleaved by-directory; do
    run "ttft_${L}_$lay" 240 $bin/serve_bench offline --cuda --shape llama3-8b --random-weights --context $L \
      --new-tokens 4 --batch 1,1 --algo quest --budget 2048 --max-prefill-tokens 8192 --page-layout $lay \
      --csv "$R/ttft_${L}_$lay.csv"
    grep -E "^\| offline" "$R/ttft_${L}_$lay.txt"
  done
done
PREFILL_CHUNK=131072 timeout 200 python3 "$here/torch_e2e_decode.py" --shape llama8b --prefill ${lens// /,} \
  > "$R/anchor_prefill.jsonl" 2> "$R/anchor.err"
echo "anchor exit $?"; cat "$R/anchor_prefill.jsonl"
fi
kill $smi 2>/dev/null
tar czf "$OUT/layout.tgz" -C "$OUT" layout && rm -rf "$R"
