"""Data through the bindings: DatasetWriter and import_dataset (files equal to the CLI's),
Loader (whole images exact, cached and tokenizer tokens, seek, feeding the trainer) and
MaskGenerator."""

from __future__ import annotations

import itertools
import subprocess

import numpy as np
import pytest

import beit
from conftest import REPO

N, H, W, C = 10, 8, 8, 3
TOKENIZER = REPO / "tests" / "reference_dvae" / "dalle_small"


def sample_data(seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(N, H, W, C), dtype=np.uint8)
    tokens = rng.integers(0, 32, size=(N, 2, 2), dtype=np.int64)
    return pixels, np.arange(N), tokens


def write(path, pixels, labels, tokens=None):
    grid = tokens.shape[1:] if tokens is not None else None
    with beit.DatasetWriter(path, H, W, C, labels=True, token_grid=grid) as w:
        w.append(pixels[:4], labels[:4], tokens=None if tokens is None else tokens[:4])
        w.append(pixels[4:], labels[4:], tokens=None if tokens is None else tokens[4:])
        assert len(w) == N
    return w.info


def test_writer_file_equals_the_cli_npy_import(cli, tmp_path):
    pixels, labels, _ = sample_data()
    info = write(tmp_path / "ours.beitds", pixels, labels)
    assert (info.count, info.height, info.width, info.channels, info.has_labels) == (N, H, W, C, True)
    np.save(tmp_path / "x.npy", pixels)
    np.save(tmp_path / "y.npy", labels)
    subprocess.run([str(cli), "dataset", "import", "--format", "npy", "--images", str(tmp_path / "x.npy"),
                    "--labels", str(tmp_path / "y.npy"), "--out", str(tmp_path / "cli.beitds")],
                   check=True, capture_output=True)
    assert (tmp_path / "ours.beitds").read_bytes() == (tmp_path / "cli.beitds").read_bytes()
    with beit.Dataset.open(tmp_path / "ours.beitds") as ds:
        np.testing.assert_array_equal(ds[7].pixels, pixels[7])
        assert ds[7].label == 7


def test_an_abandoned_writer_leaves_nothing(tmp_path):
    pixels, labels, _ = sample_data()
    with pytest.raises(RuntimeError):
        with beit.DatasetWriter(tmp_path / "a.beitds", H, W, C, labels=True) as w:
            w.append(pixels, labels)
            raise RuntimeError("host failure")
    w = beit.DatasetWriter(tmp_path / "b.beitds", H, W, C, labels=True)
    w.append(pixels, labels)
    w.close()
    assert list(tmp_path.iterdir()) == []


def test_writer_refusals_append_nothing(tmp_path):
    pixels, labels, _ = sample_data()
    with beit.DatasetWriter(tmp_path / "d.beitds", H, W, C, labels=True) as w:
        with pytest.raises(beit.InvalidArgumentError, match="uint8"):
            w.append(pixels.astype(np.float32), labels)
        with pytest.raises(beit.InvalidArgumentError, match="shape"):
            w.append(pixels[:, :4], labels)
        with pytest.raises(beit.NullPointerError, match="samples->labels"):
            w.append(pixels)
        with pytest.raises(beit.InvalidArgumentError, match="has no masks"):
            w.append(pixels, labels, masks=np.zeros((N, H, W), np.uint8))
        with pytest.raises(beit.InvalidArgumentError, match="labels values"):
            w.append(pixels, labels - 1)
        assert len(w) == 0
    with pytest.raises(beit.InvalidArgumentError, match="zero dimension"):
        beit.DatasetWriter(tmp_path / "e.beitds", 0, W, C)


def test_import_idx_equals_the_cli_and_refuses_overwriting_its_input(cli, tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(4, 5, 6), dtype=np.uint8)
    (tmp_path / "i.idx").write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 4, 0, 0, 0, 5, 0, 0, 0, 6]) + imgs.tobytes())
    (tmp_path / "l.idx").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 4, 3, 1, 4, 1]))
    info = beit.import_dataset("idx", tmp_path / "ours.beitds", images=tmp_path / "i.idx",
                               labels=tmp_path / "l.idx", pad=(8, 9))
    assert (info.count, info.height, info.width, info.channels) == (4, 8, 9, 1)
    subprocess.run([str(cli), "dataset", "import", "--format", "idx", "--images", str(tmp_path / "i.idx"),
                    "--labels", str(tmp_path / "l.idx"), "--pad", "8x9", "--out", str(tmp_path / "cli.beitds")],
                   check=True, capture_output=True)
    assert (tmp_path / "ours.beitds").read_bytes() == (tmp_path / "cli.beitds").read_bytes()
    with beit.Dataset.open(tmp_path / "ours.beitds") as ds:
        np.testing.assert_array_equal(ds[2].pixels[1:6, 1:7, 0], imgs[2])
        assert [s.label for s in ds] == [3, 1, 4, 1]
    before = (tmp_path / "i.idx").read_bytes()
    with pytest.raises(beit.InvalidArgumentError, match="opts->out"):
        beit.import_dataset("idx", tmp_path / "i.idx", images=tmp_path / "i.idx")
    assert (tmp_path / "i.idx").read_bytes() == before
    with pytest.raises(beit.InvalidArgumentError, match="format"):
        beit.import_dataset("tiff", tmp_path / "x.beitds", images=tmp_path / "i.idx")
    with pytest.raises(beit.NullPointerError, match="opts->dir"):
        beit.import_dataset("image-folder", tmp_path / "x.beitds", size=8)


