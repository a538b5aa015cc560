#!/usr/bin/env python3
"""Reference vectors for libbeit's Hugging Face parity tests.

Run:   ~/torchref/bin/python scripts/gen_reference.py [--out DIR] [--cases NAME ...]
       (DIR defaults to tests/reference; pass another folder to check determinism, e.g.
        --out /tmp/ref && diff -r /tmp/ref tests/reference; --cases makes only the named cases
        and leaves the others as they are, for adding a case without remaking the rest under
        another transformers version)
Needs: torch, transformers, safetensors (the ~/torchref venv). CI does not run this; it compares
against the committed outputs under tests/reference/. Versions used go to VERSIONS.txt (with
--cases, one line per case made, `NAME: versions`, next to the full run's).

Each case directory holds:
  config.json, model.safetensors   exactly as transformers' save_pretrained writes them
  inputs.safetensors               pixel_values f32 [B,C,H,W] (+ bool_masked_pos u8 [B,N])
  outputs.safetensors              last_hidden_state (what HF BeitModel returns; for the head
                                   models from model.beit), pooler_output where a pooler exists,
                                   logits where the model has a head; all f32
  case.json                        what the case exercises, the effective config flags, shapes
Every parameter is perturbed away from its init value (biases, layer scale, position tables,
tokens), so that a wrong rule for any of them shows in the outputs. The script then checks that
each option-specific tensor group really moves the outputs (zeroing it changes them by > 1e-3)
and fails otherwise. Deterministic: fixed seeds, one thread, fp32, eager attention.

The layer-norm eps cases (`eps_*`, `embedding_scale` set) use a large `layer_norm_eps` (1e-2) and
scale every embedding parameter (patch projection, CLS/mask token, absolute positions) by
`embedding_scale` after the perturbation, so the per-token variance at every LayerNorm input is of
the order of eps. Their case.json records that variance per LayerNorm, and how far the outputs
move, in units of the Rust test's tolerance, when one LayerNorm's eps is replaced by 1e-12, when
every one is, and when every LayerNorm computes 1/(sqrt(var) + eps) instead of 1/sqrt(var + eps);
the script fails if any of these stays under EPS_SENSITIVITY_MIN tolerances.
"""
import argparse
import copy
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
FLAGS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
         "patch_size", "num_channels", "layer_norm_eps", "layer_scale_init_value", "use_mean_pooling",
         "use_mask_token", "use_absolute_position_embeddings", "use_relative_position_bias",
         "use_shared_relative_position_bias", "hidden_act"]
SENSITIVITY_MIN = 1e-3
# The eps cases: how many tolerances (tests/reference_parity.rs: |a-b| <= 1e-4 * max(1, |b|)) each
# wrong-eps variant must move the outputs by at least, and the eps a variant falls back to (HF's
# default, what ignoring the config's layer_norm_eps would give).
EPS_SENSITIVITY_MIN = 10.0
EPS_DEFAULT = 1e-12


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


