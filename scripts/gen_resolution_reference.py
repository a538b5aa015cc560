#!/usr/bin/env python3
"""Reference values for fine-tuning at another resolution than pretraining (Model::with_image_size).

Run:   ~/torchref/bin/python scripts/gen_resolution_reference.py [--out DIR]
       (DIR defaults to tests/reference_resolution; the Rust test is tests/resolution_change.rs)
Needs: torch, transformers, safetensors (the ~/torchref venv).

Each case is a tiny transformers BeitForImageClassification made at image_size 16 (patch 4, a 4x4
grid), parameters perturbed as scripts/gen_reference.py does, run by transformers' OWN code at
another input size with interpolate_pos_encoding=True. transformers resizes, on every forward:
  - each relative position bias table (BeitRelativePositionBias.forward: the first M-3 rows as a
    (2w-1)x(2h-1) image per head, F.interpolate bilinear, align_corners False; the 3 CLS rows kept),
  - the absolute position embeddings (BeitEmbeddings.interpolate_pos_encoding: bicubic,
    align_corners False, CLS entry kept).
Files per case:
  config.json, model.safetensors   the model at its native size (save_pretrained)
  inputs.safetensors               pixel_values f32 [2,C,H',W'] ~ N(0,1) at the new size
  expected.safetensors             logits [2,K] (model(pixel_values, interpolate_pos_encoding=True));
                                   for every relative position table, under its saved key, the
                                   [heads,T',T'] bias that module produces for the new window
                                   (module(window, interpolate_pos_encoding=True, dim_size=T'));
                                   beit.embeddings.position_embeddings: the interpolated
                                   [1,T',D] table (embeddings.interpolate_pos_encoding)
  case.json                        new size, options
"""
import argparse
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import BeitConfig, BeitForImageClassification
from transformers.models.beit.modeling_beit import BeitRelativePositionBias

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_reference import perturb  # noqa: E402
from gen_grad_reference import save_name_map  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference_resolution")


def make_case(out_root, name, new_size, **options):
    seed = sum(map(ord, name))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                patch_size=4, num_channels=3, num_labels=4, drop_path_rate=0.0)
    base.update(options)
    config = BeitConfig(**base)
    config._attn_implementation = "eager"
    model = BeitForImageClassification(config).eval()
    perturb(model, gen)
    out_dir = os.path.join(out_root, name)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    saved = load_file(os.path.join(out_dir, "model.safetensors"))
    by_param = {v: k for k, v in save_name_map(model, saved).items()}

    h, w = new_size
    p = config.patch_size
    window = (h // p, w // p)
    tokens = window[0] * window[1] + 1
    pixel_values = torch.randn(2, config.num_channels, h, w, generator=gen)
    save_file({"pixel_values": pixel_values.contiguous()}, os.path.join(out_dir, "inputs.safetensors"))
    expected = {}
    with torch.no_grad():
        expected["logits"] = model(pixel_values, interpolate_pos_encoding=True).logits.contiguous()
        for mod_name, mod in model.named_modules():
            if isinstance(mod, BeitRelativePositionBias):
                key = by_param[f"{mod_name}.relative_position_bias_table"]
                bias = mod(window, interpolate_pos_encoding=True, dim_size=tokens)
                expected[key] = bias[0].contiguous()
        emb = model.beit.embeddings
        if emb.position_embeddings is not None:
            key = by_param["beit.embeddings.position_embeddings"] if "beit.embeddings.position_embeddings" in by_param \
                else next(k for k in saved if k.endswith("position_embeddings"))
            dummy = torch.zeros(1, tokens, config.hidden_size)
            expected[key] = emb.interpolate_pos_encoding(dummy, h, w).contiguous()
    save_file(expected, os.path.join(out_dir, "expected.safetensors"))
    with open(os.path.join(out_dir, "case.json"), "w") as f:
        json.dump({"new_size": [h, w], "options": options, "expected": sorted(expected)}, f, indent=2)
        f.write("\n")
    print(f"{name:18s} 16x16 -> {h}x{w}: {sorted(expected)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=ROOT)
    out = ap.parse_args().out
    torch.set_num_threads(1)
    make_case(out, "relpos_up", (24, 24), use_relative_position_bias=True, use_shared_relative_position_bias=True,
              layer_scale_init_value=0.1)
    make_case(out, "abs_relpos_rect", (24, 20), use_absolute_position_embeddings=True,
              use_relative_position_bias=True, use_mean_pooling=False)
    make_case(out, "abs_shared_down", (12, 12), use_absolute_position_embeddings=True,
              use_shared_relative_position_bias=True, num_channels=1)
    with open(os.path.join(out, "VERSIONS.txt"), "w") as f:
        f.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}\n"
                f"python {sys.version.split()[0]}\n")


if __name__ == "__main__":
    main()
