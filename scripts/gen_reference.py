#!/usr/bin/env python3
"""Reference vectors for libbeit's Hugging Face parity tests.

Run:   ~/torchref/bin/python scripts/gen_reference.py
Needs: torch, transformers, safetensors (see ../shared/DATA.md for the venv). CI does not run
this; it compares against the committed outputs under tests/reference/.

Each case directory holds:
  config.json, model.safetensors   exactly as transformers' save_pretrained writes them
  inputs.safetensors               pixel_values f32 [B,C,H,W] (+ bool_masked_pos u8 [B,N])
  outputs.safetensors              last_hidden_state (what HF BeitModel returns), pooler_output
                                   where a pooler exists, logits where the model has a head
  case.json                        what the case exercises
Every parameter is perturbed away from its init value (biases, layer scale, position tables,
tokens), so that a wrong rule for any of them shows in the outputs. Deterministic: fixed seeds.
"""
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling, BeitModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference")
CLASSES = {
    "BeitModel": BeitModel,
    "BeitForMaskedImageModeling": BeitForMaskedImageModeling,
    "BeitForImageClassification": BeitForImageClassification,
}


def perturb(model, gen):
    """Moves every parameter off its init value, with magnitudes that keep activations sane."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "lambda_" in name:
                p.copy_(0.1 * (1 + 0.3 * noise))
            elif "layernorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif "relative_position_bias_table" in name or "token" in name or "position_embeddings" in name:
                p.copy_(0.5 * noise)
            else:
                p.add_(0.04 * noise)


def make_case(name, arch, input_hw, masked=False, batch=2, **options):
    seed = sum(map(ord, name))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                image_size=32, patch_size=8, num_channels=3, vocab_size=64,
                drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(options)
    config = BeitConfig(**base)
    config._attn_implementation = "eager"
    model = CLASSES[arch](config).eval()
    perturb(model, gen)

    out_dir = os.path.join(ROOT, name)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)

    h, w = input_hw
    pixel_values = torch.randn(batch, config.num_channels, h, w, generator=gen)
    inputs = {"pixel_values": pixel_values.contiguous()}
    kwargs = {}
    if masked:
        n = (h // config.patch_size) * (w // config.patch_size)
        mask = torch.rand(batch, n, generator=gen) < 0.4
        mask[:, 0] = True
        mask[:, -1] = False
        inputs["bool_masked_pos"] = mask.to(torch.uint8).contiguous()
        kwargs["bool_masked_pos"] = mask
    save_file(inputs, os.path.join(out_dir, "inputs.safetensors"))

    outputs = {}
    with torch.no_grad():
        result = model(pixel_values, **kwargs)
        backbone = model if arch == "BeitModel" else model.beit
        base_out = backbone(pixel_values, **kwargs)
        outputs["last_hidden_state"] = base_out.last_hidden_state.contiguous()
        if base_out.pooler_output is not None:
            outputs["pooler_output"] = base_out.pooler_output.contiguous()
        if arch != "BeitModel":
            outputs["logits"] = result.logits.contiguous()
    save_file(outputs, os.path.join(out_dir, "outputs.safetensors"))

    description = {
        "architecture": arch,
        "options": {k: v for k, v in options.items()},
        "input_shape": list(pixel_values.shape),
        "bool_masked_pos": masked,
        "attn_implementation": "eager",
        "outputs": {k: list(v.shape) for k, v in outputs.items()},
    }
    with open(os.path.join(out_dir, "case.json"), "w") as f:
        json.dump(description, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"{name:28s} {arch:28s} input {list(pixel_values.shape)} -> "
          + ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items()))


def main():
    torch.set_num_threads(1)
    make_case("backbone_abs_mean", "BeitModel", (32, 32),
              use_absolute_position_embeddings=True, layer_scale_init_value=0.1, use_mean_pooling=True)
    make_case("backbone_shared_cls_noscale", "BeitModel", (32, 32),
              use_shared_relative_position_bias=True, layer_scale_init_value=0.0, use_mean_pooling=False,
              layer_norm_eps=1e-6)
    make_case("mim_shared", "BeitForMaskedImageModeling", (32, 32), masked=True,
              use_mask_token=True, use_shared_relative_position_bias=True, layer_scale_init_value=0.1)
    make_case("mim_abs_nomask", "BeitForMaskedImageModeling", (32, 32),
              use_mask_token=True, use_absolute_position_embeddings=True)
    make_case("cls_layer_rel_mean", "BeitForImageClassification", (32, 32),
              use_relative_position_bias=True, use_mean_pooling=True, num_labels=5)
    make_case("cls_all_pos_cls", "BeitForImageClassification", (32, 32),
              use_absolute_position_embeddings=True, use_shared_relative_position_bias=True,
              use_relative_position_bias=True, use_mean_pooling=False, num_labels=3, num_hidden_layers=3)
    make_case("grey_tiny32", "BeitForMaskedImageModeling", (32, 32), masked=True,
              num_channels=1, patch_size=4, hidden_size=48, num_attention_heads=3, intermediate_size=96,
              use_mask_token=True, use_shared_relative_position_bias=True, layer_scale_init_value=0.1)
    make_case("rect_layer_rel", "BeitForImageClassification", (24, 40),
              image_size=[24, 40], use_relative_position_bias=True, num_labels=7)
    make_case("resize_rel_abs", "BeitModel", (48, 48),
              use_relative_position_bias=True, use_absolute_position_embeddings=True)
    make_case("resize_rect_input", "BeitForImageClassification", (40, 24),
              use_shared_relative_position_bias=True, use_absolute_position_embeddings=True, num_labels=4)
    make_case("odd_size_mim", "BeitForMaskedImageModeling", (30, 30), masked=True,
              image_size=28, patch_size=4, use_mask_token=True, use_shared_relative_position_bias=True)
    with open(os.path.join(ROOT, "VERSIONS.txt"), "w") as f:
        f.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}\n"
                f"python {sys.version.split()[0]}\n")


if __name__ == "__main__":
    main()
