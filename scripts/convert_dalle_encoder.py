#!/usr/bin/env python3
"""Converts OpenAI's DALL-E encoder checkpoint (`encoder.pkl`) into a libbeit tokenizer directory.

The official file is a pickled whole `dall_e.encoder.Encoder` module, so unpickling needs the
`dall_e` package (`pip install DALL-E`, plus torch) — once, here; libbeit then reads the
safetensors it writes. Usage:

    python scripts/convert_dalle_encoder.py --encoder encoder.pkl --out dalle-tokenizer/
    beit tokenize --tokenizer dalle-tokenizer --data images.beitds --out images-tokens.beitds

Writes OUT/config.json (the DALL-E architecture: 3 channels, 112 px, 8192 codes, n_hid 256,
4 groups of 2 blocks) and OUT/model.safetensors with DALL-E's parameter names (`blocks.input.w`,
`blocks.group_1.block_1.res_path.conv_1.w`, ..., `blocks.output.conv.w`), in fp32.
The architecture is read from the module, not assumed, so other DALL-E-style encoders work too.

Precision note (BEIT_SPEC.md section 8): on CUDA the official encoder runs its convolutions in
fp16, so argmax tokens computed there can differ from fp32 tokens (libbeit's CPU path) where the
top two logits are nearly tied.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", required=True, help="encoder.pkl (a pickled dall_e Encoder) or a state-dict file")
    ap.add_argument("--out", required=True)
    ap.add_argument("--image-size", type=int, default=112, help="resolution the tokenizer is used at (BEiT: 112)")
    args = ap.parse_args()

    obj = torch.load(args.encoder, map_location="cpu", weights_only=False)
    state = obj.state_dict() if hasattr(obj, "state_dict") else obj
    state = {k: v.detach().float().contiguous() for k, v in state.items()}

    w_in = state["blocks.input.w"]
    w_out = state["blocks.output.conv.w"]
    groups = sorted({int(k.split(".")[1].split("_")[1]) for k in state if k.startswith("blocks.group_")})
    blocks = sorted({int(k.split(".")[2].split("_")[1]) for k in state if k.startswith("blocks.group_1.")})
    config = dict(
        model_type="beit-dvae",
        in_channels=int(w_in.shape[1]),
        image_size=args.image_size,
        vocab_size=int(w_out.shape[0]),
        n_hid=int(w_in.shape[0]),
        group_count=len(groups),
        n_blk_per_group=len(blocks),
        decoder_n_init=None,
    )
    unexpected = [k for k in state if not k.startswith("blocks.")]
    if unexpected:
        raise SystemExit(f"unexpected parameters (not a DALL-E encoder?): {unexpected[:5]}")
    os.makedirs(args.out, exist_ok=True)
    save_file(state, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(json.dumps({"out": args.out, "parameters": sum(v.numel() for v in state.values()), **config}))


if __name__ == "__main__":
    main()
