"""Fine-tuning and evaluation from Python against the CLI as the reference: Trainer.finetune
gives the weights of `beit finetune` bit for bit (also stopped by its callback and resumed from
a checkpoint), Model.evaluate the numbers of `beit eval --json`, Model.segmentation_finetune
the weights of `beit segment finetune` and Model.evaluate_segmentation its test report; host-fed
classification steps with numpy resume bit for bit."""

from __future__ import annotations

import json
import math
import struct
import subprocess

import numpy as np
import pytest

import beit
from conftest import REPO, read_safetensors

REFERENCE = REPO / "tests" / "reference_finetune"
DATA = REFERENCE / "train.beitds"
PRETRAINED = REFERENCE / "pretrained"
STEPS, SEED = 7, 3


def run_cli(cli, *args):
    out = subprocess.run([str(cli), *map(str, args)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def same_weights(a, b):
    wa, wb = read_safetensors(a / "model.safetensors"), read_safetensors(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].tobytes() == wb[name].tobytes(), name


def test_finetune_matches_the_cli_and_resumes(ctx, cli, tmp_path):
    run_cli(cli, "finetune", "--model", PRETRAINED, "--data", DATA, "--out", tmp_path / "cli", "--steps", STEPS,
            "--batch", 8, "--seed", SEED, "--label-fraction", 0.5, "--threads", 2)
    opts = beit.FinetuneOptions(batch_size=8, seed=SEED, label_fraction=0.5, scratch_dir=tmp_path)
    with beit.Model.load(ctx, PRETRAINED) as mim, mim.to_classifier(3, drop_path_rate=0.1, seed=SEED) as cls:
        assert cls.info.architecture == "BeitForImageClassification" and cls.info.num_labels == 3
        topts = beit.TrainerOptions.finetune(STEPS, seed=SEED)
        assert (topts.warmup_steps, topts.beta2, topts.layer_decay) == (0, 0.999, 0.65)
        seen = []
        with beit.Trainer.from_model(ctx, cls, topts) as t:
            t.finetune(DATA, opts, callback=lambda s: seen.append(s.step))
            t.save_model(tmp_path / "py")
        assert seen == list(range(1, STEPS + 1))
        same_weights(tmp_path / "cli", tmp_path / "py")

        # Stopped by the callback at step 3, checkpointed, resumed in a fresh trainer.
        with beit.Trainer.from_model(ctx, cls, topts) as t:
            t.finetune(DATA, opts, callback=lambda s: s.step >= 3)
            assert t.step_count == 3
            t.save_checkpoint(tmp_path / "ckpt")
        with beit.Trainer.from_model(ctx, cls, beit.TrainerOptions.finetune(STEPS)) as t:
            t.load_checkpoint(tmp_path / "ckpt")
            t.finetune(DATA, opts)
            assert t.step_count == STEPS
            t.save_model(tmp_path / "resumed")
        same_weights(tmp_path / "cli", tmp_path / "resumed")


def test_callback_errors_stop_the_run_and_reach_the_caller(ctx, tmp_path):
    with beit.Model.create_classifier(ctx, PRETRAINED / "config.json", 3, seed=1) as cls, \
            beit.Trainer.from_model(ctx, cls, beit.TrainerOptions.finetune(STEPS)) as t:
        def boom(stats):
            raise KeyError(stats.step)

        with pytest.raises(KeyError, match="1"):
            t.finetune(DATA, {"batch_size": 8}, callback=boom)
        assert t.step_count == 1
        # A call on the trainer from its own callback is refused (busy), not a deadlock.
        with pytest.raises(beit.BusyError):
            t.finetune(DATA, {"batch_size": 8}, callback=lambda s: t.step_count)
        assert t.step_count == 2
        with pytest.raises(beit.InvalidArgumentError, match="label fraction"):
            t.finetune(DATA, {"label_fraction": 0.0, "steps": 9})


def test_epoch_steps():
    assert beit.finetune_epoch_steps(DATA, 8) == 6
    assert beit.finetune_epoch_steps(DATA, 8, label_fraction=0.5, seed=SEED) == 3


def test_step_classify_with_numpy_resumes_bit_for_bit(ctx, tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((4, 1, 16, 16)).astype(np.float32)
    labels = np.array([0, 2, 1, 2])
    with beit.Model.create_classifier(ctx, PRETRAINED / "config.json", 3, seed=2) as cls:
        opts = beit.TrainerOptions.finetune(10, seed=5)
        with beit.Trainer.from_model(ctx, cls, opts) as a, beit.Trainer.from_model(ctx, cls, opts) as b:
            sa, sb = a.step_classify(pixels, labels), b.step_classify(pixels, labels)
            assert sa.step == 1 and sa.masked == 0 and math.isfinite(sa.loss)
            assert sa.loss == sb.loss
            a.save_checkpoint(tmp_path / "ckpt")
            after = [a.step_classify(pixels, labels, label_smoothing=0.0).loss for _ in range(2)]
            a.load_checkpoint(tmp_path / "ckpt")
            assert [a.step_classify(pixels, labels, label_smoothing=0.0).loss for _ in range(2)] == after
            with pytest.raises(beit.InvalidArgumentError, match="label 3"):
                a.step_classify(pixels, np.array([0, 1, 2, 3]))
            with pytest.raises(beit.InvalidArgumentError, match="one label per image"):
                a.step_classify(pixels, labels[:3])
            assert a.step_count == 3
    with beit.Trainer.from_config(ctx, {"image_size": 16, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "intermediate_size": 32, "num_channels": 1,
                                         "vocab_size": 8, "use_mask_token": True}) as mim:
        with pytest.raises(beit.InvalidArgumentError, match="BeitForImageClassification"):
            mim.step_classify(pixels, labels)


def test_evaluate_matches_beit_eval(ctx, cli, tmp_path):
    with beit.Model.load(ctx, PRETRAINED) as mim, mim.to_classifier(3, seed=4) as cls:
        cls.save(tmp_path / "cls")
        with cls.with_image_size(20) as big:
            assert (big.info.image_height, big.info.image_width) == (20, 20)
        e = cls.evaluate(DATA, batch_size=7)
    want = json.loads(run_cli(cli, "eval", "--model", tmp_path / "cls", "--data", DATA, "--json", "--threads", 2))
    assert (e.images, e.correct, e.top1, e.num_labels) == (want["images"], want["correct"], want["top1"], 3)
    assert e.confusion.dtype == np.uint64 and e.confusion.tolist() == want["confusion"]
    assert e.per_class_accuracy.tolist() == want["per_class_accuracy"]


def write_mask_dataset(path, n=16, size=16):
    """A .beitds (docs/dataset-format.md) of grey images with a bright square; mask 1 on it."""
    pixels = np.full((n, size, size), 30, dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        y, x = i % 7, (3 * i) % 7
        pixels[i, y:y + 8, x:x + 8] = 200
        masks[i, y:y + 8, x:x + 8] = 1
    masks_at = 128 + (n * size * size + 63) // 64 * 64
    header = bytearray(128)
    header[:8] = b"BEITDS\x00\x01"
    struct.pack_into("<IIQIIIII", header, 8, 1, 128, n, size, size, 1, 1, 2)
    struct.pack_into("<QQ", header, 56, 128, n * size * size)
    struct.pack_into("<QQ", header, 88, masks_at, n * size * size)
    body = bytearray(masks_at + n * size * size)
    body[:128] = header
    body[128:128 + n * size * size] = pixels.tobytes()
    body[masks_at:] = masks.tobytes()
    path.write_bytes(bytes(body))


SEG_CONFIG = {"image_size": 16, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64, "num_channels": 1, "use_relative_position_bias": True, "pool_scales": [1, 2],
              "auxiliary_channels": 16, "drop_path_rate": 0.1}


def test_segmentation_matches_the_cli(ctx, cli, tmp_path):
    data = tmp_path / "squares.beitds"
    write_mask_dataset(data)
    (tmp_path / "config.json").write_text(json.dumps(SEG_CONFIG))
    report = json.loads(run_cli(cli, "segment", "finetune", "--config", tmp_path / "config.json", "--data", data,
                                "--out", tmp_path / "cli", "--epochs", 2, "--batch-size", 4, "--threads", 2,
                                "--seed", 5, "--warmup-steps", 2, "--test-fraction", 0.25))
    steps = []
    with beit.Model.create_segmenter(ctx, SEG_CONFIG, 2, seed=5) as seg:
        opts = beit.SegmentationOptions(epochs=2, batch_size=4, seed=5, warmup_steps=2, test_fraction=0.25)
        trained, r = seg.segmentation_finetune(data, opts, callback=lambda s: steps.append(s.loss))
        with trained:
            trained.save(tmp_path / "py")
            ev = trained.evaluate_segmentation(data, {"test_fraction": 0.25})
            every = trained.evaluate_segmentation(data, beit.SegmentationEvalOptions(split="all", mean=[0.5]))
    same_weights(tmp_path / "cli", tmp_path / "py")
    assert steps == report["losses"]
    assert (r.steps, r.train_samples, r.test_samples) == (report["steps"], 12, 4)
    assert (ev.mean_iou, ev.pixel_accuracy, ev.samples) == (report["test"]["mean_iou"],
                                                           report["test"]["pixel_accuracy"], 4)
    assert [None if math.isnan(v) else v for v in ev.per_class_iou] == report["test"]["per_class_iou"]
    assert every.samples == 16
    with beit.Model.load(ctx, PRETRAINED) as mim, mim.to_segmenter(2) as s2:
        assert s2.info.architecture == "BeitForSemanticSegmentation" and s2.info.num_labels == 2
        with pytest.raises(beit.InvalidArgumentError, match="batch size"):
            seg_opts = {"batch_size": 1}
            s2.segmentation_finetune(data, seg_opts)
