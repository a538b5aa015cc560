"""BeitForSemanticSegmentation through the Python bindings: a loaded model says what it is, its
logits come back as [B, labels, 4 gh, 4 gw] with Hugging Face's numbers (the reference files of
tests/reference_segmentation, made by scripts/gen_segmentation_reference.py; the Rust suite holds
the library to the same 1e-4), `Model.create` makes one, `outputs` takes a single name, and
integer images are refused rather than read as 0..255 floats."""

from __future__ import annotations

import numpy as np
import pytest

import beit
from conftest import REPO, read_safetensors

CASES = REPO / "tests" / "reference_segmentation"


@pytest.mark.parametrize("case", ["aux_default_40", "aux_concat_32", "noaux_abs_48"])
def test_segmentation_logits_are_hugging_faces(ctx, case):
    inputs = read_safetensors(CASES / case / "inputs.safetensors")
    want = read_safetensors(CASES / case / "outputs.safetensors")["logits"]
    with beit.Model.load(ctx, CASES / case) as model:
        assert model.info.architecture == "BeitForSemanticSegmentation"
        got = model.infer(inputs["pixel_values"], outputs="logits")
    assert list(got) == ["logits"], "one name is one output, not its letters"
    assert got["logits"].shape == want.shape
    worst = float(np.abs(got["logits"] - want).max())
    assert worst <= 1e-4, f"{case}: logits differ from HF by {worst:.2e}"


def test_create_a_segmentation_model(ctx):
    config = {
        "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
        "image_size": 32, "patch_size": 8, "num_labels": 3, "out_indices": [1, 1, 2, 2],
        "pool_scales": [1, 2], "auxiliary_channels": 8, "use_relative_position_bias": True,
    }
    with beit.Model.create(ctx, config, "BeitForSemanticSegmentation", seed=1) as model:
        assert model.info.architecture == "BeitForSemanticSegmentation"
        px = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
        out = model.infer(px)
        assert out["logits"].shape == (2, 3, 16, 16)  # [B, labels, 4 * 4, 4 * 4]
        assert out["last_hidden_state"].shape == (2, 17, 16)
        assert np.isfinite(out["logits"]).all()


def test_integer_pixels_are_refused(ctx):
    with beit.Model.load(ctx, CASES / "aux_default_40") as model:
        img = np.zeros((1, 3, 40, 40), dtype=np.uint8)
        with pytest.raises(beit.InvalidArgumentError) as e:
            model.infer(img)
        assert "float" in e.value.message and "uint8" in e.value.message
        # The same image as floats runs.
        assert model.infer(img.astype(np.float32) / 255.0)["logits"].shape == (1, 5, 20, 20)