def test_loader_gives_whole_images_and_cached_tokens_exactly(ctx, tmp_path):
    pixels, labels, tokens = sample_data(2)
    write(tmp_path / "d.beitds", pixels, labels, tokens)
    with beit.Loader(ctx, tmp_path / "d.beitds", batch_size=4, image_size=8, patch_size=4, view2_size=8,
                     tokens="cached", drop_last=False, seed=3, workers=2) as loader:
        i = loader.info
        assert (i.batch_size, i.batches_per_epoch, i.num_patches, i.masked_patches) == (4, 3, 4, 2)
        assert i.token_source == "cached" and i.has_labels and i.has_tokens
        seen = []
        for b in itertools.islice(loader, 3):
            assert b.view1.shape == (b.images, C, H, W) and b.view1.dtype == np.float32
            for k, idx in enumerate(b.labels):
                want = (pixels[idx].transpose(2, 0, 1).astype(np.float32) * np.float32(1 / 255) - np.float32(0.5))
                np.testing.assert_array_equal(b.view1[k], want / np.float32(0.5))
                np.testing.assert_array_equal(b.tokens[k], tokens[idx].reshape(-1))
            assert ((b.bool_masked_pos.sum(axis=1) >= 1) & (b.bool_masked_pos.sum(axis=1) <= 2)).all()
            seen += b.labels.tolist()
        assert sorted(seen) == list(range(N)) and b.images == 2 and b.epoch == 0
        assert loader.position == 3
        loader.seek(1)
        again = loader.next()
        loader.seek(5)
        loader.next()
        loader.seek(1)
        third = next(loader)
        np.testing.assert_array_equal(again.view1, third.view1)
        np.testing.assert_array_equal(again.bool_masked_pos, third.bool_masked_pos)
        assert third.position == 1


def test_loader_batches_train_and_resume_at_the_trainers_position(ctx, tmp_path):
    pixels, labels, tokens = sample_data(3)
    write(tmp_path / "d.beitds", pixels, labels, tokens)
    config = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64,
              "image_size": 8, "patch_size": 4, "num_channels": 3, "vocab_size": 32, "use_mask_token": True}
    model = beit.Model.create(ctx, config, "BeitForMaskedImageModeling", seed=1)
    opts = dict(batch_size=3, model=model, tokens="cached", seed=4)
    with beit.Loader(ctx, tmp_path / "d.beitds", **opts) as loader, \
            beit.Trainer.from_model(ctx, model) as trainer:
        for b in itertools.islice(loader, 4):
            stats = trainer.step(b.view1, b.bool_masked_pos, b.tokens)
            assert np.isfinite(stats.loss)
        assert trainer.data_position == loader.position == 4
        expected = loader.next()
        with beit.Loader(ctx, tmp_path / "d.beitds", **opts) as resumed:
            resumed.seek(trainer.data_position)
            got = resumed.next()
        np.testing.assert_array_equal(got.view1, expected.view1)
        np.testing.assert_array_equal(got.tokens, expected.tokens)
        assert got.epoch == 1  # 10 images in batches of 3: 3 batches per epoch
    with pytest.raises(beit.InvalidArgumentError, match="image_height is 16"):
        beit.Loader(ctx, tmp_path / "d.beitds", model=model, image_size=16)
    with pytest.raises(beit.InvalidArgumentError, match="tokens must be"):
        beit.Loader(ctx, tmp_path / "d.beitds", model=model, tokens="augmented")
    with pytest.raises(beit.InvalidArgumentError, match="whole"):
        beit.Loader(ctx, tmp_path / "d.beitds", model=model, tokens="cached", flip_prob=0.5)
    model.close()


def test_loader_with_a_tokenizer_tokenizes_view2(ctx, tmp_path):
    rng = np.random.default_rng(4)
    with beit.DatasetWriter(tmp_path / "rgb.beitds", 40, 40, 3, labels=False) as w:
        w.append(rng.integers(0, 256, size=(6, 40, 40, 3), dtype=np.uint8))
    with beit.Tokenizer.load(ctx, TOKENIZER) as tok, \
            beit.Loader(ctx, tmp_path / "rgb.beitds", batch_size=2, image_size=64, patch_size=16,
                        tokens=tok, seed=1) as loader:
        i = loader.info
        assert (i.view2_height, i.view2_width, i.token_source, i.has_labels) == (32, 32, "tokenizer", False)
        b = loader.next()
        assert b.labels is None and b.tokens.shape == (2, 16) and b.view2.shape == (2, 3, 32, 32)
        # view 2 carries DALL-E's mapping; the tokenizer call takes plain [0, 1] pixels.
        plain = (b.view2 - np.float32(0.1)) / np.float32(0.8)
        same = (tok.tokenize(plain) == b.tokens).mean()
        assert same >= 0.9, same


def test_mask_generator(tmp_path):
    a = beit.MaskGenerator(14, seed=5)
    b = beit.MaskGenerator((14, 14), seed=5)
    counts = []
    for (ma, ca), (mb, cb) in itertools.islice(zip(a, b), 50):
        np.testing.assert_array_equal(ma, mb)
        assert ma.shape == (14, 14) and ma.sum() == ca == cb and ca <= 75
        counts.append(ca)
    assert np.mean(counts) > 70
    r = beit.MaskGenerator((6, 9), masked_patches=20, strategy="random", seed=1)
    assert all(r.next()[1] == 20 for _ in range(10))
    with pytest.raises(beit.InvalidArgumentError, match="masked_patches is 54"):
        beit.MaskGenerator((6, 9), masked_patches=54)
    with pytest.raises(beit.InvalidArgumentError, match="strategy"):
        beit.MaskGenerator(4, strategy="stripes")
    with pytest.raises(beit.InvalidArgumentError, match="min_aspect"):
        beit.MaskGenerator(4, min_aspect=0)
    a.close()
    with pytest.raises(beit.ClosedError):
        a.next()
