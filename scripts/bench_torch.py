#!/usr/bin/env python3
"""PyTorch reference timings for scripts/bench-vs-torch, printed as JSON lines on stdout.

(a) fp32 GEMM GFLOP/s of torch.nn.functional.linear(x, w, b) on the BEiT-Base Linear shapes
    (batch 8 x 197 tokens), plus the per-head attention score product q[197,64] . k[197,64]^T
    on one thread (what libbeit's attention runs per head).
(b) Hugging Face BeitForImageClassification BEiT-Base/16 224 (BeitConfig(use_relative_position_bias
    =True, num_labels=1000)) inference images/s: eval, no_grad, fp32, for attn_implementation
    "sdpa" (the HF default) and "eager".

--save-model DIR saves that exact model (save_pretrained, safetensors) so libbeit can time the
same weights. Every line is a JSON object with a "kind" field: "env", "gemm", "infer", "saved".
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

BATCH_TOKENS = 8 * 197
LINEAR_SHAPES = [  # name, m, k, n
    ("qkv", BATCH_TOKENS, 768, 2304),
    ("attn_out", BATCH_TOKENS, 768, 768),
    ("mlp_fc1", BATCH_TOKENS, 768, 3072),
    ("mlp_fc2", BATCH_TOKENS, 3072, 768),
]
SCORE_SHAPE = ("attn_scores_1head", 197, 64, 197)


def emit(obj):
    print(json.dumps(obj), flush=True)


def time_median(fn, min_s, min_reps=5, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_s:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(times)


def bench_gemm(threads, min_s):
    gen = torch.Generator().manual_seed(0)
    for name, m, k, n in LINEAR_SHAPES:
        x = torch.randn(m, k, generator=gen)
        w = torch.randn(n, k, generator=gen)
        b = torch.randn(n, generator=gen)
        y = torch.empty(m, n)
        flops = 2 * m * n * k
        with torch.inference_mode():
            # As a model calls it: a fresh output tensor every call.
            t, reps = time_median(lambda: torch.nn.functional.linear(x, w, b), min_s)
            # Into a preallocated output (what libbeit's linear does): no allocation, no page faults.
            t_out, reps_out = time_median(lambda: torch.addmm(b, x, w.t(), out=y), min_s)
        emit({"kind": "gemm", "shape": name, "m": m, "k": k, "n": n, "threads": threads,
              "median_s": t, "gflops": flops / t / 1e9, "reps": reps,
              "median_s_out": t_out, "gflops_out": flops / t_out / 1e9})
    name, m, k, n = SCORE_SHAPE
    q = torch.randn(m, k, generator=gen)
    kk = torch.randn(n, k, generator=gen)
    s = torch.empty(m, n)
    scale = k ** -0.5
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            t, reps = time_median(lambda: torch.mm(q, kk.t(), out=s).mul_(scale), min_s)
            t_out, _ = time_median(lambda: torch.addmm(s, q, kk.t(), beta=0.0, alpha=scale, out=s), min_s)
    finally:
        torch.set_num_threads(threads)
    flops = 2 * m * n * k
    emit({"kind": "gemm", "shape": name, "m": m, "k": k, "n": n, "threads": 1,
          "median_s": t, "gflops": flops / t / 1e9, "reps": reps,
          "median_s_out": t_out, "gflops_out": flops / t_out / 1e9})


def build_model(attn_implementation):
    from transformers import BeitConfig, BeitForImageClassification

    config = BeitConfig(use_relative_position_bias=True, num_labels=1000)
    torch.manual_seed(0)
    model = BeitForImageClassification._from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def bench_infer(model, attn_implementation, threads, batch, iters):
    cfg = model.config
    pixels = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size,
                         generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(pixel_values=pixels)  # warm-up
        times = []
        for _ in range(max(iters, 1)):
            t = time.perf_counter()
            model(pixel_values=pixels)
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    emit({"kind": "infer", "attn_implementation": model.config._attn_implementation,
          "requested": attn_implementation, "batch": batch, "threads": threads, "iters": len(times),
          "median_s": med, "images_per_s": batch / med,
          "params": sum(p.numel() for p in model.parameters())})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--gemm-min-s", type=float, default=1.0, help="minimum timed seconds per GEMM shape")
    ap.add_argument("--save-model", metavar="DIR", help="save the HF BEiT-Base model here (safetensors)")
    ap.add_argument("--skip-gemm", action="store_true")
    ap.add_argument("--skip-infer", action="store_true")
    ap.add_argument("--attn", default="sdpa,eager", help="comma-separated attn implementations to time")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    import transformers

    emit({"kind": "env", "torch": torch.__version__, "transformers": transformers.__version__,
          "python": platform.python_version(), "threads": torch.get_num_threads(),
          "mkldnn": torch.backends.mkldnn.is_available(), "mkl": torch.backends.mkl.is_available(),
          "cpu_capability": torch.backends.cpu.get_cpu_capability()})

    if not args.skip_gemm:
        bench_gemm(args.threads, args.gemm_min_s)

    saved = False
    for impl in [a for a in args.attn.split(",") if a]:
        model = build_model(impl)
        if args.save_model and not saved:
            os.makedirs(args.save_model, exist_ok=True)
            model.save_pretrained(args.save_model, safe_serialization=True)
            emit({"kind": "saved", "dir": args.save_model,
                  "files": sorted(os.listdir(args.save_model))})
            saved = True
        if not args.skip_infer:
            bench_infer(model, impl, args.threads, args.batch, args.iters)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
