#!/usr/bin/env python3
# spinkv: PyTorch SDPA causal prefill attention alone (bf16, GQA), the reference for
# examples/prefill_bench.rs, at the same shapes and lengths. Prints one JSON line per
# point: ms (median of 7 after 2 warm-ups, CUDA events) and TFLOP/s (4·Hq·L²·D/2).
import json, sys, torch
import torch.nn.functional as F

lengths = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "8192,32768").split(",")]
for shape, hq, hkv, d in (("llama3-8b", 32, 8, 128), ("smollm2-135m", 9, 3, 64)):
    for L in lengths:
        q = torch.randn(1, hq, L, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, L, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        f(); f(); torch.cuda.synchronize()
        ts = []
        for _ in range(7):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); f(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
        ms = sorted(ts)[3]
        flops = 4 * hq * L * L * d / 2
        print(json.dumps({"shape": shape, "L": L, "sdpa_ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}), flush=True)
        del q, k, v
