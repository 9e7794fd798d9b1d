#!/usr/bin/env bash
# spinkv: runs the packed CUDA tests, compute-sanitizer and the bench on a GPU machine
# (see scripts/gpu-package.sh). Results go to $OUT (default ./gpu-out).
# Usage: bash .device/gpu-run.sh [tests|sanitize|bench|e2e|prefill|needles|decode8b|all]
# e2e: the engine's offline decode (serve_bench, random weights at SmolLM2's shape, 8K
# context) next to the PyTorch anchor at the same points, in the same session.
# E2E_BATCHES (default 1,16,64) and E2E_ALGOS (default dense quest) choose the points;
# E2E_FLAGS adds serve_bench flags (e.g. --no-graphs), E2E_TAG suffixes the output files.
# prefill: the prefill attention kernel alone (prefill_bench) next to PyTorch SDPA
# (sdpa_prefill.py), then TTFT through the engine (serve_bench, random weights, batch 1)
# next to the anchor's TTFT, at SmolLM2 8K and Llama-3.1-8B 8K/32K (PREFILL_8B=0 skips 8B).
# needles: the needle suite (needle_suite) through the engine with the real SmolLM2 at
# $SPINKV_MODEL (a GGUF path), NEEDLE_ALGOS / NEEDLE_CONTEXTS / NEEDLE_FLAGS to narrow it.
# decode8b: decode through the engine at the Llama-3.1-8B shape (random weights) next to
# the anchor: dense at 32K/B8 and 128K/B4, Quest/InfLLM/ShadowKV at 128K/B7 (DECODE8B_ALGOS).
# capacity: decode through the engine at the Llama-3.1-8B shape at each configuration's
# largest batch, CAPACITY_RUNS = "algo:context:batch:fast_home_fraction:fast_fraction ..."
# (fast_home_fraction 0 and fast_fraction 1: all in HBM), next to the anchor at
# CAPACITY_ANCHOR (context:batch list); CAPACITY_FLAGS adds serve_bench flags (e.g.
# --fetch side-stream), CAPACITY_TAG suffixes the output files.
# trace: records the real SmolLM2's Quest selections through the engine (serve_bench
# accuracy --trace-dir, 5 depths × TRACE_TRIALS requests in one batch at TRACE_CONTEXT
# tokens, budget TRACE_BUDGET) for cache_sim --traces; the CSVs come back xz-compressed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/device-env.sh"
OUT=${OUT:-./gpu-out}; mkdir -p "$OUT"
bin=/tmp/spinkv-bin; mkdir -p "$bin"
for f in "$here"/*.xz; do xz -dc "$f" > "$bin/$(basename "$f" .xz)"; chmod +x "$bin/$(basename "$f" .xz)"; done
what=${1:-all}
# A fresh machine loads and JIT-compiles the kernels in its first CUDA process: a short
# warm-up run keeps that out of the first measured prefill and ShadowKV compression
# (measured: 28 s TTFT and 16 s of compression in a first run; docs/BENCHMARKS.md).
case "$what" in e2e|prefill|decode8b|capacity|all)
  timeout 120 "$bin/serve_bench" offline --cuda --shape smollm2-135m --random-weights --context 1024 --batch 4 \
    --budget 256 --algo shadowkv --new-tokens 8 > "$OUT/warm-up.txt" 2>&1; echo "warm-up exit $?";;
esac
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
if [ "$what" = tests ] || [ "$what" = all ]; then
  for t in tiered_attention quest_q8 cuda_ops cuda_infllm cuda_cache cuda_tiered cuda_pinned device_lru device_lru_direct fast_homes device_tables model_ops logits_f32 sample_rows prefill_attention cuda_graphs; do
    "$bin/$t" --nocapture 2>&1 | tee "$OUT/$t.txt" | grep -E "test result|panicked|FAILED|error" 
  done
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  "$bin/tiered_step_bench" --csv "$OUT/tiered.csv" 2>&1 | tee "$OUT/tiered.txt"
fi
if [ "$what" = sanitize ] || [ "$what" = all ]; then
  for t in quest_q8 cuda_tiered cuda_pinned device_lru device_lru_direct fast_homes device_tables model_ops logits_f32 sample_rows prefill_attention; do
    timeout ${SAN_TIMEOUT:-120} compute-sanitizer --tool memcheck --leak-check no "$bin/$t" > "$OUT/memcheck_$t.txt" 2>&1
    echo "compute-sanitizer $t exit: $?"; grep -E "ERROR SUMMARY|test result" "$OUT/memcheck_$t.txt"
  done
  # The whole-model decode step captured and replayed, nothing else (B = 3: f32 dense
  # over a direct-mapped fast tier, bf16 Quest with int8 bounds over the LRU, fused).
  timeout ${SAN_TIMEOUT:-300} compute-sanitizer --tool memcheck --leak-check no \
    "$bin/cuda_graphs" --ignored replayed_steps_for_memcheck > "$OUT/memcheck_cuda_graphs.txt" 2>&1
  echo "compute-sanitizer cuda_graphs exit: $?"; grep -E "ERROR SUMMARY|test result" "$OUT/memcheck_cuda_graphs.txt"
fi
if [ "$what" = e2e ] || [ "$what" = all ]; then
  if [ -f "$here/torch_e2e_decode.py" ]; then
    runs=$(echo "${E2E_BATCHES:-1,16,64}" | tr ',' '\n' | sed 's/^/8192:/' | paste -sd, -)
    python3 "$here/torch_e2e_decode.py" --shape smollm2 --runs "$runs" 2>&1 | tee "$OUT/anchor_smollm2.jsonl"
  fi
  for algo in ${E2E_ALGOS:-dense quest}; do
    timeout ${E2E_TIMEOUT:-240} "$bin/serve_bench" offline --cuda --shape smollm2-135m --random-weights \
      --context 8192 --new-tokens ${E2E_NEW:-64} --batch "${E2E_BATCHES:-1,16,64}" --algo "$algo" \
      --budget 1024 --max-prefill-tokens 4096 ${E2E_FLAGS:-} \
      --csv "$OUT/e2e_$algo${E2E_TAG:-}.csv" 2>&1 | tee "$OUT/e2e_$algo${E2E_TAG:-}.txt"
  done
fi
if [ "$what" = prefill ] || [ "$what" = all ]; then
  "$bin/prefill_bench" --csv "$OUT/prefill_kernel.csv" 2>&1 | tee "$OUT/prefill_kernel.txt"
  python3 "$here/sdpa_prefill.py" 2>&1 | tee "$OUT/sdpa_prefill.jsonl"
  if [ -f "$here/torch_e2e_decode.py" ]; then
    python3 "$here/torch_e2e_decode.py" --shape smollm2 --prefill 8192 2>&1 | tee "$OUT/anchor_prefill_smollm2.jsonl"
    [ "${PREFILL_8B:-1}" = 1 ] && PREFILL_CHUNK=131072 python3 "$here/torch_e2e_decode.py" --shape llama8b \
      --prefill 8192,32768 2>&1 | tee "$OUT/anchor_prefill_llama8b.jsonl"
  fi
  for algo in dense quest; do
    timeout ${E2E_TIMEOUT:-240} "$bin/serve_bench" offline --cuda --shape smollm2-135m --random-weights \
      --context 8192 --new-tokens 8 --batch 1 --algo "$algo" --budget 1024 --max-prefill-tokens ${PREFILL_CHUNK_TOKENS:-8192} \
      --csv "$OUT/ttft_smollm2_$algo.csv" 2>&1 | tee "$OUT/ttft_smollm2_$algo.txt"
  done
  if [ "${PREFILL_8B:-1}" = 1 ]; then
    for L in 8192 32768; do
      timeout ${E2E_TIMEOUT:-240} "$bin/serve_bench" offline --cuda --shape llama3-8b --random-weights \
        --context $L --new-tokens 4 --batch 1 --algo quest --budget 2048 --max-prefill-tokens 8192 \
        --csv "$OUT/ttft_llama8b_$L.csv" 2>&1 | tee "$OUT/ttft_llama8b_$L.txt"
    done
  fi
fi
if [ "$what" = needles ]; then
  timeout ${NEEDLE_TIMEOUT:-540} "$bin/needle_suite" --cuda --model "${SPINKV_MODEL:?set SPINKV_MODEL}" \
    --contexts "${NEEDLE_CONTEXTS:-1024,2048,4096,8192}" --algos "${NEEDLE_ALGOS:-dense,quest,infllm,shadowkv,streaming}" \
    ${NEEDLE_FLAGS:-} --csv "$OUT/needles${NEEDLE_TAG:-}.csv" --plot-dir "$OUT/plots" 2>&1 | tee "$OUT/needles${NEEDLE_TAG:-}.txt"
fi
if [ "$what" = decode8b ]; then
  if [ -f "$here/torch_e2e_decode.py" ]; then
    python3 "$here/torch_e2e_decode.py" --shape llama8b --runs "${DECODE8B_ANCHOR:-32768:8,131072:4,131072:7}" 2>&1 | tee "$OUT/anchor_llama8b.jsonl"
  fi
  d8() { # algo context batch tag
    timeout ${E2E_TIMEOUT:-400} "$bin/serve_bench" offline --cuda --shape llama3-8b --random-weights \
      --context $2 --new-tokens ${DECODE8B_NEW:-64} --batch $3 --algo $1 --budget 2048 --max-prefill-tokens 8192 \
      --csv "$OUT/d8_$4.csv" 2>&1 | tee "$OUT/d8_$4.txt" | grep -vE "prompt \+ .* output tokens"
  }
  for spec in ${DECODE8B_RUNS:-dense:32768:8 dense:131072:4 quest:131072:7}; do
    IFS=: read -r a l b <<< "$spec"; d8 "$a" "$l" "$b" "${a}_${l}_b$b"
  done
fi
if [ "$what" = capacity ]; then
  if [ -f "$here/torch_e2e_decode.py" ] && [ -n "${CAPACITY_ANCHOR:-}" ]; then
    python3 "$here/torch_e2e_decode.py" --shape llama8b --runs "$CAPACITY_ANCHOR" 2>&1 | tee "$OUT/anchor_capacity.jsonl"
  fi
  for spec in ${CAPACITY_RUNS:?set CAPACITY_RUNS}; do
    IFS=: read -r a l b h f <<< "$spec"
    tag="cap_${a}_${l}_b${b}_h${h}_f${f}${CAPACITY_TAG:-}"
    timeout ${E2E_TIMEOUT:-500} "$bin/serve_bench" offline --cuda --shape llama3-8b --random-weights \
      --context $l --new-tokens ${CAPACITY_NEW:-32} --batch $b --algo $a --budget 2048 --max-prefill-tokens 8192 \
      --fast-home-fraction $h --fast-fraction $f ${CAPACITY_FLAGS:-} --csv "$OUT/$tag.csv" 2> >(tee "$OUT/$tag.err" | grep -vE "prompt \+ .* output tokens" >&2) \
      | tee "$OUT/$tag.txt"
    nvidia-smi --query-gpu=memory.used --format=csv >> "$OUT/$tag.txt" 2>&1
  done
fi
if [ "$what" = trace ]; then
  timeout ${TRACE_TIMEOUT:-500} "$bin/serve_bench" accuracy --cuda --model "${SPINKV_MODEL:?set SPINKV_MODEL}" \
    --context ${TRACE_CONTEXT:-8192} --depths 0.1,0.3,0.5,0.7,0.9 --trials ${TRACE_TRIALS:-7} \
    --new-tokens ${TRACE_NEW:-64} --ignore-eos --algo quest --budget ${TRACE_BUDGET:-1024} \
    --trace-dir "$OUT/traces" 2>&1 | grep -vE "prompt \+ .* output" | tee "$OUT/trace.txt"
  xz -T0 "$OUT"/traces/*.csv
fi
# A device call brings back only a handful of files: pack this run's output into one.
if [ "${GPU_RUN_NO_TAR:-0}" != 1 ]; then
  t=/tmp/gpu-run-$what-$$.tgz
  tar czf "$t" -C "$OUT" --exclude='*.tgz' . && find "$OUT" -mindepth 1 -not -name '*.tgz' -delete && mv "$t" "$OUT/gpu-run-$what.tgz"
fi
