#!/usr/bin/env bash
# spinkv: builds the CUDA test binaries and the GPU bench on this (GPU-less) machine and
# packs them, xz-compressed, with scripts/device-env.sh and scripts/gpu-run.sh into
# .device/ (listed in .git/info/exclude), ready to carry to a GPU machine.
#
# Usage: scripts/gpu-package.sh        (needs the toolchain env: source PREFIX/env.sh)
# Then on the GPU machine, from the repository root: bash .device/gpu-run.sh [tests|bench|sanitize|e2e|all]
# The PyTorch anchor (../shared/anchors/torch_e2e_decode.py) travels in .device/ too.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=target}"
export CARGO_TARGET_DIR
git check-ignore -q .device 2>/dev/null || echo '/.device/' >> .git/info/exclude
TESTS="tiered_attention quest_q8 cuda_ops cuda_infllm cuda_shadowkv cuda_cache cuda_tiered cuda_pinned device_lru device_lru_direct fast_homes device_tables model_ops logits_f32 sample_rows prefill_attention cuda_graphs"
EXAMPLES="tiered_step_bench gpu_bench infllm_bench generate serve_bench prefill_bench needle_suite"
cargo build --release --features cuda $(for e in $EXAMPLES; do echo --example $e; done)
cargo test --release --features cuda --no-run $(for t in $TESTS; do echo --test $t; done) 2>&1 | tee /tmp/spinkv-testbins.txt
rm -rf .device && mkdir -p .device
for t in $TESTS; do
  bin=$(grep -oE "target[^ ]*/deps/${t}-[0-9a-f]+|/[^ ]*/deps/${t}-[0-9a-f]+" /tmp/spinkv-testbins.txt | tail -1)
  case "$bin" in /*) ;; *) bin="$CARGO_TARGET_DIR/${bin#target/}";; esac
  xz -T0 -6 -c "$bin" > ".device/$t.xz"
done
for e in $EXAMPLES; do
  xz -T0 -6 -c "$CARGO_TARGET_DIR/release/examples/$e" > ".device/$e.xz"
done
cp scripts/device-env.sh scripts/gpu-run.sh scripts/gpu-e2e.sh scripts/gpu-profile.sh scripts/gpu-layout.sh scripts/sdpa_prefill.py .device/
anchor=${SPINKV_ANCHOR:-../shared/anchors/torch_e2e_decode.py}
if [ -f "$anchor" ]; then cp "$anchor" .device/; else echo "note: no anchor at $anchor (set SPINKV_ANCHOR)"; fi
ls -la .device
