#!/usr/bin/env python3
"""Reference vectors for the DALL-E-architecture encoder (tests/dvae.rs).

Builds the encoder of openai/DALL-E (`dall_e/encoder.py`) in PyTorch from the architecture as
BEIT_SPEC.md section 8 states it (7x7 input conv; groups of residual blocks with widths n, 2n,
4n, 8n; hidden width n_out/4; id path a 1x1 conv when the width changes; res path ReLU,3x3,
ReLU,3x3,ReLU,3x3,ReLU,1x1; out = id + res / (group_count * n_blk_per_group)^2; 2x max pool
after every group but the last; ReLU and a 1x1 conv to the logits), at a small size, with random
weights, and writes for a few mapped input images the logits and the argmax tokens.

Run with the oracle venv:  ~/torchref/bin/python scripts/gen_dalle_reference.py
Writes tests/reference_dvae/dalle_small/{config.json, model.safetensors, io.safetensors}.
The weights use DALL-E's own (bare) names, `blocks.input.w` ..., as a converted official
checkpoint does (scripts/convert_dalle_encoder.py).
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "reference_dvae", "dalle_small")

CONFIG = dict(model_type="beit-dvae", in_channels=3, image_size=32, vocab_size=96, n_hid=16,
              group_count=4, n_blk_per_group=2, decoder_n_init=None)


class Conv(nn.Module):
    """DALL-E's Conv2d: parameters `w` [out, in, k, k] and `b`, 'same' padding."""

    def __init__(self, n_in, n_out, k):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, k, k) / (n_in * k * k) ** 0.5)
        self.b = nn.Parameter(torch.randn(n_out) * 0.1)
        self.k = k

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=(self.k - 1) // 2)


class EncoderBlock(nn.Module):
    def __init__(self, n_in, n_out, n_layers):
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Module()
        self.res_path.conv_1 = Conv(n_in, hid, 3)
        self.res_path.conv_2 = Conv(hid, hid, 3)
        self.res_path.conv_3 = Conv(hid, hid, 3)
        self.res_path.conv_4 = Conv(hid, n_out, 1)

    def forward(self, x):
        r = x
        for conv in [self.res_path.conv_1, self.res_path.conv_2, self.res_path.conv_3, self.res_path.conv_4]:
            r = conv(F.relu(r))
        return self.id_path(x) + self.post_gain * r


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        n, g_count, n_blk = c["n_hid"], c["group_count"], c["n_blk_per_group"]
        n_layers = g_count * n_blk
        self.blocks = nn.Module()
        self.blocks.input = Conv(c["in_channels"], n, 7)
        self.groups = []
        width = n
        for g in range(1, g_count + 1):
            group = nn.Module()
            out = n * 2 ** (g - 1)
            for k in range(1, n_blk + 1):
                setattr(group, f"block_{k}", EncoderBlock(width, out, n_layers))
                width = out
            setattr(self.blocks, f"group_{g}", group)
            self.groups.append((group, n_blk, g < g_count))
        self.blocks.output = nn.Module()
        self.blocks.output.conv = Conv(width, c["vocab_size"], 1)

    def forward(self, x):
        x = self.blocks.input(x)
        for group, n_blk, pool in self.groups:
            for k in range(1, n_blk + 1):
                x = getattr(group, f"block_{k}")(x)
            if pool:
                x = F.max_pool2d(x, 2)
        return self.blocks.output.conv(F.relu(x))


def main():
    torch.manual_seed(20211)
    enc = Encoder(CONFIG).eval()
    images = torch.rand(4, 3, 32, 32)
    mapped = 0.8 * images + 0.1  # DALL-E map_pixels
    with torch.no_grad():
        logits = enc(mapped)  # [B, V, 4, 4]
    tokens = logits.argmax(1).flatten(1)  # [B, 16], row-major grid
    top2 = logits.topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    os.makedirs(OUT, exist_ok=True)
    weights = {k: v.contiguous() for k, v in enc.state_dict().items()}
    save_file(weights, os.path.join(OUT, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    save_file({"mapped_pixels": mapped.contiguous(),
               "logits_token_major": logits.permute(0, 2, 3, 1).reshape(-1, CONFIG["vocab_size"]).contiguous(),
               "tokens": tokens.to(torch.int64).contiguous()},
              os.path.join(OUT, "io.safetensors"))
    print(f"wrote {OUT}: {sum(v.numel() for v in weights.values())} parameters, "
          f"smallest top-1/top-2 logit margin {margin:.4g}")


if __name__ == "__main__":
    main()
