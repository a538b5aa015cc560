#!/usr/bin/env python3
"""Reference for BEiT classification fine-tuning, trained entirely by PyTorch / transformers.

Run:   ~/torchref/bin/python scripts/gen_finetune_reference.py [--out DIR]
       (DIR defaults to tests/reference_finetune; pass another folder to check determinism, e.g.
        --out /tmp/ft && cmp /tmp/ft/torch_run.safetensors tests/reference_finetune/torch_run.safetensors)
Needs: torch, transformers, safetensors, numpy (the ~/torchref venv). It does not run libbeit: the
Rust test tests/finetune_hf_parity.rs replays the same training in libbeit and compares.

Inputs (committed, not regenerated here): DIR/pretrained, a tiny BeitForMaskedImageModeling
(image 16, patch 4, hidden 32, 2 layers, shared relative position bias, layer scale, mask token),
and DIR/train.beitds (48 grey 12x12 labelled images; used by the Rust test's `beit eval` check and
tests/finetune_trainer.rs). `--regen-inputs` remakes both with target/release/beit as the first
version of this script did (they are only starting points and data, never results).

What this script does:
 1. DIR/init: the classifier BEiT fine-tunes from DIR/pretrained, built here in numpy by unilm's
    rules (BEIT_SPEC §7, run_class_finetuning.py): the shared relative position table is copied
    into every block's table; mask token, final `layernorm` and `lm_head` are dropped; the new
    head is fresh: `beit.pooler.layernorm` (unilm fc_norm) 1/0, `classifier.weight` timm
    trunc_normal(std 0.02, cut at +-2) x 0.001 (init_scale), bias 0; drop path 0, dropout 0.
    transformers.BeitForImageClassification.from_pretrained(DIR/init) must load it strictly.
 2. Two trainings of that model in PyTorch, each RECIPE["steps"] steps, with BEiT's fine-tuning
    recipe written out here from its definition (unilm run_class_finetuning.py, optim_factory.py,
    utils.cosine_scheduler; timm LabelSmoothingCrossEntropy):
    - lr schedule per step: np.linspace(0, lr, warmup) then
      min_lr + 0.5 (lr - min_lr)(1 + cos(pi i / (steps - warmup))), i = 0 .. steps - warmup - 1;
    - layer-wise lr decay: layer id 0 for the embeddings (cls token, patch embedding, position
      embeddings), i + 1 for block i, L + 1 for everything else (pooler norm, classifier);
      group lr = schedule * decay^(L + 1 - id);
    - torch.optim.AdamW, betas (0.9, 0.999), eps 1e-8, weight decay 0.05 except for 1-D tensors,
      names ending `.bias`, the cls token and absolute position embeddings (unilm
      get_parameter_groups with skip list {cls_token, pos_embed}); constant weight decay;
    - loss: label-smoothed cross-entropy (1 - s) nll + s mean_k(-log p_k), mean over the batch;
    - no gradient clipping, no drop path, no dropout, no mixup; fp32, eager attention, 1 thread.
    Run "explicit": the batches are explicit tensors (libbeit's loader shuffles with ChaCha8 and
    augments, which Python cannot replay): 48 grey 16x16 synthetic images of 3 classes, an epoch
    order from numpy, RECIPE["batch"] images per step. The Rust test feeds the same tensors to
    libbeit's Trainer::step_classify.
    Run "cli": one fixed batch of 8 of those images, every step. The Rust test writes those 8
    images as a .beitds file and runs `beit finetune` (flip 0, crop scale 1: the loader's crop is
    then the whole 16x16 image and its bicubic resample the identity; 8 samples, batch 8: every
    step sees all of them, in an order that only changes the summation order of the mean loss).
 3. DIR/inputs.safetensors (pixel_values ~ N(0,1), [4,1,16,16]) and DIR/hf_logits.safetensors:
    the logits of the explicit run's final model on them.

`--check-libbeit` (needs target/release/beit; stores nothing): runs the cli run through `beit
finetune`, requires transformers to load the directory it writes strictly, and prints its weight
and logit differences from torch's cli run.

Outputs: init/ (config.json, model.safetensors), recipe.json (the hyperparameters, read by the
Rust test), finetune_args.json (the `beit finetune` arguments of the cli run, derived from the
recipe), batches.safetensors (explicit run: pixel_values f32 [S,B,1,16,16], labels i64 [S,B];
cli run: cli_images u8 [8,1,16,16], cli_labels i64 [8]),
torch_run.safetensors (per run: <run>.loss f32 [S], <run>.lr f64 [S] (schedule value, before layer
decay), and <run>.<key> the final value of every key of init/model.safetensors), inputs and
hf_logits as above, VERSIONS.txt.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file as load_np, save_file as save_np
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_grad_reference import save_name_map  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ROOT = os.path.join(REPO, "tests", "reference_finetune")

NUM_LABELS = 3
# BEiT's fine-tuning recipe at toy scale. AdamW betas/eps are unilm's fine-tuning values.
RECIPE = {"steps": 10, "batch": 8, "lr": 5e-3, "min_lr": 1e-5, "warmup_steps": 3, "layer_decay": 0.75,
          "weight_decay": 0.05, "label_smoothing": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
          "drop_path": 0.0}
CLI_IMAGES = 8
HEAD_SEED = 11
DATA_SEED = 20260


# ---------------------------------------------------------------------------------------------
# Inputs (only with --regen-inputs; needs target/release/beit, as the first version did).

PRETRAIN_CONFIG = dict(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, vocab_size=16, use_mask_token=True,
                       use_shared_relative_position_bias=True, layer_scale_init_value=0.1, drop_path_rate=0.1)


def synthetic_images(n, side, rng):
    """Three classes of grey patterns, u8 [n, side, side], labels i64 [n] (cycling 0,1,2)."""
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


def regen_inputs(out):
    beit = os.path.join(REPO, "target", "release", "beit")
    if not os.path.exists(beit):
        sys.exit(f"{beit} is missing: run cargo build --release first")

    def run(cmd):
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

    with tempfile.TemporaryDirectory() as tmp:
        images, labels = synthetic_images(48, 12, np.random.default_rng(20260))
        np.save(os.path.join(tmp, "x.npy"), images)
        np.save(os.path.join(tmp, "y.npy"), labels)
        run([beit, "dataset", "import", "--format", "npy", "--images", os.path.join(tmp, "x.npy"),
             "--labels", os.path.join(tmp, "y.npy"), "--out", os.path.join(out, "train.beitds")])
        with open(os.path.join(out, "pretrain_config.json"), "w") as f:
            json.dump(PRETRAIN_CONFIG, f, indent=2, sort_keys=True)
            f.write("\n")
        run([beit, "pretrain", "--config", os.path.join(out, "pretrain_config.json"), "--steps", "4",
             "--batch", "4", "--warmup-steps", "1", "--lr", "5e-3", "--seed", "1", "--threads", "1",
             "--checkpoint-every", "0", "--out", os.path.join(tmp, "pretrain")])
        shutil.rmtree(os.path.join(out, "pretrained"), ignore_errors=True)
        shutil.copytree(os.path.join(tmp, "pretrain", "model"), os.path.join(out, "pretrained"))


# ---------------------------------------------------------------------------------------------
# 1. The classifier BEiT fine-tunes from the pretrained model (unilm's rules, in numpy).

SHARED_TABLE = "beit.encoder.relative_position_bias.relative_position_bias_table"


def layer_table(i):
    return f"beit.encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_bias_table"


def make_init(out):
    src_dir = os.path.join(out, "pretrained")
    with open(os.path.join(src_dir, "config.json")) as f:
        cfg = json.load(f)
    src = load_np(os.path.join(src_dir, "model.safetensors"))
    layers = cfg["num_hidden_layers"]
    assert cfg["use_shared_relative_position_bias"] and not cfg["use_relative_position_bias"], cfg
    assert not cfg["use_absolute_position_embeddings"]

    state = {}
    for key, value in src.items():
        if key in ("beit.embeddings.mask_token", SHARED_TABLE) or key.startswith(("layernorm.", "lm_head.")):
            continue  # dropped: mask token, MIM head; the shared table goes into every block below
        assert key.startswith("beit."), key
        state[key] = value.copy()
    for i in range(layers):
        # unilm: "Expand the shared relative position embedding to each transformer block"
        state[layer_table(i)] = src[SHARED_TABLE].copy()
    hidden = cfg["hidden_size"]
    gen = torch.Generator().manual_seed(HEAD_SEED)
    head = torch.empty(NUM_LABELS, hidden)
    torch.nn.init.trunc_normal_(head, std=0.02, a=-2.0, b=2.0, generator=gen)  # timm's bounds (absolute)
    state["classifier.weight"] = (head * 0.001).numpy()  # init_scale
    state["classifier.bias"] = np.zeros(NUM_LABELS, np.float32)
    state["beit.pooler.layernorm.weight"] = np.ones(hidden, np.float32)
    state["beit.pooler.layernorm.bias"] = np.zeros(hidden, np.float32)

    cfg.update(architectures=["BeitForImageClassification"], use_mask_token=False,
               use_shared_relative_position_bias=False, use_relative_position_bias=True,
               drop_path_rate=RECIPE["drop_path"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               id2label={str(i): str(i) for i in range(NUM_LABELS)},
               label2id={str(i): i for i in range(NUM_LABELS)})
    init = os.path.join(out, "init")
    shutil.rmtree(init, ignore_errors=True)
    os.makedirs(init)
    with open(os.path.join(init, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    save_np(state, os.path.join(init, "model.safetensors"), metadata={"format": "pt"})
    return init


def name_map(init):
    """{saved key: transformers' in-memory parameter name}. The init's blocks share one table (equal
    values), so the map comes from a copy of the init with a distinct random value in every key,
    matched by bit-identical values (scripts/gen_grad_reference.py's save_name_map)."""
    saved = load_np(os.path.join(init, "model.safetensors"))
    gen = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(os.path.join(init, "config.json"), tmp)
        save_np({k: gen.standard_normal(v.shape).astype(np.float32) for k, v in saved.items()},
                os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        return save_name_map(load_hf(tmp), load_file(os.path.join(tmp, "model.safetensors")))


def load_hf(init):
    model, info = transformers.BeitForImageClassification.from_pretrained(
        init, output_loading_info=True, attn_implementation="eager", dtype=torch.float32)
    bad = {k: sorted(v) for k, v in info.items() if v}
    if bad:
        sys.exit(f"strict load of {init} failed: {bad}")
    return model


# ---------------------------------------------------------------------------------------------
# 2. BEiT's fine-tuning recipe, from its definition.

def cosine_schedule(base, final, steps, warmup):
    """unilm utils.cosine_scheduler per step (start_warmup_value 0)."""
    warm = np.linspace(0.0, base, warmup) if warmup > 0 else np.array([])
    iters = np.arange(steps - warmup)
    cos = np.array([final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / len(iters))) for i in iters])
    sched = np.concatenate((warm, cos))
    assert len(sched) == steps
    return sched


def layer_id(key, layers):
    """unilm get_num_layer_for_vit on the saved (hub) names."""
    name = key[len("beit."):] if key.startswith("beit.") else key
    if name.startswith("embeddings."):  # cls_token, mask_token, position_embeddings, patch_embeddings
        return 0
    if name.startswith("encoder.layer."):
        return int(name.split(".")[2]) + 1
    return layers + 1  # pooler (fc_norm), classifier (head), a shared relative position table


def decays(key, shape):
    """unilm get_parameter_groups: no weight decay for 1-D, `.bias`, and the skip list."""
    skip = {"beit.embeddings.cls_token", "beit.embeddings.position_embeddings"}  # cls_token, pos_embed
    return not (len(shape) == 1 or key.endswith(".bias") or key in skip)


def smoothed_ce(logits, labels, s):
    """timm LabelSmoothingCrossEntropy (BEiT fine-tuning without mixup)."""
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, labels[:, None])[:, 0]
    smooth = -logp.mean(dim=-1)
    return ((1.0 - s) * nll + s * smooth).mean()


