#!/usr/bin/env python3
"""Reference parameter GRADIENTS (and 3 AdamW steps) for libbeit's MIM pretraining backward.

Run:   ~/torchref/bin/python scripts/gen_grad_reference.py [--out DIR] [--cases NAME ...]
       (DIR defaults to tests/reference_grads; pass another folder to check determinism, e.g.
        --out /tmp/refg && diff -r /tmp/refg tests/reference_grads; --cases makes only the named
        cases, as in scripts/gen_reference.py)
Needs: torch, transformers, safetensors (the ~/torchref venv). CI does not run this; it compares
against the committed outputs under tests/reference_grads/. Versions used go to VERSIONS.txt (with
--cases, one `NAME: versions` line per case made).

Each case directory holds:
  config.json, model.safetensors   exactly as transformers' save_pretrained writes them
                                   (BeitForMaskedImageModeling, legacy/hub key names)
  batch.safetensors                pixel_values f32 [B,C,H,W]; bool_masked_pos u8 [B,N] (~40% ones,
                                   >= 1 one and >= 1 zero per row); labels i64 [B,N]: a visual token
                                   for EVERY patch, uniform in [0, vocab) -- only masked ones count
                                   (the `beit pretrain-replay` batch format)
  grads.safetensors                loss f32 [1] and, for every key of model.safetensors, d loss / d
                                   that tensor (same key, same shape, f32)
  adamw_steps.safetensors          (first case only) every key of model.safetensors after 3 steps of
                                   torch.optim.AdamW(lr 1e-3, betas (0.9, 0.999), eps 1e-8,
                                   weight_decay 0.05 on ALL params, one group) on the same batch, and
                                   losses f32 [3] (loss before step 1, 2, 3)
  case.json                        options, effective config flags, shapes, loss, per-key grad norms,
                                   fp32-vs-fp64 gradient agreement (a noise floor for the Rust test)
Loss: model(pixel_values, bool_masked_pos=mask, labels=labels[mask]).loss, i.e. mean cross entropy
over the masked patches of the whole batch (HF flattens labels row-major over the batch).
Parameters are perturbed off their init values exactly as scripts/gen_reference.py does, so no
gradient path is hidden by a zero/one init. Deterministic: fixed seeds, one thread, fp32, eager
attention, eval() (drop_path_rate 0 and dropouts 0, so train() would be identical).

Key mapping: transformers 5 renames BEiT parameters in memory (beit.layers.0.attention.q_proj.weight)
and save_pretrained writes the legacy names (beit.encoder.layer.0.attention.attention.query.weight).
Every perturbed parameter holds distinct random values, so each key of the written
model.safetensors is matched to the in-memory parameter whose tensor is bit-identical (the match
must be a bijection with equal shapes, else the script fails). As an independent check, the
gradients are also written by save_pretrained itself (a copy of the model whose parameters hold the
gradients) and must agree bit for bit with the mapped ones.

Layer-norm eps case (`eps_*`, `embedding_scale` set): layer_norm_eps 1e-2 and every embedding
parameter scaled by `embedding_scale` after the perturbation, so the per-token variance at the
LayerNorm inputs is of the order of eps (scripts/gen_reference.py's rule). case.json records that
variance, and how far loss and gradients move, in units of the Rust test's tolerances, when one
LayerNorm's eps becomes 1e-12, when every one's does, and when every LayerNorm computes
1/(sqrt(var) + eps); the script fails if any of these stays under EPS_SENSITIVITY_MIN tolerances.
"""
import argparse
import copy
import json
import os
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import BeitConfig, BeitForMaskedImageModeling

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_reference import (  # noqa: E402  (one perturbation rule for all reference vectors)
    EPS_SENSITIVITY_MIN, Selection, layernorm_input_variance, perturb, scale_embeddings, wrong_eps_variants)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference_grads")
FLAGS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
         "patch_size", "num_channels", "vocab_size", "layer_norm_eps", "layer_scale_init_value",
         "use_mean_pooling", "use_mask_token", "use_absolute_position_embeddings",
         "use_relative_position_bias", "use_shared_relative_position_bias", "hidden_act"]
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
ADAMW_STEPS = 3


def save_name_map(model, saved):
    """{save name: in-memory parameter name}, by bit-identical tensor values."""
    params = dict(model.named_parameters())
    mapping = {}
    for key, t in saved.items():
        hits = [n for n, p in params.items() if p.shape == t.shape and torch.equal(p.detach(), t)]
        if len(hits) != 1:
            raise SystemExit(f"{key}: {len(hits)} in-memory parameters match ({hits})")
        mapping[key] = hits[0]
    if sorted(mapping.values()) != sorted(params):
        missing = sorted(set(params) - set(mapping.values()))
        raise SystemExit(f"parameters without a saved key: {missing}")
    return mapping


