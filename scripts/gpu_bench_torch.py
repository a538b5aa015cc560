"""torch.matmul (bf16) on the shapes of tests/cuda_bench.rs, for scripts/gpu-check's side-by-side
report. Prints one JSON object per shape; same timing scheme (warm-up, ~0.2 s of launches between
two synchronisations)."""
import json
import sys
import time

import torch

# Keep in step with SHAPES in tests/cuda_bench.rs.
SHAPES = [
    ("qkv_linear", 1, 12608, 2304, 768, True),
    ("attn_out_linear", 1, 12608, 768, 768, True),
    ("mlp_fc1", 1, 12608, 3072, 768, True),
    ("mlp_fc2", 1, 12608, 768, 3072, True),
    ("attn_scores_qkT", 768, 197, 197, 64, True),
    ("attn_pv", 768, 197, 64, 197, False),
]


def main():
    dev = torch.device("cuda")
    out = []
    for name, batch, m, n, k, trans_b in SHAPES:
        a = torch.zeros(batch, m, k, dtype=torch.bfloat16, device=dev)
        b = torch.zeros(batch, n, k, dtype=torch.bfloat16, device=dev) if trans_b else torch.zeros(
            batch, k, n, dtype=torch.bfloat16, device=dev)
        if batch == 1:
            a, b = a[0], b[0]
        bb = b.transpose(-1, -2) if trans_b else b
        for _ in range(5):
            torch.matmul(a, bb)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, bb)
        torch.cuda.synchronize()
        once = max(time.perf_counter() - t0, 1e-6)
        iters = min(max(int(0.2 / once), 10), 2000)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, bb)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / iters
        rec = {"impl": "torch", "name": name, "batch": batch, "m": m, "n": n, "k": k, "trans_b": trans_b,
               "dtype": "bf16", "ms": seconds * 1e3, "tflops": 2.0 * batch * m * n * k / seconds / 1e12,
               "iters": iters, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
        print(json.dumps(rec))
        out.append(rec)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            for rec in out:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
