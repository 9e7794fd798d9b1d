#!/usr/bin/env bash
# spinkv: per-kernel GPU time and host time of decode steps through the engine, on the GPU
# machine, from the repository root after scripts/gpu-package.sh:
#   bash .device/gpu-profile.sh [B] [ALGOS] [NCU_B]      (results: $OUT/prof.tgz)
# 1. Nsight Compute times every kernel of one padded decode step (the work a CUDA graph
#    replays, run eagerly and serialized) at batch NCU_B (default 16), 8K context.
# 2. A graph run at batch B (default 64) without the profiler prints the host time of
#    the engine's steps by part (serve_bench --host-timing).
set -u
here=$(cd "$(dirname "$0")" && pwd)
export OUT=${OUT:-./gpu-out}
B=${1:-64}; ALGOS=${2:-dense quest}; NB=${3:-16}
R=$OUT/prof; mkdir -p $R
bin=/tmp/spinkv-bin; mkdir -p $bin
for f in "$here"/serve_bench.xz; do xz -dc "$f" > "$bin/$(basename "$f" .xz)"; chmod +x "$bin/$(basename "$f" .xz)"; done
for a in $ALGOS; do
  timeout 200 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
    --export $R/$a-b$NB --force-overwrite \
    $bin/serve_bench offline --cuda --shape smollm2-135m --random-weights --context 8192 \
    --batch $NB --budget 1024 --max-prefill-tokens 8192 --algo $a --new-tokens 24 --decode padded \
    --profile-steps 1 > $R/ncu-$a.txt 2>&1
  echo "ncu $a exit $?"
  ncu --import $R/$a-b$NB.ncu-rep --csv --page raw --metrics gpu__time_duration.sum > $R/$a-b$NB.csv 2>&1
  rm -f $R/$a-b$NB.ncu-rep; wc -l $R/$a-b$NB.csv
done
for a in $ALGOS; do
  timeout 150 $bin/serve_bench offline --cuda --shape smollm2-135m --random-weights --context 8192 \
    --batch $B --budget 1024 --max-prefill-tokens 8192 --algo $a --new-tokens 160 --host-timing > $R/graphs-$a.txt 2>&1
  echo "graphs $a exit $?"; grep -E "decode Graphs|^\| offline|^    [a-z]" $R/graphs-$a.txt
done
tar czf $OUT/prof.tgz -C $OUT prof && rm -rf $R