def via_save_pretrained(model, tensors_by_param):
    """Writes `tensors_by_param` (in-memory names) through save_pretrained; returns them by save name."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(tensors_by_param[n])
    with tempfile.TemporaryDirectory() as d:
        m.save_pretrained(d, safe_serialization=True)
        return load_file(os.path.join(d, "model.safetensors"))


def loss_of(model, batch):
    mask = batch["bool_masked_pos"].bool()
    out = model(batch["pixel_values"], bool_masked_pos=mask, labels=batch["labels"][mask])
    # The same loss written out, so the definition the Rust side must match is explicit.
    manual = torch.nn.functional.cross_entropy(out.logits[mask], batch["labels"][mask])
    assert torch.allclose(out.loss, manual, rtol=0, atol=1e-6), (out.loss, manual)
    return out.loss


def grads_of(model, batch):
    model.zero_grad(set_to_none=True)
    loss = loss_of(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def grad_tolerances(loss, grads, ref_loss, ref_grads):
    """How far `loss` and `grads` ({save key: tensor}) are from the reference, in units of the Rust
    tests' tolerances (|loss - torch| < 1e-5; per tensor max |g - torch| <= 1e-4 * |torch| as a
    norm): the largest ratio, and what it was for."""
    worst = (abs(loss.item() - ref_loss.item()) / 1e-5, "loss")
    for key, g in ref_grads.items():
        worst = max(worst, ((grads[key] - g).abs().max().item() / (1e-4 * g.norm().item()), key))
    return worst


def record_eps_case(name, description, embedding_scale, model, mapping, batch, loss, grads_saved, loss_fn, grads_of):
    """For a case made to test layer_norm_eps: measures the LayerNorm input variance and how far a
    wrong eps moves the loss and gradients, refuses the case when some wrong eps moves them by
    <= EPS_SENSITIVITY_MIN tolerances, and records both in `description` (case.json)."""
    ln_variance = layernorm_input_variance(model, loss_fn)
    eps_report, eps_bad = eps_sensitivity(model, mapping, batch, loss, grads_saved, grads_of=grads_of)
    if eps_bad:
        raise SystemExit(f"{name}: loss and gradients move by <= {EPS_SENSITIVITY_MIN} tolerances for {eps_bad}")
    description["embedding_scale"] = embedding_scale
    description["layernorm_input_variance_min_median_max"] = ln_variance
    description["eps_sensitivity_in_tolerances"] = eps_report
    print(f"{name}: LayerNorm input variance (min, median, max): "
          + ", ".join(f"{k} {v}" for k, v in ln_variance.items()))
    print(f"{name}: wrong eps, in tolerances: " + ", ".join(f"{k} {v}" for k, v in eps_report.items()))


def eps_sensitivity(model, mapping, batch, loss, grads_saved, grads_of=None):
    """{variant: [tolerances, what moved most]} for each wrong-eps variant of `model`, and those
    under EPS_SENSITIVITY_MIN. `grads_of(model)` gives (loss, {in-memory name: gradient})."""
    report = {}
    for label, m in wrong_eps_variants(model):
        l, g = grads_of(m)
        ratio, what = grad_tolerances(l, {key: g[p] for key, p in mapping.items()}, loss, grads_saved)
        report[label] = [float(f"{ratio:.3g}"), what]
    return report, {k: v for k, v in report.items() if not v[0] > EPS_SENSITIVITY_MIN}


def make_case(out_root, name, batch_size=2, adamw=False, notes="", embedding_scale=None, **options):
    if not SELECTED(name):
        return
    seed = sum(map(ord, name))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                image_size=16, patch_size=4, num_channels=3, vocab_size=32,
                drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(options)
    config = BeitConfig(**base)
    config._attn_implementation = "eager"
    model = BeitForMaskedImageModeling(config).eval()
    assert model.config._attn_implementation == "eager"
    perturb(model, gen)
    if embedding_scale is not None:
        scale_embeddings(model, embedding_scale)

    out_dir = os.path.join(out_root, name)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    saved = load_file(os.path.join(out_dir, "model.safetensors"))
    mapping = save_name_map(model, saved)

    side = config.image_size // config.patch_size
    n = side * side
    pixel_values = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size,
                               generator=gen)
    mask = torch.rand(batch_size, n, generator=gen) < 0.4
    for row in mask:  # at least one masked and one visible patch per row
        if not row.any():
            row[torch.randint(n, (1,), generator=gen)] = True
        if row.all():
            row[torch.randint(n, (1,), generator=gen)] = False
    labels = torch.randint(config.vocab_size, (batch_size, n), generator=gen, dtype=torch.int64)
    batch = {"pixel_values": pixel_values.contiguous(), "bool_masked_pos": mask.to(torch.uint8).contiguous(),
             "labels": labels.contiguous()}
    save_file(batch, os.path.join(out_dir, "batch.safetensors"))

    loss, grads = grads_of(model, batch)
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
    save_file({"loss": loss.reshape(1).contiguous(), **grads_saved}, os.path.join(out_dir, "grads.safetensors"))

    # fp64 reference of the same gradients: how close fp32 gets (a noise floor for the Rust test).
    model64 = copy.deepcopy(model).double()
    batch64 = dict(batch, pixel_values=batch["pixel_values"].double())
    loss64, grads64 = grads_of(model64, batch64)
    rel64 = {key: ((grads[p].double() - grads64[p]).norm() / grads64[p].norm()).item()
             for key, p in mapping.items()}

    description = {
        "architecture": "BeitForMaskedImageModeling",
        "options": dict(options),
        "config_flags": {k: getattr(config, k) for k in FLAGS},
        "batch": {"pixel_values": list(pixel_values.shape), "bool_masked_pos": list(mask.shape),
                  "labels": list(labels.shape), "masked_per_row": mask.sum(1).tolist()},
        "loss": loss.item(),
        "loss_fp64": loss64.item(),
        "num_parameter_tensors": len(grads_saved),
        "grad_norms": {k: float(f"{g.norm().item():.6g}") for k, g in sorted(grads_saved.items())},
        "max_rel_err_fp32_vs_fp64_grad": float(f"{max(rel64.values()):.3g}"),
        "attn_implementation": "eager, fp32, eval() (drop_path 0, dropouts 0)",
        "notes": notes,
    }
    if embedding_scale is not None:
        record_eps_case(name, description, embedding_scale, model, mapping, batch, loss, grads_saved,
                        loss_fn=lambda: loss_of(model, batch), grads_of=lambda m: grads_of(m, batch))

    if adamw:
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), foreach=False, **ADAMW)
        losses = []
        for _ in range(ADAMW_STEPS):
            opt.zero_grad(set_to_none=True)
            step_loss = loss_of(m, batch)
            step_loss.backward()
            losses.append(step_loss.item())
            opt.step()
        params = dict(m.named_parameters())
        after = {key: params[p].detach().clone().contiguous() for key, p in mapping.items()}
        check = via_save_pretrained(m, {n: p.detach() for n, p in params.items()})
        for key, t in after.items():
            assert torch.equal(check[key], t), key
        save_file({"losses": torch.tensor(losses, dtype=torch.float32), **after},
                  os.path.join(out_dir, "adamw_steps.safetensors"))
        description["adamw_steps"] = {
            "optimizer": "torch.optim.AdamW, one group (weight decay on every parameter), foreach=False",
            "lr": ADAMW["lr"], "betas": list(ADAMW["betas"]), "eps": ADAMW["eps"],
            "weight_decay": ADAMW["weight_decay"], "steps": ADAMW_STEPS,
            "losses": losses,
        }

    with open(os.path.join(out_dir, "case.json"), "w") as f:
        json.dump(description, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"{name:20s} loss {loss.item():.6f} ({len(grads_saved)} grads, masked/row {mask.sum(1).tolist()}, "
          f"fp32 vs fp64 max rel {max(rel64.values()):.2g})"
          + (f"  adamw losses {[round(x, 6) for x in description['adamw_steps']['losses']]}" if adamw else ""))


SELECTED = Selection(None)


def main():
    global SELECTED
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=ROOT)
    ap.add_argument("--cases", nargs="+", help="make only these cases")
    args = ap.parse_args()
    out, SELECTED = args.out, Selection(args.cases)
    torch.set_num_threads(1)
    make_case(out, "shared_scale", adamw=True,
              use_mask_token=True, use_shared_relative_position_bias=True, layer_scale_init_value=0.1,
              notes="mean-pooling config (default): no beit.layernorm tensors; adamw_steps.safetensors here")
    make_case(out, "layer_rel_noscale",
              use_mask_token=True, use_relative_position_bias=True, layer_scale_init_value=0.0,
              notes="no lambda_1/lambda_2 tensors (layer scale off)")
    make_case(out, "abs_cls",
              use_mask_token=True, use_absolute_position_embeddings=True, use_mean_pooling=False,
              notes="use_mean_pooling False: beit.layernorm exists and HF applies it to the encoder output, "
                    "then the MIM head's own layernorm, then lm_head")
    make_case(out, "all_pos_grey",
              num_channels=1, use_mask_token=True, use_absolute_position_embeddings=True,
              use_shared_relative_position_bias=True, use_relative_position_bias=True,
              layer_scale_init_value=0.1,
              notes="1 channel; absolute + shared + per-layer relative position bias all at once")
    make_case(out, "eps_final_ln", embedding_scale=0.2,
              layer_norm_eps=1e-2, use_mask_token=True, use_shared_relative_position_bias=True,
              use_mean_pooling=False, layer_scale_init_value=0.1,
              notes="layer_norm_eps 1e-2 with embeddings scaled by 0.2, so the per-token variance at the blocks' "
                    "LayerNorms and beit.layernorm is of the order of eps (the MIM head's layernorm sees "
                    "beit.layernorm's output, where eps 1e-2 still moves the gradients)")
    SELECTED.finish(out)


if __name__ == "__main__":
    main()
