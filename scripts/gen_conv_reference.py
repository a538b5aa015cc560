#!/usr/bin/env python3
"""PyTorch reference vectors for libbeit's CPU convolution and pooling ops (src/backend/cpu/conv.rs,
pool.rs), compared by tests/conv.rs.

Run:   /root/torchref/bin/python scripts/gen_conv_reference.py [--out DIR]
       (DIR defaults to tests/reference_conv; regenerate into another folder and `cmp` the files
        to check reproducibility). Needs torch and safetensors. CI does not run this: the Rust
        test reads only the committed files.

Files (all tensors f32 unless noted; every case's tensors are prefixed with its name, e.g. "k3s1."):
  conv2d.safetensors            torch.nn.functional.conv2d cases
  conv_transpose2d.safetensors  torch.nn.functional.conv_transpose2d cases (weight [in, out, k, k])
      <case>.shape    i64 [8]: batch, in_channels, out_channels, in_h, in_w, kernel, stride, padding
      <case>.x, .weight, .bias (absent: no bias), .out, .dout (random upstream gradient),
      <case>.dx, .dweight, .dbias (absent with no bias): gradients of sum(out * dout)
  pool.safetensors
      maxpool_<h>x<w>.shape i64 [4] (batch, channels, h, w); .x, .out, .indices (i64, index within
      the h*w plane as MaxPool2d(2, return_indices=True) gives), .dout, .dx
      upsample_<h>x<w>.shape i64 [4]; .x, .out (nn.Upsample(scale_factor=2, mode="nearest")), .dout, .dx

Inputs are drawn in f32 (fixed seed, CPU generator) and every op runs in float64 on those exact
values, so the stored results are the exact answer rounded once to f32: the Rust comparison
measures only the Rust side's f32 rounding.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

# name: (batch, in_channels, out_channels, in_h, in_w, kernel, stride, padding, bias)
CONV2D = {
    "k1s1": (3, 6, 4, 5, 6, 1, 1, 0, False),
    "k3s1p1": (2, 3, 4, 9, 7, 3, 1, 1, True),
    "k7s1p3": (1, 3, 5, 11, 9, 7, 1, 3, True),
    "k4s2p1": (2, 4, 5, 8, 8, 4, 2, 1, True),
    "k3s2p0_odd": (2, 3, 3, 9, 7, 3, 2, 0, True),
}
CONV_TRANSPOSE2D = {
    "k4s2p1": (2, 4, 3, 5, 4, 4, 2, 1, True),
    "k3s1p1": (2, 3, 4, 6, 5, 3, 1, 1, True),
    "k2s2p0": (2, 3, 2, 3, 4, 2, 2, 0, False),
}
# (batch, channels, h, w)
MAXPOOL = [(2, 3, 6, 8), (2, 2, 7, 9)]
UPSAMPLE = [(2, 3, 3, 5)]


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def grads(fn, inputs, dout):
    """Runs fn in float64 on leaf copies of `inputs`; returns (out, [d sum(out*dout) / d input])."""
    leaves = [t.double().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    (out * dout.double()).sum().backward()
    return out.detach().float(), [t.grad.float() for t in leaves]


def conv_cases(cases, transpose, gen):
    tensors = {}
    for name, (b, ci, co, h, w, k, s, p, has_bias) in cases.items():
        x = randn(gen, b, ci, h, w)
        weight = randn(gen, *((ci, co, k, k) if transpose else (co, ci, k, k))) * (1.0 / (ci * k * k) ** 0.5)
        bias = randn(gen, co) if has_bias else None
        op = F.conv_transpose2d if transpose else F.conv2d
        inputs = [x, weight] + ([bias] if has_bias else [])

        def fn(x, w, *bias):
            return op(x, w, bias[0] if bias else None, stride=s, padding=p)

        with torch.no_grad():
            out_shape = fn(*[t.double() for t in inputs]).shape
        dout = randn(gen, *out_shape)
        out, g = grads(fn, inputs, dout)
        t = {"shape": torch.tensor([b, ci, co, h, w, k, s, p], dtype=torch.int64), "x": x, "weight": weight,
             "out": out, "dout": dout, "dx": g[0], "dweight": g[1]}
        if has_bias:
            t["bias"] = bias
            t["dbias"] = g[2]
        tensors.update({f"{name}.{k_}": v.contiguous() for k_, v in t.items()})
    return tensors


def pool_cases(gen):
    tensors = {}
    for b, c, h, w in MAXPOOL:
        name = f"maxpool_{h}x{w}"
        x = randn(gen, b, c, h, w)
        with torch.no_grad():
            _, indices = F.max_pool2d(x.double(), 2, return_indices=True)
        dout = randn(gen, b, c, h // 2, w // 2)
        out, g = grads(lambda x: F.max_pool2d(x, 2), [x], dout)
        t = {"shape": torch.tensor([b, c, h, w], dtype=torch.int64), "x": x, "out": out, "indices": indices,
             "dout": dout, "dx": g[0]}
        tensors.update({f"{name}.{k_}": v.contiguous() for k_, v in t.items()})
    for b, c, h, w in UPSAMPLE:
        name = f"upsample_{h}x{w}"
        x = randn(gen, b, c, h, w)
        dout = randn(gen, b, c, 2 * h, 2 * w)
        out, g = grads(lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), [x], dout)
        t = {"shape": torch.tensor([b, c, h, w], dtype=torch.int64), "x": x, "out": out, "dout": dout, "dx": g[0]}
        tensors.update({f"{name}.{k_}": v.contiguous() for k_, v in t.items()})
    return tensors


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "reference_conv"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    # One metadata key: safetensors writes a dict's keys in hash order, which would break cmp.
    meta = {"generator": f"scripts/gen_conv_reference.py, torch {torch.__version__}"}
    # One generator per file, so adding a case to one file leaves the others unchanged.
    files = {
        "conv2d.safetensors": lambda: conv_cases(CONV2D, False, torch.Generator().manual_seed(1)),
        "conv_transpose2d.safetensors": lambda: conv_cases(CONV_TRANSPOSE2D, True, torch.Generator().manual_seed(2)),
        "pool.safetensors": lambda: pool_cases(torch.Generator().manual_seed(3)),
    }
    for fname, make in files.items():
        save_file(make(), os.path.join(args.out, fname), metadata=meta)


if __name__ == "__main__":
    main()
