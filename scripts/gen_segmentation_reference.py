#!/usr/bin/env python3
"""Reference vectors for libbeit's BeitForSemanticSegmentation: eval-mode logits (forward parity)
and train-mode loss, parameter gradients and BatchNorm running statistics (training parity).

Run:   ~/torchref/bin/python scripts/gen_segmentation_reference.py [--out DIR]
       (DIR defaults to tests/reference_segmentation). CI does not run this; tests compare against
       the committed outputs. Versions used go to VERSIONS.txt.

Each case directory holds:
  config.json, model.safetensors  as save_pretrained writes them (Hub key names: fpn1.0.weight,
                                  decode_head.psp_modules.0.1.conv.weight, ...bn.running_mean, ...)
  inputs.safetensors              pixel_values f32 [B,C,H,W] ~ N(0,1); labels i64 [B,H,W], classes
                                  uniform in [0, num_labels) with ~10% set to the ignore index 255
  outputs.safetensors             logits f32 [B,K,4gh,4gw] of model.eval() (running statistics)
  train.safetensors               loss f32 [1] of model.train()(pixel_values, labels=labels) (HF's
                                  loss: decode CE + auxiliary_loss_weight * auxiliary CE, logits
                                  upsampled bilinearly to the label size, ignore index 255);
                                  grad.<key> f32 for every trained parameter (zeros where unused);
                                  after.<key> for every running_mean / running_var /
                                  num_batches_tracked after that one training forward
  case.json                       what the case exercises and the gradient norms

Every parameter is perturbed off its init value (scripts/gen_reference.py's rule), BatchNorm
weights 1+N(0, 0.2^2), biases N(0, 0.1^2), running means N(0, 0.3^2), running variances
U(0.5, 2) and num_batches_tracked distinct integers, so that running statistics matter in eval and
every saved tensor is unique (saved keys are matched to in-memory tensors by value, since
transformers 5 renames the head in memory). fp32, one thread, eager attention, drop_path_rate 0.
"""
import argparse
import json
import os
import sys
import tempfile

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import BeitConfig, BeitForSemanticSegmentation

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_reference import perturb  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference_segmentation")

CASES = {
    # 5 layers, levels from hidden states 1..4 (block 4 feeds nothing: its gradients are zero;
    # beit.layernorm exists but segmentation does not use it); auxiliary head
    # with two convolutions and the concatenated input; per-layer relative positions; pool scale 6
    # on a 2x2 map (adaptive pooling that upsamples, overlapping windows).
    "aux_concat_32": dict(
        config=dict(hidden_size=16, num_hidden_layers=5, num_attention_heads=2, intermediate_size=32,
                    image_size=32, patch_size=8, num_labels=4, out_indices=[2, 3, 4, 5],
                    pool_scales=[1, 2, 3, 6], use_auxiliary_head=True, auxiliary_channels=8,
                    auxiliary_num_convs=2, auxiliary_concat_input=True, auxiliary_loss_weight=0.4,
                    use_relative_position_bias=True, use_mean_pooling=False, layer_scale_init_value=0.1),
        batch=2),
    # No auxiliary head; embeddings as level 0 (out_index 1); absolute positions and a shared
    # relative position bias; a 6x6 grid, so level 3 is 3x3 and pool scale 2 has overlapping
    # windows; no layer scale.
    "noaux_abs_48": dict(
        config=dict(hidden_size=16, num_hidden_layers=4, num_attention_heads=4, intermediate_size=24,
                    image_size=48, patch_size=8, num_labels=3, out_indices=[1, 2, 3, 4],
                    pool_scales=[1, 2, 3, 6], use_auxiliary_head=False, use_absolute_position_embeddings=True,
                    use_shared_relative_position_bias=True, layer_scale_init_value=0.0),
        batch=2),
    # HF's default auxiliary head (one convolution, no concatenation), 5 layers, batch 3, a
    # non-square label map is not possible (square patches), so a 40x40 image, grid 5x5 (odd:
    # max pooling drops the last row and column).
    "aux_default_40": dict(
        config=dict(hidden_size=12, num_hidden_layers=5, num_attention_heads=2, intermediate_size=24,
                    image_size=40, patch_size=8, num_labels=5, out_indices=[1, 3, 4, 5],
                    pool_scales=[1, 2, 3], use_auxiliary_head=True, auxiliary_channels=6,
                    auxiliary_loss_weight=0.25, use_relative_position_bias=True),
        batch=3),
}


