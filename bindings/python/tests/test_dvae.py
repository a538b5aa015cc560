"""Tokenizer training from Python (beit.DvaeTrainer): a dataset run writes, byte for byte, the
tokenizer `beit tokenizer train` writes with the same data, options and seed, and reports its
losses; host steps take numpy batches; the callback can stop a run and its exceptions come
through; tokenizer() is a copy that tokenizes as the saved directory; errors are exceptions."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

import beit
from conftest import REPO

CONFIG = dict(in_channels=1, image_size=8, vocab_size=16, n_hid=8, group_count=2, n_blk_per_group=1, decoder_n_init=8)
OPTIONS = dict(lr=2e-3, kl_weight=0.01, tau_start=0.9, tau_end=0.2, total_steps=7, seed=11)


@pytest.fixture(scope="module")
def dataset(cli, tmp_path_factory):
    """24 grey 12x12 images, imported by the CLI."""
    d = tmp_path_factory.mktemp("dvae-data")
    rng = np.random.default_rng(4)
    np.save(d / "x.npy", rng.integers(0, 256, size=(24, 12, 12), dtype=np.uint8))
    out = d / "train.beitds"
    subprocess.run(
        [str(cli), "dataset", "import", "--format", "npy", "--images", str(d / "x.npy"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


def cli_train(cli, data, out):
    """`beit tokenizer train` with CONFIG and OPTIONS; returns the losses it logged."""
    run = subprocess.run(
        [str(cli), "tokenizer", "train", "--data", str(data), "--out", str(out), "--image-size", "8", "--vocab",
         "16", "--n-hid", "8", "--groups", "2", "--blocks-per-group", "1", "--decoder-width", "8", "--steps", "7",
         "--batch", "5", "--lr", "2e-3", "--kl-weight", "0.01", "--tau-start", "0.9", "--tau-end", "0.2",
         "--crop-scale-min", "0.4", "--seed", "11", "--eval-images", "4", "--log-every", "1", "--json",
         "--threads", "2"],
        check=True,
        capture_output=True,
        text=True,
    )
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    return [line["loss"] for line in lines if "step" in line and "loss" in line]


def files(d):
    return (d / "config.json").read_bytes(), (d / "model.safetensors").read_bytes()


def test_dataset_training_equals_the_cli(ctx, cli, dataset, tmp_path):
    cli_losses = cli_train(cli, dataset, tmp_path / "cli")
    assert len(cli_losses) == 7
    seen = []
    with beit.DvaeTrainer.create(ctx, CONFIG, OPTIONS) as t:
        summary = t.train(dataset, batch=5, crop_scale_min=0.4, seed=11, workers=2, callback=seen.append)
        assert (summary.steps, summary.stopped, t.step_count) == (7, False, 7)
        assert [s.step for s in seen] == list(range(1, 8))
        assert [s.loss for s in seen] == cli_losses
        assert all(isinstance(s, beit.DvaeStepStats) for s in seen)
        t.save(tmp_path / "api")
    assert files(tmp_path / "api") == files(tmp_path / "cli")

    # Stopped by the callback after step 3, then the rest: the same tokenizer.
    with beit.DvaeTrainer.create(ctx, beit.DvaeConfig(**CONFIG), beit.DvaeTrainOptions(**OPTIONS)) as t:
        first = t.train(dataset, steps=6, batch=5, crop_scale_min=0.4, seed=11, callback=lambda s: s.step == 3)
        assert (first.steps, first.stopped, t.step_count) == (3, True, 3)
        rest = t.train(dataset, batch=5, crop_scale_min=0.4, seed=11)
        assert (rest.steps, rest.stopped) == (4, False)
        t.save(tmp_path / "resumed")
    assert files(tmp_path / "resumed") == files(tmp_path / "cli")


def test_host_steps(ctx):
    with beit.DvaeTrainer.create(ctx, CONFIG, OPTIONS) as t:
        info = t.info
        assert (info.in_channels, info.image_size, info.vocab_size, info.grid_h, info.tokens_per_image) == (1, 8, 16, 4, 16)
        rng = np.random.default_rng(0)
        images = rng.random((3, 1, 8, 8), dtype=np.float32)
        s = t.step(beit.map_pixels(images))
        # Step 0: the starting temperature, the peak rate (a 1-step warmup), KL weight still 0.
        assert (s.step, s.tau, s.lr) == (1, float(np.float32(0.9)), float(np.float32(2e-3)))
        assert s.loss == s.recon_mse > 0 and 1 <= s.perplexity <= 16
        s = t.step(beit.map_pixels(images[:1]))
        assert s.step == 2 and s.tau < float(np.float32(0.9)) and s.loss > s.recon_mse
        assert t.step_count == 2

        with pytest.raises(beit.InvalidArgumentError, match="float array"):
            t.step((images * 255).astype(np.uint8))
        with pytest.raises(beit.InvalidArgumentError, match=r"shape \[B, 1, 8, 8\]"):
            t.step(np.zeros((2, 1, 16, 16), np.float32))
        with pytest.raises(beit.InvalidArgumentError, match="B >= 1"):
            t.step(np.zeros((0, 1, 8, 8), np.float32))
        bad = beit.map_pixels(images)
        bad[1, 0, 2, 3] = np.nan
        with pytest.raises(beit.InvalidArgumentError, match=r"pixels\[83\] is NaN"):
            t.step(bad)
        assert t.step_count == 2


def test_callback_exceptions_and_reentry(ctx, dataset):
    with beit.DvaeTrainer.create(ctx, CONFIG, OPTIONS) as t:

        def boom(stats):
            raise KeyError(f"stop at {stats.step}")

        with pytest.raises(KeyError, match="stop at 1"):
            t.train(dataset, steps=3, batch=5, callback=boom)
        assert t.step_count == 1
        errors = []

        def reenter(stats):
            try:
                t.step_count
            except beit.BusyError as e:
                errors.append(str(e))

        summary = t.train(dataset, steps=2, batch=5, callback=reenter)
        assert summary.steps == 2 and t.step_count == 3
        assert len(errors) == 2 and "busy" in errors[0]


def test_tokenizer_is_a_copy_and_save_load_round_trip(ctx, tmp_path):
    rng = np.random.default_rng(1)
    with beit.DvaeTrainer.create(ctx, CONFIG, OPTIONS) as t:
        t.step(beit.map_pixels(rng.random((4, 1, 8, 8), dtype=np.float32)))
        t.save(tmp_path / "tok")
        plain = rng.random((5, 1, 8, 8), dtype=np.float32)
        with t.tokenizer() as copy, beit.Tokenizer.load(ctx, tmp_path / "tok") as saved:
            want = saved.tokenize(plain)
            np.testing.assert_array_equal(copy.tokenize(plain), want)
            assert copy.decode(want).shape == (5, 1, 8, 8)
            for _ in range(3):
                t.step(beit.map_pixels(rng.random((4, 1, 8, 8), dtype=np.float32)))
            np.testing.assert_array_equal(copy.tokenize(plain), want)
    with beit.DvaeTrainer.load(ctx, tmp_path / "tok", OPTIONS) as loaded:
        assert loaded.step_count == 0
        loaded.save(tmp_path / "again")
    assert files(tmp_path / "again") == files(tmp_path / "tok")


def test_errors(ctx, dataset, tmp_path):
    with pytest.raises(beit.InvalidArgumentError, match=r"config->n_hid"):
        beit.DvaeTrainer.create(ctx, dict(CONFIG, n_hid=6), OPTIONS)
    with pytest.raises(beit.InvalidArgumentError, match=r"opts->tau_end"):
        beit.DvaeTrainer.create(ctx, CONFIG, dict(OPTIONS, tau_end=0.0))
    with pytest.raises(beit.InvalidArgumentError, match="unknown config field"):
        beit.DvaeTrainer.create(ctx, dict(CONFIG, width=3), OPTIONS)
    with pytest.raises(beit.InvalidArgumentError, match="decoder"):
        beit.DvaeTrainer.load(ctx, REPO / "tests" / "reference_dvae" / "dalle_small")
    with pytest.raises(beit.IoError):
        beit.DvaeTrainer.load(ctx, tmp_path / "missing")
    with beit.DvaeTrainer.create(ctx, CONFIG, OPTIONS) as t:
        with pytest.raises(beit.InvalidArgumentError, match="fewer images"):
            t.train(dataset, batch=25)
        with pytest.raises(beit.InvalidArgumentError, match="crop_scale_min"):
            t.train(dataset, batch=5, crop_scale_min=0.0)
        with pytest.raises(beit.IoError):
            t.train(tmp_path / "missing.beitds", batch=5)
        # A save that cannot put the weights in place leaves the old files.
        t.save(tmp_path / "kept")
        old_config = (tmp_path / "kept" / "config.json").read_bytes()
        (tmp_path / "kept" / "model.safetensors").unlink()
        (tmp_path / "kept" / "model.safetensors").mkdir()
        (tmp_path / "kept" / "model.safetensors" / "x").write_bytes(b"x")
        t.step(beit.map_pixels(np.full((1, 1, 8, 8), 0.5, np.float32)))
        with pytest.raises(beit.IoError):
            t.save(tmp_path / "kept")
        assert (tmp_path / "kept" / "config.json").read_bytes() == old_config
        assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["config.json", "model.safetensors"]
        assert t.step_count == 1
    with pytest.raises(beit.ClosedError):
        t.step_count


def test_defaults_are_the_cli_defaults():
    c, o = beit.DvaeConfig.defaults(), beit.DvaeTrainOptions.defaults()
    assert (c.in_channels, c.image_size, c.vocab_size, c.n_hid, c.group_count) == (1, 32, 8192, 32, 3)
    assert (c.n_blk_per_group, c.decoder_n_init) == (1, 64)
    assert (o.total_steps, o.seed, o.tau_start) == (600, 0, 1.0)
    assert o.lr == float(np.float32(1e-3)) and o.tau_end == 0.125