def train(init, batches, saved_names):
    """Runs the recipe on `batches` (list of (pixel_values, labels)); returns losses, lrs, final
    weights by saved key, and the model."""
    r = RECIPE
    model = load_hf(init)
    model.train()  # dropout and drop path are 0: train and eval forward are the same
    layers = model.config.num_hidden_layers
    by_param = {v: k for k, v in saved_names.items()}
    groups = {}
    for pname, p in model.named_parameters():
        key = by_param[pname]
        lid, dec = layer_id(key, layers), decays(key, tuple(p.shape))
        g = groups.setdefault((lid, dec), {"params": [], "names": [], "weight_decay": r["weight_decay"] if dec else 0.0,
                                           "lr_scale": r["layer_decay"] ** (layers + 1 - lid)})
        g["params"].append(p)
        g["names"].append(key)
    for (lid, dec), g in sorted(groups.items()):
        print(f"  group layer {lid} decay {dec}: lr scale {g['lr_scale']:.6f}, wd {g['weight_decay']}: "
              f"{len(g['names'])} tensors")
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups.values()],
                            lr=r["lr"], betas=(r["beta1"], r["beta2"]), eps=r["eps"])
    sched = cosine_schedule(r["lr"], r["min_lr"], r["steps"], r["warmup_steps"])
    assert len(batches) == r["steps"]
    losses = []
    for it, (pixels, labels) in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = sched[it] * g["lr_scale"]
        opt.zero_grad(set_to_none=True)
        loss = smoothed_ce(model(pixels).logits, labels, r["label_smoothing"])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        print(f"  step {it + 1}: loss {loss.item():.6f}, lr {sched[it]:.6e}")
    final = {key: dict(model.named_parameters())[pname].detach().clone() for key, pname in saved_names.items()}
    return np.array(losses, np.float32), sched.astype(np.float64), final, model