def scale_embeddings(model, scale):
    """Multiplies every embedding parameter (patch projection, tokens, absolute positions) by
    `scale`: the embedding output, and so the residual stream's per-token variance, shrinks by
    scale^2."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embeddings." in name:
                p.mul_(scale)


def layer_norms(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]


def layernorm_input_variance(model, call):
    """{LayerNorm name: [min, median, max]} of the biased per-token variance of its input while
    `call()` runs `model`."""
    seen, hooks = {}, []
    for name, ln in layer_norms(model):
        def hook(_module, args, name=name):
            seen[name] = args[0].detach().var(-1, unbiased=False).flatten()
        hooks.append(ln.register_forward_pre_hook(hook))
    try:
        call()
    finally:
        for h in hooks:
            h.remove()
    return {n: [float(f"{v.min().item():.3g}"), float(f"{v.median().item():.3g}"), float(f"{v.max().item():.3g}")]
            for n, v in seen.items()}


def eps_outside_sqrt(ln):
    """A LayerNorm forward with the bug (x - mean) / (sqrt(var) + eps)."""
    def forward(x):
        mean = x.mean(-1, keepdim=True)
        std = x.var(-1, unbiased=False, keepdim=True).sqrt()
        return (x - mean) / (std + ln.eps) * ln.weight + ln.bias
    return forward


def wrong_eps_variants(model):
    """(label, copy of `model` with its layer norms' eps wrong): eps EPS_DEFAULT at each LayerNorm on
    its own, at every one, and eps outside the square root at every one."""
    for name, _ in layer_norms(model):
        m = copy.deepcopy(model)
        dict(m.named_modules())[name].eps = EPS_DEFAULT
        yield f"eps {EPS_DEFAULT:g} at {name}", m
    m = copy.deepcopy(model)
    for _, ln in layer_norms(m):
        ln.eps = EPS_DEFAULT
    yield f"eps {EPS_DEFAULT:g} at every LayerNorm", m
    m = copy.deepcopy(model)
    for _, ln in layer_norms(m):
        ln.forward = eps_outside_sqrt(ln)
    yield "1/(sqrt(var)+eps) at every LayerNorm", m


def tolerances(got, want):
    """Largest |got - want| / (1e-4 * max(1, |want|)) over all outputs: tests/reference_parity.rs's rule."""
    return max(((got[k] - want[k]).abs() / (1e-4 * want[k].abs().clamp(min=1.0))).max().item() for k in want)


def eps_sensitivity(model, arch, pixel_values, kwargs, reference):
    """How far each wrong-eps variant moves the outputs, in tolerances; and those under the minimum."""
    report = {label: tolerances(run(m, arch, pixel_values, kwargs), reference)
              for label, m in wrong_eps_variants(model)}
    return report, {k: v for k, v in report.items() if not v > EPS_SENSITIVITY_MIN}


def run(model, arch, pixel_values, kwargs):
    """What goes into outputs.safetensors."""
    outputs = {}
    with torch.no_grad():
        backbone = model if arch == "BeitModel" else model.beit
        base_out = backbone(pixel_values, **kwargs)
        outputs["last_hidden_state"] = base_out.last_hidden_state.contiguous()
        if base_out.pooler_output is not None:
            outputs["pooler_output"] = base_out.pooler_output.contiguous()
        if arch != "BeitModel":
            result = model(pixel_values, output_hidden_states=False, **kwargs)
            outputs["logits"] = result.logits.contiguous()
    return outputs


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def sensitivity(model, arch, pixel_values, kwargs, reference):
    """Zeroes each option-specific tensor group in a copy and measures how far the outputs move."""
    groups = {}
    for name, _ in model.named_parameters():
        if "relative_position_bias_table" in name:
            key = "shared_rel_pos_table" if "shared_position_bias" in name else "per_layer_rel_pos_tables"
        elif "position_embeddings" in name:
            key = "absolute_position_embeddings"
        elif "cls_token" in name:
            key = "cls_token"
        elif "mask_token" in name:
            if "bool_masked_pos" not in kwargs:
                continue  # unused without a mask; HF still has it
            key = "mask_token"
        elif "lambda_" in name:
            key = "layer_scale_lambdas"
        elif name.startswith("beit.layernorm.") or name.startswith("layernorm.") and arch == "BeitModel":
            key = "final_layernorm(CLS pooling)"
        elif "pooler.layernorm" in name:
            key = "pooler_layernorm(mean pooling)"
        elif name.endswith(".bias") and "layers." in name:
            key = "block_biases"
        else:
            continue
        groups.setdefault(key, []).append(name)
    report = {}
    for key, names in sorted(groups.items()):
        m = copy.deepcopy(model)
        params = dict(m.named_parameters())
        with torch.no_grad():
            for n in names:
                params[n].zero_()
        report[key] = max_diff(reference, run(m, arch, pixel_values, kwargs))
    if "bool_masked_pos" in kwargs:
        report["bool_masked_pos(vs no mask)"] = max_diff(reference, run(model, arch, pixel_values, {}))
    bad = {k: v for k, v in report.items() if not v > SENSITIVITY_MIN}
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    report["eager_vs_sdpa(info)"] = max_diff(reference, run(sdpa, arch, pixel_values, kwargs))
    return report, bad


def versions():
    return (f"torch {torch.__version__}", f"transformers {transformers.__version__}",
            f"python {sys.version.split()[0]}")


def write_versions(out, cases=None):
    """VERSIONS.txt: the versions, one per line, after a full run; after a --cases run, the file's
    other lines stay and each case made gets `NAME: torch ..., transformers ..., python ...`."""
    path = os.path.join(out, "VERSIONS.txt")
    if cases is None:
        lines = list(versions())
    else:
        old = open(path).read().splitlines() if os.path.exists(path) else []
        lines = [l for l in old if l.split(":")[0] not in cases]
        lines += [f"{c}: " + ", ".join(versions()) for c in sorted(cases)]
    with open(path, "w") as f:
        f.write("".join(l + "\n" for l in lines))


class Selection:
    """Which cases a run makes (all without --cases), and which it made."""

    def __init__(self, names):
        self.names, self.made = (set(names) if names else None), []

    def __call__(self, name):
        if self.names is not None and name not in self.names:
            return False
        self.made.append(name)
        return True

    def finish(self, out):
        if self.names is not None and set(self.made) != self.names:
            raise SystemExit(f"no such case: {sorted(self.names - set(self.made))}")
        write_versions(out, None if self.names is None else self.made)


def make_case(out_root, name, arch, input_hw, masked=False, batch=2, notes="", embedding_scale=None, **options):
    if not SELECTED(name):
        return
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
    assert model.config._attn_implementation == "eager"
    perturb(model, gen)
    if embedding_scale is not None:
        scale_embeddings(model, embedding_scale)

    out_dir = os.path.join(out_root, name)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)

    h, w = input_hw
    pixel_values = torch.randn(batch, config.num_channels, h, w, generator=gen)
    inputs = {"pixel_values": pixel_values.contiguous()}
    kwargs = {}
    if masked:
        n = (h // config.patch_size) * (w // config.patch_size)
        mask = torch.rand(batch, n, generator=gen) < 0.4
        mask[:, 0] = True  # at least one masked and one visible patch per row
        mask[:, -1] = False
        inputs["bool_masked_pos"] = mask.to(torch.uint8).contiguous()
        kwargs["bool_masked_pos"] = mask
    save_file(inputs, os.path.join(out_dir, "inputs.safetensors"))

    outputs = run(model, arch, pixel_values, kwargs)
    for k, v in outputs.items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all(), k
    save_file(outputs, os.path.join(out_dir, "outputs.safetensors"))

    report, bad = sensitivity(model, arch, pixel_values, kwargs, outputs)
    if bad:
        raise SystemExit(f"{name}: outputs insensitive to {bad}")
    if embedding_scale is not None:
        ln_variance = layernorm_input_variance(model, lambda: run(model, arch, pixel_values, kwargs))
        eps_report, eps_bad = eps_sensitivity(model, arch, pixel_values, kwargs, outputs)
        if eps_bad:
            raise SystemExit(f"{name}: outputs move by <= {EPS_SENSITIVITY_MIN} tolerances for {eps_bad}")

    ps = config.patch_size
    description = {
        "architecture": arch,
        "options": dict(options),
        "config_flags": {k: getattr(config, k) for k in FLAGS},
        "num_labels" if arch == "BeitForImageClassification" else "vocab_size":
            config.num_labels if arch == "BeitForImageClassification" else config.vocab_size,
        "input_shape": list(pixel_values.shape),
        "patch_grid": [h // ps, w // ps],
        "bool_masked_pos": masked,
        "masked_per_row": inputs["bool_masked_pos"].sum(1).tolist() if masked else None,
        "attn_implementation": "eager (fp32; SDPA differs by ~1e-7)",
        "outputs": {k: list(v.shape) for k, v in outputs.items()},
        "max_abs_output": {k: round(v.abs().max().item(), 4) for k, v in outputs.items()},
        "sensitivity_max_abs_change_when_zeroed": {k: float(f"{v:.3g}") for k, v in report.items()},
        "notes": notes,
    }
    if embedding_scale is not None:
        description["embedding_scale"] = embedding_scale
        description["layernorm_input_variance_min_median_max"] = ln_variance
        description["eps_sensitivity_in_tolerances"] = {k: float(f"{v:.3g}") for k, v in eps_report.items()}
    with open(os.path.join(out_dir, "case.json"), "w") as f:
        json.dump(description, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"{name:28s} {arch:28s} input {list(pixel_values.shape)} -> "
          + ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items()))
    print("    sensitivity: " + ", ".join(f"{k} {v:.2g}" for k, v in report.items()))
    if embedding_scale is not None:
        print("    LayerNorm input variance (min, median, max): "
              + ", ".join(f"{k} {v}" for k, v in ln_variance.items()))
        print("    wrong eps, in tolerances: " + ", ".join(f"{k} {v:.3g}" for k, v in eps_report.items()))


SELECTED = Selection(None)


def main():
    global SELECTED
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=ROOT)
    ap.add_argument("--cases", nargs="+", help="make only these cases")
    args = ap.parse_args()
    out, SELECTED = args.out, Selection(args.cases)
    torch.set_num_threads(1)
    make_case(out, "backbone_abs_mean", "BeitModel", (32, 32),
              use_absolute_position_embeddings=True, layer_scale_init_value=0.1, use_mean_pooling=True,
              notes="mean pooling: beit.layernorm is identity, last_hidden_state un-normalised; "
                    "pooler = LayerNorm(mean of patch tokens)")
    make_case(out, "backbone_shared_cls_noscale", "BeitModel", (32, 32),
              use_shared_relative_position_bias=True, layer_scale_init_value=0.0, use_mean_pooling=False,
              layer_norm_eps=1e-6,
              notes="no lambda_1/lambda_2 tensors (layer scale off); layernorm applied to all tokens, "
                    "pooler_output = normalised CLS token")
    make_case(out, "mim_shared", "BeitForMaskedImageModeling", (32, 32), masked=True,
              use_mask_token=True, use_shared_relative_position_bias=True, layer_scale_init_value=0.1,
              notes="logits for all patches [B,N,vocab]; no pooler")
    make_case(out, "mim_abs_nomask", "BeitForMaskedImageModeling", (32, 32),
              use_mask_token=True, use_absolute_position_embeddings=True,
              notes="mask_token exists in the weights but no bool_masked_pos is given")
    make_case(out, "cls_layer_rel_mean", "BeitForImageClassification", (32, 32),
              use_relative_position_bias=True, use_mean_pooling=True, num_labels=5)
    make_case(out, "cls_all_pos_cls", "BeitForImageClassification", (32, 32),
              use_absolute_position_embeddings=True, use_shared_relative_position_bias=True,
              use_relative_position_bias=True, use_mean_pooling=False, num_labels=3, num_hidden_layers=3,
              notes="shared and per-layer biases are both added in every layer")
    make_case(out, "grey_tiny32", "BeitForMaskedImageModeling", (32, 32), masked=True,
              num_channels=1, patch_size=4, hidden_size=48, num_attention_heads=3, intermediate_size=96,
              use_mask_token=True, use_shared_relative_position_bias=True, layer_scale_init_value=0.1)
    make_case(out, "rect_layer_rel", "BeitForImageClassification", (24, 40),
              image_size=[24, 40], use_relative_position_bias=True, num_labels=7,
              notes="HF QUIRK: even at the configured size, HF reshapes the first M-3 table rows as a "
                    "(2Ww-1)x(2Wh-1) = 9x5 image and bilinearly resizes it to (2Wh-1)x(2Ww-1) = 5x9, "
                    "so the bias is NOT a plain gather for non-square configs; with a random table the bias moves by O(1)")
    make_case(out, "resize_rel_abs", "BeitModel", (48, 48),
              use_relative_position_bias=True, use_absolute_position_embeddings=True,
              notes="config grid 4x4, input grid 6x6: table 7x7 -> 11x11 bilinear (align_corners F), "
                    "abs pos 4x4 -> 6x6 bicubic (align_corners F), CLS entries unchanged; "
                    "interpolate_pos_encoding not passed (HF v5 interpolates regardless)")
    make_case(out, "resize_rect_input", "BeitForImageClassification", (40, 24),
              use_shared_relative_position_bias=True, use_absolute_position_embeddings=True, num_labels=4,
              notes="config grid 4x4, input grid 5x3: table 7x7 -> 9x5 bilinear, abs pos 4x4 -> 5x3 bicubic")
    make_case(out, "odd_size_mim", "BeitForMaskedImageModeling", (30, 30), masked=True,
              image_size=28, patch_size=4, use_mask_token=True, use_shared_relative_position_bias=True,
              notes="30x30 input, patch 4: the conv drops the last 2 rows/cols, grid 7x7 as configured")
    make_case(out, "eps_cls_mean_pool", "BeitForImageClassification", (32, 32), embedding_scale=0.2,
              layer_norm_eps=1e-2, use_relative_position_bias=True, use_mean_pooling=True,
              layer_scale_init_value=0.1, num_labels=5,
              notes="layer_norm_eps 1e-2 with embeddings scaled by 0.2, so the per-token variance at every "
                    "LayerNorm (4 in the blocks, pooler.layernorm) is of the order of eps")
    make_case(out, "eps_mim_final_ln", "BeitForMaskedImageModeling", (32, 32), masked=True, embedding_scale=0.2,
              layer_norm_eps=1e-2, use_mask_token=True, use_shared_relative_position_bias=True,
              use_mean_pooling=False, layer_scale_init_value=0.0,
              notes="layer_norm_eps 1e-2 with embeddings scaled by 0.2: variance of the order of eps at the "
                    "blocks' LayerNorms and beit.layernorm (the MIM head's layernorm sees beit.layernorm's "
                    "output, variance ~0.6, where eps 1e-2 still moves the logits)")
    SELECTED.finish(out)


if __name__ == "__main__":
    main()
