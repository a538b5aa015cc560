"""Datasets written by the Rust CLI (`beit dataset import --format npy`) read back exactly."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

import beit


def import_npy(cli, tmp_path, images, labels=None):
    np.save(tmp_path / "x.npy", images)
    args = [str(cli), "dataset", "import", "--format", "npy", "--images", str(tmp_path / "x.npy"),
            "--out", str(tmp_path / "d.beitds")]
    if labels is not None:
        np.save(tmp_path / "y.npy", labels)
        args += ["--labels", str(tmp_path / "y.npy")]
    subprocess.run(args, check=True, capture_output=True)
    return tmp_path / "d.beitds"


def test_rgb_dataset_with_labels(cli, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)
    labels = np.array([3, 0, 9, 1, 2], dtype=np.int64)
    with beit.Dataset.open(import_npy(cli, tmp_path, images, labels)) as ds:
        assert len(ds) == 5
        i = ds.info
        assert (i.count, i.height, i.width, i.channels) == (5, 6, 7, 3)
        assert i.has_labels and not i.has_masks and not i.has_tokens
        for k in range(5):
            pixels, label, mask, tokens = ds[k]
            assert pixels.dtype == np.uint8 and pixels.shape == (6, 7, 3)
            np.testing.assert_array_equal(pixels, images[k])
            assert label == labels[k] and mask is None and tokens is None
        np.testing.assert_array_equal(ds[-1].pixels, images[4])
        assert [s.label for s in ds] == labels.tolist()
        with pytest.raises(IndexError):
            ds[5]
    with pytest.raises(beit.ClosedError):
        ds[0]


def test_grey_dataset_without_labels(cli, tmp_path):
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    with beit.Dataset.open(import_npy(cli, tmp_path, images)) as ds:
        assert ds.info.channels == 1 and not ds.info.has_labels
        pixels, label, _, _ = ds[1]
        np.testing.assert_array_equal(pixels[..., 0], images[1])
        assert label is None


def test_open_errors(tmp_path):
    with pytest.raises(beit.IoError):
        beit.Dataset.open(tmp_path / "missing.beitds")
    (tmp_path / "junk.beitds").write_bytes(b"not a dataset at all, no" * 10)
    with pytest.raises(beit.FormatError) as e:
        beit.Dataset.open(tmp_path / "junk.beitds")
    assert e.value.message
