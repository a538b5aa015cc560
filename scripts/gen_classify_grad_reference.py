#!/usr/bin/env python3
"""Reference loss and parameter GRADIENTS for libbeit's classification training pass.

Run:   ~/torchref/bin/python scripts/gen_classify_grad_reference.py [--out DIR] [--cases NAME ...]
       (DIR defaults to tests/reference_classify_grads; pass another folder to check determinism,
        e.g. --out /tmp/refc && diff -r /tmp/refc tests/reference_classify_grads; --cases makes
        only the named cases, as in scripts/gen_reference.py)
Needs: torch, transformers, safetensors (the ~/torchref venv). CI does not run this; the Rust test
tests/classify_gradients.rs compares against the committed outputs. Versions go to VERSIONS.txt
(with --cases, one `NAME: versions` line per case made).

Each case is a tiny transformers BeitForImageClassification (hidden 32, 2 layers, 4 heads,
intermediate 64, image 16, patch 4, 5 labels, batch 3; drop_path_rate 0, dropouts 0, eager
attention, eval(), fp32, one thread) with every parameter perturbed off its init by the same rule as
scripts/gen_reference.py (so no gradient path hides behind a zero or one). Each case dir holds:
  config.json, model.safetensors   as save_pretrained writes them (legacy/hub key names)
  batch.safetensors                pixel_values f32 [B,C,H,W] ~ N(0,1); labels i64 [B] in [0, K)
  grads.safetensors                loss f32 [1], logits f32 [B,K], and for every key of
                                   model.safetensors d loss / d that tensor (same key and shape)
  case.json                        options, config flags, label smoothing, loss (and fp64 loss),
                                   per-key gradient norms, fp32-vs-fp64 gradient agreement
Loss: torch.nn.functional.cross_entropy(model(pixel_values).logits, labels,
label_smoothing=case.label_smoothing) (mean over the batch), i.e. what BEiT fine-tuning minimises
(timm's LabelSmoothingCrossEntropy is the same function). With smoothing 0 it is also asserted to
equal transformers' own `model(pixel_values, labels=labels).loss`.

Keys are mapped between transformers 5's in-memory names and the saved legacy names by
bit-identical values, and the gradients are also written through save_pretrained as an independent
check, exactly as scripts/gen_grad_reference.py does (its helpers are imported).

Layer-norm eps case (`eps_*`, `embedding_scale` set): layer_norm_eps 1e-2 and the embeddings scaled
so that the variance at the LayerNorm inputs is of the order of eps, with the same recorded and
enforced sensitivity to a wrong eps as scripts/gen_grad_reference.py's eps case.
"""
import argparse
import copy
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import BeitConfig, BeitForImageClassification

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_reference import Selection, perturb, scale_embeddings  # noqa: E402
from gen_grad_reference import (  # noqa: E402
    FLAGS, record_eps_case, save_name_map, via_save_pretrained)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference_classify_grads")
NUM_LABELS = 5


def loss_of(model, batch, smoothing):
    logits = model(batch["pixel_values"]).logits
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"], label_smoothing=smoothing)
    if smoothing == 0.0:
        hf = model(batch["pixel_values"], labels=batch["labels"]).loss
        assert torch.allclose(hf, loss, rtol=0, atol=1e-6), (hf, loss)
    return loss, logits


