#!/usr/bin/env python3
"""Loads a model directory written by libbeit in transformers and checks it.

  ~/torchref/bin/python scripts/check_hf_load.py DIR [--inputs IN.safetensors --outputs OUT.safetensors]

Strict load (missing or unexpected keys are an error). With --inputs/--outputs, runs the model
(eval, fp32, eager attention) and compares last_hidden_state / pooler_output / logits to the
outputs file within 1e-4 (absolute, or relative above 1); exits non-zero on any failure.
"""
import argparse
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--inputs")
    ap.add_argument("--outputs")
    args = ap.parse_args()
    arch = json.load(open(os.path.join(args.dir, "config.json")))["architectures"][0]
    cls = getattr(transformers, arch)
    model, info = cls.from_pretrained(args.dir, output_loading_info=True, attn_implementation="eager")
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        print(f"FAIL: loading info {bad}")
        return 1
    model.eval()
    print(f"{arch}: loaded strictly, {sum(p.numel() for p in model.parameters())} parameters")
    if not args.inputs:
        return 0
    inputs = load_file(args.inputs)
    kwargs = {}
    if "bool_masked_pos" in inputs:
        kwargs["bool_masked_pos"] = inputs["bool_masked_pos"].bool()
    want = load_file(args.outputs)
    with torch.no_grad():
        out = model(inputs["pixel_values"], **kwargs)
        base = model if arch == "BeitModel" else model.beit
        b = base(inputs["pixel_values"], **kwargs)
    got = {"last_hidden_state": b.last_hidden_state, "pooler_output": b.pooler_output,
           "logits": getattr(out, "logits", None)}
    failed = False
    for name, w in want.items():
        g = got.get(name)
        if g is None:
            print(f"FAIL: transformers gives no {name}")
            failed = True
            continue
        ratio = ((g - w).abs() / (1e-4 * w.abs().clamp(min=1))).max().item()
        print(f"{name:18s} max |diff| {(g - w).abs().max().item():.3e}  worst/tolerance {ratio:.4f}")
        failed |= ratio > 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
