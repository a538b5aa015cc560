"""The tokenizer reproduces PyTorch's DALL-E tokens exactly (tests/reference_dvae/dalle_small)."""

from __future__ import annotations

import numpy as np
import pytest

import beit
from conftest import REPO, read_safetensors

DALLE = REPO / "tests" / "reference_dvae" / "dalle_small"


@pytest.fixture(scope="module")
def reference():
    io = read_safetensors(DALLE / "io.safetensors")
    # io holds map_pixels(x) = 0.8 x + 0.1; the API takes plain [0, 1] pixels (as the Rust test).
    plain = (io["mapped_pixels"] - np.float32(0.1)) / np.float32(0.8)
    return plain.astype(np.float32), io["tokens"]


def test_tokens_equal_pytorch(ctx, reference):
    plain, want = reference
    with beit.Tokenizer.load(ctx, DALLE) as tok:
        info = tok.info
        assert (info.in_channels, info.image_size, info.vocab_size) == (3, 32, 96)
        assert (info.grid_h, info.grid_w, info.tokens_per_image) == (4, 4, 16)
        assert not info.has_decoder
        got = tok.tokenize(plain)
        assert got.dtype == np.int64 and got.shape == (4, 16)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(tok.tokenize(plain[2:3]), want[2:3])
        with pytest.raises(beit.InvalidArgumentError, match="no decoder"):
            tok.decode(want)


def test_tokenizer_errors(ctx, reference):
    plain, _ = reference
    with beit.Tokenizer.load(ctx, DALLE) as tok:
        bad = plain.copy()
        bad[0, 0, 0, 0] = np.nan
        with pytest.raises(beit.InvalidArgumentError) as e:  # from the C call
            tok.tokenize(bad)
        assert e.value.status == 1
        with pytest.raises(beit.InvalidArgumentError, match="shape"):
            tok.tokenize(plain[:, :, :16, :16])
    with pytest.raises(beit.ClosedError):
        tok.tokenize(plain)
    with pytest.raises(beit.IoError):
        beit.Tokenizer.load(ctx, DALLE / "missing")