def to_pixels(u8):
    """libbeit's loader view 1 at model resolution: [0,1] pixels normalised with mean = std = 0.5."""
    x = torch.from_numpy(u8.astype(np.float32) / np.float32(255.0))
    return ((x - 0.5) / 0.5)[:, None]


def check_libbeit(out, cli_images, cli_labels, torch_cli, inputs):
    """--check-libbeit (a check, nothing it computes is stored): runs the cli run through
    target/release/beit, requires transformers to load the directory it writes strictly, and
    prints how far its weights and logits are from torch's cli run."""
    beit = os.path.join(REPO, "target", "release", "beit")
    if not os.path.exists(beit):
        sys.exit(f"{beit} is missing: run cargo build --release first")
    with open(os.path.join(out, "finetune_args.json")) as f:
        cli_args = json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "x.npy"), cli_images)
        np.save(os.path.join(tmp, "y.npy"), cli_labels)
        data, tuned = os.path.join(tmp, "cli.beitds"), os.path.join(tmp, "tuned")
        subprocess.run([beit, "dataset", "import", "--format", "npy", "--images", os.path.join(tmp, "x.npy"),
                        "--labels", os.path.join(tmp, "y.npy"), "--out", data], check=True, stdout=subprocess.DEVNULL)
        cmd = [beit, "finetune", "--model", os.path.join(out, "init"), "--data", data, "--out", tuned]
        for k, v in cli_args.items():
            cmd += [f"--{k}", v]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ours = load_hf(tuned).eval()  # strict
        theirs = dict(torch_cli.named_parameters())
        worst = max((p.detach() - theirs[n].detach()).abs().max().item() for n, p in ours.named_parameters())
        with torch.no_grad():
            d = (ours(inputs).logits - torch_cli.eval()(inputs).logits).abs().max().item()
    print(f"libbeit's `beit finetune` directory loads strictly in transformers; vs torch's cli run: "
          f"max |weight diff| {worst:.2e}, max |logit diff| {d:.2e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=ROOT)
    ap.add_argument("--regen-inputs", action="store_true",
                    help="remake pretrained/ and train.beitds with target/release/beit (not needed normally)")
    ap.add_argument("--check-libbeit", action="store_true",
                    help="also run the cli run with target/release/beit and load its output in transformers")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    os.makedirs(out, exist_ok=True)
    if args.regen_inputs:
        regen_inputs(out)
    elif os.path.abspath(out) != os.path.abspath(ROOT):
        for name in ("pretrained", "train.beitds", "pretrain_config.json"):
            dst = os.path.join(out, name)
            if not os.path.exists(dst):
                (shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy)(
                    os.path.join(ROOT, name), dst)

    init = make_init(out)
    saved_names = name_map(init)

    # Explicit batches: 48 images, an epoch order per epoch, RECIPE["batch"] per step.
    rng = np.random.default_rng(DATA_SEED)
    images, labels = synthetic_images(48, 16, rng)
    b, steps = RECIPE["batch"], RECIPE["steps"]
    order = []
    while len(order) < steps * b:
        order.extend(rng.permutation(len(images))[: len(images) // b * b].tolist())
    idx = np.array(order[: steps * b]).reshape(steps, b)
    pixel_values = torch.stack([to_pixels(images[i]) for i in idx])
    batch_labels = torch.from_numpy(labels[idx])
    explicit = [(pixel_values[s], batch_labels[s]) for s in range(steps)]
    cli_idx = np.arange(CLI_IMAGES)
    cli = [(to_pixels(images[cli_idx]), torch.from_numpy(labels[cli_idx]))] * steps

    results = {}
    for name, batches in (("explicit", explicit), ("cli", cli)):
        print(f"run {name}:")
        results[name] = train(init, batches, saved_names)

    with open(os.path.join(out, "recipe.json"), "w") as f:
        json.dump(RECIPE, f, indent=2, sort_keys=True)
        f.write("\n")
    cli_args = {"task": "classify", "label-fraction": "1", "steps": str(steps), "batch": str(CLI_IMAGES),
                "lr": repr(RECIPE["lr"]), "min-lr": repr(RECIPE["min_lr"]), "layer-decay": repr(RECIPE["layer_decay"]),
                "weight-decay": repr(RECIPE["weight_decay"]), "label-smoothing": repr(RECIPE["label_smoothing"]),
                "drop-path": repr(RECIPE["drop_path"]), "warmup-steps": str(RECIPE["warmup_steps"]),
                "clip": "0", "flip": "0", "min-crop-scale": "1", "seed": "3", "threads": "1",
                "loader-workers": "1", "log-every": "1"}
    with open(os.path.join(out, "finetune_args.json"), "w") as f:
        json.dump(cli_args, f, indent=2)
        f.write("\n")
    save_file({"pixel_values": pixel_values.contiguous(), "labels": batch_labels.contiguous(),
               "cli_images": torch.from_numpy(images[cli_idx])[:, None].contiguous(),
               "cli_labels": torch.from_numpy(labels[cli_idx]).contiguous()},
              os.path.join(out, "batches.safetensors"))
    run_tensors = {}
    for name, (losses, lrs, final, _) in results.items():
        run_tensors[f"{name}.loss"] = torch.from_numpy(losses)
        run_tensors[f"{name}.lr"] = torch.from_numpy(lrs)
        for key, t in final.items():
            run_tensors[f"{name}.{key}"] = t.contiguous()
    save_file(run_tensors, os.path.join(out, "torch_run.safetensors"))

    gen = torch.Generator().manual_seed(7)
    inputs = torch.randn(4, 1, 16, 16, generator=gen)
    save_file({"pixel_values": inputs.contiguous()}, os.path.join(out, "inputs.safetensors"))
    tuned = results["explicit"][3].eval()
    with torch.no_grad():
        logits = tuned(inputs).logits
    save_file({"logits": logits.contiguous()}, os.path.join(out, "hf_logits.safetensors"))
    with open(os.path.join(out, "VERSIONS.txt"), "w") as f:
        f.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}\n"
                f"numpy {np.__version__}\npython {sys.version.split()[0]}\n")
    for name, (losses, _, _, _) in results.items():
        print(f"{name}: losses {np.round(losses, 6).tolist()}")
    print(f"hf logits[0] {logits[0].tolist()}")
    if args.check_libbeit:
        check_libbeit(out, images[cli_idx], labels[cli_idx], results["cli"][3], inputs)


if __name__ == "__main__":
    main()
