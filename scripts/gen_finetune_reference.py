#!/usr/bin/env python3
"""Reference for "a model fine-tuned here and loaded in transformers gives the same logits".

Run:   cargo build --release && ~/torchref/bin/python scripts/gen_finetune_reference.py [--out DIR]
       (DIR defaults to tests/reference_finetune; the Rust test is tests/finetune_hf_parity.rs)
Needs: torch, transformers, safetensors, numpy (the ~/torchref venv) and target/release/beit.

Steps (all deterministic: fixed seeds, --threads 1, one loader worker):
 1. a tiny synthetic labelled dataset: 48 grey 12x12 images of 3 classes (horizontal stripes,
    vertical stripes, a centred blob; random phase, contrast and noise), written as .npy with numpy
    and imported with `beit dataset import --format npy` -> DIR/train.beitds;
 2. a tiny "pretrained" model: `beit pretrain` for 4 steps on its synthetic MIM task from the tiny
    config in DIR/pretrain_config.json (shared relative position bias, layer scale, mask token),
    so every table and weight is off its init -> DIR/pretrained (BeitForMaskedImageModeling);
 3. the fine-tune under test: `beit finetune --task classify` with the arguments in
    DIR/finetune_args.json (label fraction 0.5, label smoothing 0.1, drop path 0.1, layer decay
    0.75, warmup + cosine, 10 steps of batch 8) -> a temporary HF directory;
 4. transformers.BeitForImageClassification.from_pretrained(that directory) (strict: no missing or
    unexpected keys; eager attention, fp32, eval) runs on fixed inputs DIR/inputs.safetensors
    (pixel_values ~ N(0,1), [4,1,16,16]); its logits go to DIR/hf_logits.safetensors;
 5. `beit infer` on the same directory and inputs; the script fails unless our logits agree with
    transformers' within 1e-4 (absolute, for |logit| <= 1; relative above).
The Rust test re-runs step 3 from the committed files and compares its logits with hf_logits.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ROOT = os.path.join(REPO, "tests", "reference_finetune")
BEIT = os.path.join(REPO, "target", "release", "beit")
TOL = 1e-4

PRETRAIN_CONFIG = dict(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, vocab_size=16, use_mask_token=True,
                       use_shared_relative_position_bias=True, layer_scale_init_value=0.1, drop_path_rate=0.1)
# Passed as `--key value` to `beit finetune` (the Rust test passes the same list).
FINETUNE_ARGS = {"task": "classify", "label-fraction": "0.5", "steps": "10", "batch": "8", "lr": "5e-3",
                 "min-lr": "1e-5", "layer-decay": "0.75", "weight-decay": "0.05", "label-smoothing": "0.1",
                 "drop-path": "0.1", "warmup-steps": "3", "seed": "3", "threads": "1", "loader-workers": "1",
                 "log-every": "5"}


def synthetic_images(n, side, rng):
    """Three classes of 12x12 grey patterns, u8 [n, side, side], labels i64 [n] (cycling 0,1,2)."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    images, labels = [], []
    for i in range(n):
        c = i % 3
        phase, contrast = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.0)
        if c == 0:
            img = np.sin(2 * np.pi * y / 4 + phase)
        elif c == 1:
            img = np.sin(2 * np.pi * x / 4 + phase)
        else:
            cy, cx = side / 2 + rng.uniform(-1.5, 1.5), side / 2 + rng.uniform(-1.5, 1.5)
            img = 2 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 8) - 1
        img = 0.5 + 0.5 * contrast * img + rng.normal(0, 0.08, img.shape)
        images.append(np.clip(np.round(img * 255), 0, 255).astype(np.uint8))
        labels.append(c)
    return np.stack(images), np.array(labels, dtype=np.int64)


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def finetune_cmd(out_root, out_dir):
    cmd = [BEIT, "finetune", "--model", os.path.join(out_root, "pretrained"),
           "--data", os.path.join(out_root, "train.beitds"), "--out", out_dir]
    for k, v in FINETUNE_ARGS.items():
        cmd += [f"--{k}", v]
    return cmd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=ROOT)
    out = os.path.abspath(ap.parse_args().out)
    torch.set_num_threads(1)
    if not os.path.exists(BEIT):
        sys.exit(f"{BEIT} is missing: run cargo build --release first")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(20260)
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = synthetic_images(48, 12, rng)
        np.save(os.path.join(tmp, "x.npy"), images)
        np.save(os.path.join(tmp, "y.npy"), labels)
        run([BEIT, "dataset", "import", "--format", "npy", "--images", os.path.join(tmp, "x.npy"),
             "--labels", os.path.join(tmp, "y.npy"), "--out", os.path.join(out, "train.beitds")])

        with open(os.path.join(out, "pretrain_config.json"), "w") as f:
            json.dump(PRETRAIN_CONFIG, f, indent=2, sort_keys=True)
            f.write("\n")
        run([BEIT, "pretrain", "--config", os.path.join(out, "pretrain_config.json"), "--steps", "4",
             "--batch", "4", "--warmup-steps", "1", "--lr", "5e-3", "--seed", "1", "--threads", "1",
             "--checkpoint-every", "0", "--out", os.path.join(tmp, "pretrain")])
        shutil.rmtree(os.path.join(out, "pretrained"), ignore_errors=True)
        shutil.copytree(os.path.join(tmp, "pretrain", "model"), os.path.join(out, "pretrained"))
        with open(os.path.join(out, "finetune_args.json"), "w") as f:
            json.dump(FINETUNE_ARGS, f, indent=2)
            f.write("\n")

        tuned = os.path.join(tmp, "tuned")
        run(finetune_cmd(out, tuned))
        model, info = transformers.BeitForImageClassification.from_pretrained(
            tuned, output_loading_info=True, attn_implementation="eager", dtype=torch.float32)
        bad = {k: sorted(v) for k, v in info.items() if v}
        if bad:
            sys.exit(f"strict load failed: {bad}")
        model.eval()
        gen = torch.Generator().manual_seed(7)
        pixel_values = torch.randn(4, 1, 16, 16, generator=gen)
        save_file({"pixel_values": pixel_values.contiguous()}, os.path.join(out, "inputs.safetensors"))
        with torch.no_grad():
            hf = model(pixel_values).logits
        save_file({"logits": hf.contiguous()}, os.path.join(out, "hf_logits.safetensors"))

        run([BEIT, "infer", "--model", tuned, "--inputs", os.path.join(out, "inputs.safetensors"),
             "--output", os.path.join(tmp, "ours.safetensors"), "--threads", "1"])
        ours = load_file(os.path.join(tmp, "ours.safetensors"))["logits"]
        ratio = ((ours - hf).abs() / (TOL * hf.abs().clamp(min=1))).max().item()
        print(f"logits {list(hf.shape)}: max |ours - transformers| {(ours - hf).abs().max().item():.3e} "
              f"(worst/tolerance {ratio:.4f}); transformers logits[0] {hf[0].tolist()}")
        if ratio > 1:
            sys.exit("FAIL: our logits differ from transformers'")
        with open(os.path.join(out, "VERSIONS.txt"), "w") as f:
            f.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}\n"
                    f"numpy {np.__version__}\npython {sys.version.split()[0]}\n")
        with open(os.path.join(tuned, "config.json")) as f:
            cfg = json.load(f)
        print("saved config:", {k: cfg.get(k) for k in ("architectures", "id2label", "num_labels",
                                                         "use_relative_position_bias",
                                                         "use_shared_relative_position_bias", "use_mask_token")})


if __name__ == "__main__":
    main()
