#!/usr/bin/env python3
"""Loads a model directory (e.g. written by libbeit) in transformers and checks it.

  ~/torchref/bin/python scripts/check_hf_load.py DIR [--inputs IN.safetensors --outputs OUT.safetensors]

The transformers class is the first entry of config.json "architectures" (BeitModel,
BeitForMaskedImageModeling, BeitForImageClassification, ...). The load is strict: any missing,
unexpected or mismatched key, or loader error, is a failure. Without --inputs/--outputs it only
loads and prints the parameter count.

With --inputs/--outputs it runs the model (eval, no_grad, fp32, eager attention) on
`pixel_values` (+ `bool_masked_pos`, any integer/bool dtype, if present) and compares with the
outputs file: `last_hidden_state` (for head models taken from model.beit, i.e. what BeitModel
returns), `pooler_output`, `logits`. Each must satisfy |ours - theirs| <= 1e-4 * max(1, |theirs|).
Prints max |diff| per tensor; exits 1 on any failure, 0 otherwise. Output names it does not know
are reported and skipped.

Example (round trip of a committed case):
  ~/torchref/bin/python scripts/check_hf_load.py tests/reference/mim_shared \
      --inputs tests/reference/mim_shared/inputs.safetensors \
      --outputs tests/reference/mim_shared/outputs.safetensors
"""
import argparse
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file

TOL = 1e-4


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--inputs")
    ap.add_argument("--outputs")
    args = ap.parse_args()
    if bool(args.inputs) != bool(args.outputs):
        ap.error("--inputs and --outputs go together")
    torch.set_num_threads(1)

    with open(os.path.join(args.dir, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        print(f"FAIL: transformers {transformers.__version__} has no class {arch}")
        return 1
    model, info = cls.from_pretrained(args.dir, output_loading_info=True, attn_implementation="eager",
                                      dtype=torch.float32)
    bad = {k: sorted(v) for k, v in info.items() if v}
    if bad:
        print(f"FAIL: strict load of {arch} from {args.dir}: {bad}")
        return 1
    model.eval()
    print(f"{arch}: loaded strictly, {sum(p.numel() for p in model.parameters())} parameters "
          f"(transformers {transformers.__version__}, torch {torch.__version__})")
    if not args.inputs:
        return 0

    inputs = load_file(args.inputs)
    pixel_values = inputs["pixel_values"].float()
    kwargs = {}
    if "bool_masked_pos" in inputs:
        kwargs["bool_masked_pos"] = inputs["bool_masked_pos"] != 0
    want = load_file(args.outputs)
    with torch.no_grad():
        base = model if arch == "BeitModel" else getattr(model, "beit")
        b = base(pixel_values, **kwargs)
        got = {"last_hidden_state": b.last_hidden_state, "pooler_output": b.pooler_output}
        if arch != "BeitModel":
            got["logits"] = getattr(model(pixel_values, output_hidden_states=False, **kwargs), "logits", None)

    failed = False
    for name, w in sorted(want.items()):
        if name not in got:
            print(f"{name:18s} skipped: not an output this script knows")
            continue
        g = got[name]
        if g is None:
            print(f"{name:18s} FAIL: transformers gives no {name} for {arch}")
            failed = True
            continue
        if tuple(g.shape) != tuple(w.shape):
            print(f"{name:18s} FAIL: shape {list(w.shape)} in the file, transformers gives {list(g.shape)}")
            failed = True
            continue
        w = w.float()
        diff = (g - w).abs()
        ratio = (diff / (TOL * w.abs().clamp(min=1))).max().item()
        ok = ratio <= 1 and torch.isfinite(w).all().item()
        print(f"{name:18s} {list(w.shape)} max |diff| {diff.max().item():.3e}  worst/tolerance {ratio:.4f}"
              f"  {'ok' if ok else 'FAIL'}")
        failed |= not ok
    for name, g in got.items():
        if g is not None and name not in want:
            print(f"{name:18s} not in the outputs file (not compared)")
    print("FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
