#!/usr/bin/env python3
"""Gradient reference for the dVAE's encoder and decoder (tests/dvae.rs).

Builds, in PyTorch, the tokenizer networks of src/dvae/network.rs at a tiny size: the DALL-E
encoder (see gen_dalle_reference.py) and libbeit's decoder (DALL-E's decoder blocks: 1x1 conv
from the codes, groups of residual blocks with widths 4n, 2n, n whose res path is ReLU,1x1,
ReLU,3x3,ReLU,3x3,ReLU,3x3, a 4x4 stride-2 ConvTranspose2d after every group but the last, then
ReLU and a 1x1 conv to pixels). With random weights and biases it evaluates
  L_enc = sum(encoder(x) * r_enc)   and   L_dec = sum(decoder(codes) * r_dec)
and writes every parameter gradient (and dL_dec/dcodes) from autograd.

Run:  ~/torchref/bin/python scripts/gen_dvae_grad_reference.py
Writes tests/reference_dvae/grad_tiny/{config.json, model.safetensors, grads.safetensors}.
"""
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "reference_dvae", "grad_tiny")
C = dict(model_type="beit-dvae", in_channels=1, image_size=8, vocab_size=12, n_hid=8,
         group_count=2, n_blk_per_group=2, decoder_n_init=8)


def conv_params(params, name, n_in, n_out, k, transposed=False):
    shape = [n_in, n_out, k, k] if transposed else [n_out, n_in, k, k]
    fan_in = (n_out if transposed else n_in) * k * k
    params[f"{name}.w"] = (torch.randn(*shape) / fan_in ** 0.5).requires_grad_()
    params[f"{name}.b"] = (torch.randn(n_out) * 0.1).requires_grad_()


def block_params(params, name, n_in, n_out, kernels):
    hid = n_out // 4
    if n_in != n_out:
        conv_params(params, f"{name}.id_path", n_in, n_out, 1)
    widths = [(n_in, hid), (hid, hid), (hid, hid), (hid, n_out)]
    for i, ((a, b), k) in enumerate(zip(widths, kernels)):
        conv_params(params, f"{name}.res_path.conv_{i + 1}", a, b, k)


def conv(p, name, x, k):
    return F.conv2d(x, p[f"{name}.w"], p[f"{name}.b"], padding=(k - 1) // 2)


def block(p, name, x, n_in, n_out, kernels, gain):
    r = x
    for i, k in enumerate(kernels):
        r = conv(p, f"{name}.res_path.conv_{i + 1}", F.relu(r), k)
    identity = conv(p, f"{name}.id_path", x, 1) if n_in != n_out else x
    return identity + gain * r


def main():
    torch.manual_seed(4242)
    n, G, nb, V = C["n_hid"], C["group_count"], C["n_blk_per_group"], C["vocab_size"]
    gain = 1.0 / (G * nb) ** 2
    p = {}
    # Encoder.
    conv_params(p, "encoder.blocks.input", C["in_channels"], n, 7)
    width, enc_blocks = n, []
    for g in range(1, G + 1):
        out = n * 2 ** (g - 1)
        for k in range(1, nb + 1):
            name = f"encoder.blocks.group_{g}.block_{k}"
            block_params(p, name, width, out, [3, 3, 3, 1])
            enc_blocks.append((name, width, out, g, k == nb))
            width = out
    conv_params(p, "encoder.blocks.output.conv", width, V, 1)
    # Decoder.
    conv_params(p, "decoder.blocks.input", V, C["decoder_n_init"], 1)
    width, dec_blocks = C["decoder_n_init"], []
    for g in range(1, G + 1):
        out = n * 2 ** (G - g)
        for k in range(1, nb + 1):
            name = f"decoder.blocks.group_{g}.block_{k}"
            block_params(p, name, width, out, [1, 3, 3, 3])
            dec_blocks.append((name, width, out, g, k == nb))
            width = out
        if g < G:
            conv_params(p, f"decoder.blocks.group_{g}.upsample", width, width, 4, transposed=True)
    conv_params(p, "decoder.blocks.output.conv", width, C["in_channels"], 1)

    B, S, grid = 2, C["image_size"], C["image_size"] // 2 ** (G - 1)
    x = 0.8 * torch.rand(B, C["in_channels"], S, S) + 0.1
    h = conv(p, "encoder.blocks.input", x, 7)
    for name, a, b, g, last in enc_blocks:
        h = block(p, name, h, a, b, [3, 3, 3, 1], gain)
        if last and g < G:
            h = F.max_pool2d(h, 2)
    logits = conv(p, "encoder.blocks.output.conv", F.relu(h), 1)
    r_enc = torch.randn_like(logits)
    (logits * r_enc).sum().backward()

    codes = torch.softmax(torch.randn(B, V, grid, grid) * 2, dim=1).requires_grad_()
    d = conv(p, "decoder.blocks.input", codes, 1)
    for name, a, b, g, last in dec_blocks:
        d = block(p, name, d, a, b, [1, 3, 3, 3], gain)
        if last and g < G:
            d = F.conv_transpose2d(d, p[f"decoder.blocks.group_{g}.upsample.w"],
                                   p[f"decoder.blocks.group_{g}.upsample.b"], stride=2, padding=1)
    pixels = conv(p, "decoder.blocks.output.conv", F.relu(d), 1)
    r_dec = torch.randn_like(pixels)
    (pixels * r_dec).sum().backward()

    token_major = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).contiguous()
    os.makedirs(OUT, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in p.items()}, os.path.join(OUT, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(C, f, indent=2)
    tensors = {f"grad.{k}": v.grad.contiguous() for k, v in p.items()}
    tensors.update({"x": x.contiguous(), "r_enc_token_major": token_major(r_enc), "logits_token_major": token_major(logits.detach()),
                    "codes_token_major": token_major(codes.detach()), "grad_codes_token_major": token_major(codes.grad),
                    "r_dec": r_dec.contiguous(), "pixels": pixels.detach().contiguous()})
    save_file(tensors, os.path.join(OUT, "grads.safetensors"))
    print(f"wrote {OUT}: {sum(v.numel() for v in p.values())} parameters")


if __name__ == "__main__":
    main()
