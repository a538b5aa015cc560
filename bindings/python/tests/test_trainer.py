"""A trainer learns a fixed batch (loss finite and decreasing), checkpoints resume bit for bit,
saved weights load as a model; also a trainer of a model made by `beit create --config tiny32`."""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest

import beit

CONFIG = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
    "image_size": 16, "patch_size": 4, "num_channels": 1, "vocab_size": 32, "use_mask_token": True,
    "use_shared_relative_position_bias": True, "layer_scale_init_value": 0.1,
}


def batch(b=4, c=1, size=16, patches=16, vocab=32, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((b, c, size, size)).astype(np.float32)
    mask = rng.random((b, patches)) < 0.4
    mask[:, 0] = True
    labels = rng.integers(0, vocab, size=(b, patches))
    return pixels, mask, labels


def test_loss_decreases_on_a_fixed_batch(ctx, tmp_path):
    opts = beit.TrainerOptions(learning_rate=1e-3, warmup_steps=0, total_steps=0, seed=1)
    with beit.Trainer.from_config(ctx, CONFIG, init_seed=1, options=opts) as t:
        info = t.model_info
        assert (info.num_patches, info.vocab_size, info.num_channels) == (16, 32, 1)
        px, mask, labels = batch()
        losses = []
        for i in range(8):
            s = t.step(px, mask, labels)
            assert isinstance(s, beit.StepStats)
            assert s.step == i + 1 and s.masked == int(mask.sum()) and s.lr == 1e-3
            assert math.isfinite(s.loss) and math.isfinite(s.grad_norm)
            losses.append(s.loss)
        assert all(b < a for a, b in zip(losses, losses[1:])), losses
        assert losses[-1] < losses[0] - 0.05, losses
        assert t.step_count == 8 and t.data_position == 8

        t.save_checkpoint(tmp_path / "ckpt")
        after = [t.step(px, mask, labels).loss for _ in range(2)]
        t.load_checkpoint(tmp_path / "ckpt")
        assert t.step_count == 8
        assert [t.step(px, mask, labels).loss for _ in range(2)] == after
        t.data_position = 100
        assert t.data_position == 100

        t.save_model(tmp_path / "model")
    with beit.Model.load(ctx, tmp_path / "model") as m:
        assert m.info.architecture == "BeitForMaskedImageModeling"
        out = m.infer(px, mask)
        assert out["logits"].shape == (4, 16, 32)


def test_step_errors_leave_the_trainer_unchanged(ctx):
    with beit.Trainer.from_config(ctx, CONFIG, init_seed=2) as t:
        px, mask, labels = batch()
        with pytest.raises(beit.InvalidArgumentError, match="must agree"):
            t.step(px, mask[:2], labels[:2])
        with pytest.raises(beit.InvalidArgumentError, match="integer or bool"):
            t.step(px, mask, labels.astype(np.float32))
        bad = px.copy()
        bad[0, 0, 0, 0] = np.nan
        with pytest.raises(beit.InvalidArgumentError) as e:  # from the C call
            t.step(bad, mask, labels)
        assert e.value.status == 1
        with pytest.raises(beit.InvalidArgumentError):
            t.step(px, mask, np.full_like(labels, 99))  # labels outside the vocabulary
        assert t.step_count == 0
        with pytest.raises(beit.IoError):
            t.load_checkpoint("/nonexistent/ckpt")


def test_trainer_of_a_cli_created_tiny32_model(ctx, cli, tmp_path):
    subprocess.run([str(cli), "create", "--config", "tiny32", "--architecture",
                    "BeitForMaskedImageModeling", "--seed", "3", "--out", str(tmp_path / "tiny")],
                   check=True, capture_output=True)
    opts = {"learning_rate": 1e-3, "warmup_steps": 0, "total_steps": 0}
    with beit.Trainer.from_model_dir(ctx, tmp_path / "tiny", options=opts) as t:
        i = t.model_info
        px, mask, labels = batch(b=2, c=i.num_channels, size=i.image_height, patches=i.num_patches,
                                 vocab=i.vocab_size)
        losses = [t.step(px, mask, labels).loss for _ in range(4)]
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    with beit.Model.load(ctx, tmp_path / "tiny") as m, beit.Trainer.from_model(ctx, m) as t2:
        assert t2.model_info == m.info