def randomise_batchnorm(model, gen):
    with torch.no_grad():
        count = 1
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
                m.num_batches_tracked.fill_(count * 7)
                count += 1


def value_map(model, saved):
    """{saved key: in-memory name} for parameters and buffers, by bit-identical values."""
    tensors = dict(model.named_parameters())
    tensors.update({n: b for n, b in model.named_buffers() if "relative_position_index" not in n})
    mapping = {}
    for key, t in saved.items():
        hits = [n for n, p in tensors.items() if p.shape == t.shape and p.dtype == t.dtype and torch.equal(p.detach(), t)]
        if len(hits) != 1:
            raise SystemExit(f"{key}: {len(hits)} in-memory tensors match ({hits})")
        mapping[key] = hits[0]
    params = set(dict(model.named_parameters()))
    missing = params - set(mapping.values())
    if missing:
        raise SystemExit(f"parameters without a saved key: {sorted(missing)}")
    return mapping


def make_case(name, spec, out_dir, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = BeitConfig(drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     attn_implementation="eager", **spec["config"])
    model = BeitForSemanticSegmentation(cfg)
    perturb(model, gen)
    randomise_batchnorm(model, gen)
    model.eval()
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d)
    saved = load_file(os.path.join(d, "model.safetensors"))
    mapping = value_map(model, saved)

    b, s, k = spec["batch"], cfg.image_size, cfg.num_labels
    pixel_values = torch.randn(b, cfg.num_channels, s, s, generator=gen)
    labels = torch.randint(0, k, (b, s, s), generator=gen)
    labels[torch.rand(b, s, s, generator=gen) < 0.1] = 255
    save_file({"pixel_values": pixel_values, "labels": labels}, os.path.join(d, "inputs.safetensors"))

    with torch.no_grad():
        logits = model(pixel_values).logits.contiguous()
    save_file({"logits": logits}, os.path.join(d, "outputs.safetensors"))

    model.train()
    out = model(pixel_values, labels=labels)
    out.loss.backward()
    named = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    train = {"loss": out.loss.detach().reshape(1)}
    norms = {}
    for key, mem in mapping.items():
        if mem in named:
            g = named[mem].grad
            g = torch.zeros_like(named[mem]) if g is None else g
            train[f"grad.{key}"] = g.detach().contiguous()
            norms[key] = g.norm().item()
        else:
            train[f"after.{key}"] = buffers[mem].detach().clone().contiguous()
    save_file(train, os.path.join(d, "train.safetensors"))
    case = dict(name=name, config=spec["config"], batch=b, input=list(pixel_values.shape),
                logits=list(logits.shape), loss=out.loss.item(), grad_norms=norms,
                eval_logits_abs_max=logits.abs().max().item())
    with open(os.path.join(d, "case.json"), "w") as f:
        json.dump(case, f, indent=1, sort_keys=True)
    print(f"{name}: logits {list(logits.shape)}, loss {out.loss.item():.6f}, {len(norms)} parameters")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=ROOT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    for i, (name, spec) in enumerate(CASES.items()):
        make_case(name, spec, args.out, 1000 + i)
    with open(os.path.join(args.out, "VERSIONS.txt"), "w") as f:
        f.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}\npython {sys.version.split()[0]}\n")


if __name__ == "__main__":
    main()
