"""Host-fed segmentation fine-tuning on a Trainer: step_segment(pixels, labels) equals
forward_backward_segment + apply_gradients bit for bit, a discarded step leaves the BatchNorm
running statistics alone while each applied one updates them once (num_batches_tracked counts
the steps: the hand-derived value), a checkpoint resumes bit for bit, and bad batches raise."""

from __future__ import annotations

import numpy as np
import pytest

import beit

CONFIG = {
    "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
    "image_size": 32, "patch_size": 8, "pool_scales": [1, 2], "auxiliary_channels": 8,
    "use_relative_position_bias": True,
}
OPTIONS = {"learning_rate": 1e-3, "warmup_steps": 1, "total_steps": 10, "drop_path_rate": 0.2,
           "layer_decay": 0.9, "seed": 3}


def batch(seed: int):
    rng = np.random.default_rng(seed)
    px = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 32, 32))
    labels[:, 0, :] = 255  # the ignore index: counts nowhere
    return px, labels


def trainer(ctx):
    with beit.Model.create_segmenter(ctx, CONFIG, 3, seed=2) as model:
        return beit.Trainer.from_model(ctx, model, OPTIONS)


def snapshot(t):
    return {p.name: t.get_parameter(p.name) for p in t.parameters()}


def same(a, b):
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def tracked(t):
    return [float(t.get_parameter(p.name)) for p in t.parameters() if p.name.endswith(".num_batches_tracked")]


def test_split_step_discard_and_running_statistics(ctx):
    with trainer(ctx) as whole, trainer(ctx) as split:
        fresh = snapshot(split)
        passed = split.forward_backward_segment(*batch(9))
        assert isinstance(passed, beit.PassStats) and passed.images == 2 and passed.masked == 0
        split.discard_gradients()
        assert same(snapshot(split), fresh), "a discarded step changed the trainer"
        for i in range(2):
            want = whole.step_segment(*batch(i))
            passed = split.forward_backward_segment(*batch(i))
            got = split.apply_gradients()
            assert (want.step, want.loss, want.grad_norm) == (got.step, got.loss, got.grad_norm) == (i + 1, passed.loss, got.grad_norm)
            assert same(snapshot(whole), snapshot(split)), f"split differs from step_segment at step {i + 1}"
            counts = tracked(whole)
            assert counts and all(n == i + 1 for n in counts), counts


def test_checkpoint_resumes_bit_for_bit(ctx, tmp_path):
    path = tmp_path / "mid.safetensors"
    with trainer(ctx) as straight, trainer(ctx) as resumed:
        for i in range(4):
            if i == 2:
                straight.save_checkpoint(path)
            straight.step_segment(*batch(i))
        resumed.load_checkpoint(path)
        assert all(n == 2 for n in tracked(resumed))
        for i in range(2, 4):
            resumed.step_segment(*batch(i))
        assert same(snapshot(straight), snapshot(resumed))


def test_bad_batches_raise_and_change_nothing(ctx):
    with trainer(ctx) as t:
        before = snapshot(t)
        px, labels = batch(0)
        with pytest.raises(beit.InvalidArgumentError, match="at least 2 images"):
            t.step_segment(px[:1], labels[:1])
        with pytest.raises(beit.InvalidArgumentError, match=r"one label per pixel"):
            t.step_segment(px, labels[:, :16])
        bad = labels.copy()
        bad[1, 5, 5] = 3
        with pytest.raises(beit.InvalidArgumentError, match="label 3"):
            t.forward_backward_segment(px, bad)
        with pytest.raises(beit.InvalidArgumentError, match="integer"):
            t.step_segment(px, labels.astype(np.float32))
        assert same(snapshot(t), before) and t.step_count == 0