def grads_of(model, batch, smoothing):
    model.zero_grad(set_to_none=True)
    loss, logits = loss_of(model, batch, smoothing)
    loss.backward()
    return loss.detach(), logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def make_case(out_root, name, smoothing, batch_size=3, notes="", embedding_scale=None, **options):
    if not SELECTED(name):
        return
    seed = sum(map(ord, name))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                image_size=16, patch_size=4, num_channels=3, num_labels=NUM_LABELS,
                drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(options)
    config = BeitConfig(**base)
    config._attn_implementation = "eager"
    model = BeitForImageClassification(config).eval()
    perturb(model, gen)
    if embedding_scale is not None:
        scale_embeddings(model, embedding_scale)

    out_dir = os.path.join(out_root, name)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    saved = load_file(os.path.join(out_dir, "model.safetensors"))
    mapping = save_name_map(model, saved)

    pixel_values = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size,
                               generator=gen)
    labels = torch.randint(NUM_LABELS, (batch_size,), generator=gen, dtype=torch.int64)
    batch = {"pixel_values": pixel_values.contiguous(), "labels": labels.contiguous()}
    save_file(batch, os.path.join(out_dir, "batch.safetensors"))

    loss, logits, grads = grads_of(model, batch, smoothing)
    grads_saved = {key: grads[param].contiguous() for key, param in mapping.items()}
    check = via_save_pretrained(model, grads)
    assert sorted(check) == sorted(grads_saved), "save_pretrained key set differs"
    for key, g in grads_saved.items():
        assert g.shape == saved[key].shape and g.dtype == torch.float32, key
        assert torch.equal(check[key], g), f"{key}: mapped gradient != save_pretrained gradient"
        assert torch.isfinite(g).all(), key
    zero = sorted(k for k, g in grads_saved.items() if not g.abs().max() > 0)
    if zero:
        raise SystemExit(f"{name}: zero gradient for {zero}")
    save_file({"loss": loss.reshape(1).contiguous(), "logits": logits.contiguous(), **grads_saved},
              os.path.join(out_dir, "grads.safetensors"))

    model64 = copy.deepcopy(model).double()
    batch64 = dict(batch, pixel_values=batch["pixel_values"].double())
    loss64, _, grads64 = grads_of(model64, batch64, smoothing)
    rel64 = {key: ((grads[p].double() - grads64[p]).norm() / grads64[p].norm()).item()
             for key, p in mapping.items()}

    description = {
        "architecture": "BeitForImageClassification",
        "options": dict(options),
        "label_smoothing": smoothing,
        "config_flags": {k: getattr(config, k) for k in FLAGS} | {"num_labels": config.num_labels},
        "batch": {"pixel_values": list(pixel_values.shape), "labels": labels.tolist()},
        "loss": loss.item(),
        "loss_fp64": loss64.item(),
        "num_parameter_tensors": len(grads_saved),
        "grad_norms": {k: float(f"{g.norm().item():.6g}") for k, g in sorted(grads_saved.items())},
        "max_rel_err_fp32_vs_fp64_grad": float(f"{max(rel64.values()):.3g}"),
        "attn_implementation": "eager, fp32, eval() (drop_path 0, dropouts 0)",
        "notes": notes,
    }
    if embedding_scale is not None:
        def wrong_grads(m):
            l, _, g = grads_of(m, batch, smoothing)
            return l, g
        record_eps_case(name, description, embedding_scale, model, mapping, batch, loss, grads_saved,
                        loss_fn=lambda: loss_of(model, batch, smoothing), grads_of=wrong_grads)
    with open(os.path.join(out_dir, "case.json"), "w") as f:
        json.dump(description, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"{name:22s} loss {loss.item():.6f} ({len(grads_saved)} grads, labels {labels.tolist()}, "
          f"fp32 vs fp64 max rel {max(rel64.values()):.2g})")


SELECTED = Selection(None)


def main():
    global SELECTED
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=ROOT)
    ap.add_argument("--cases", nargs="+", help="make only these cases")
    args = ap.parse_args()
    out, SELECTED = args.out, Selection(args.cases)
    torch.set_num_threads(1)
    make_case(out, "mean_shared_scale", 0.0,
              use_shared_relative_position_bias=True, layer_scale_init_value=0.1,
              notes="mean pooling (beit.pooler.layernorm), shared rel-pos bias, layer scale, no smoothing")
    make_case(out, "mean_layer_noscale_ls", 0.1,
              use_relative_position_bias=True, layer_scale_init_value=0.0,
              notes="mean pooling, per-layer rel-pos bias, no layer scale, label smoothing 0.1")
    make_case(out, "cls_abs_scale_ls", 0.1,
              use_absolute_position_embeddings=True, use_mean_pooling=False, layer_scale_init_value=0.1,
              notes="CLS pooling (beit.layernorm on all tokens, token 0), absolute positions, smoothing 0.1")
    make_case(out, "cls_all_pos_grey", 0.0,
              num_channels=1, use_absolute_position_embeddings=True, use_mean_pooling=False,
              use_shared_relative_position_bias=True, use_relative_position_bias=True,
              layer_scale_init_value=0.0,
              notes="1 channel, CLS pooling, absolute + shared + per-layer rel-pos bias, no layer scale")
    make_case(out, "eps_mean_pool", 0.0, embedding_scale=0.2,
              layer_norm_eps=1e-2, use_relative_position_bias=True, layer_scale_init_value=0.1,
              notes="layer_norm_eps 1e-2 with embeddings scaled by 0.2, so the per-token variance at every "
                    "LayerNorm (4 in the blocks, beit.pooler.layernorm) is of the order of eps; mean pooling")
    SELECTED.finish(out)


if __name__ == "__main__":
    main()
