"""Hugging Face parity through the Python bindings: every committed case under tests/reference
(inputs and transformers' outputs) with the Rust test's tolerance, |a-b| <= 1e-4 * max(1, |b|)."""

from __future__ import annotations

import numpy as np
import pytest

import beit
from beit import _core
from conftest import REFERENCE, read_safetensors

CASES = sorted(p for p in REFERENCE.iterdir() if (p / "case.json").is_file())


def test_cases_exist():
    assert len(CASES) >= 13, [c.name for c in CASES]


def worst_ratio(got: np.ndarray, want: np.ndarray) -> float:
    got, want = got.astype(np.float64), want.astype(np.float64)
    return float((np.abs(got - want) / (1e-4 * np.maximum(1.0, np.abs(want)))).max())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_outputs_match_transformers(ctx, case):
    inputs = read_safetensors(case / "inputs.safetensors")
    want = read_safetensors(case / "outputs.safetensors")
    with beit.Model.load(ctx, case) as model:
        got = model.infer(inputs["pixel_values"], inputs.get("bool_masked_pos"))
    compared = 0
    for name, ref in want.items():
        assert name in got, f"{case.name}: we produce no {name}"
        assert got[name].shape == ref.shape, name
        assert got[name].dtype == np.float32 and got[name].flags.c_contiguous
        ratio = worst_ratio(got[name], ref)
        assert ratio <= 1.0, f"{case.name} {name}: {ratio:.3f}x the tolerance"
        compared += 1
    assert compared >= 1


def test_info_and_output_selection(ctx):
    case = REFERENCE / "mim_shared"
    inputs = read_safetensors(case / "inputs.safetensors")
    model = beit.Model.load(ctx, case)
    info = model.info
    assert info.architecture == "BeitForMaskedImageModeling"
    assert (info.hidden_size, info.num_layers, info.num_patches, info.vocab_size) == (32, 2, 16, 64)
    assert info.has_mask_token and info.num_parameters > 0
    full = model.infer(inputs["pixel_values"], inputs["bool_masked_pos"].astype(bool))
    only = model.infer(inputs["pixel_values"], inputs["bool_masked_pos"], outputs=["logits"])
    assert list(only) == ["logits"]
    np.testing.assert_array_equal(only["logits"], full["logits"])
    with pytest.raises(beit.InvalidArgumentError, match="pooler_output"):
        model.infer(inputs["pixel_values"], outputs=["pooler_output"])
    model.close()


def test_inputs_go_without_copies_when_already_float32_c_contiguous():
    x = np.zeros((1, 3, 8, 8), dtype=np.float32)
    assert _core._array(x, np.float32, 4, "pixels") is x
    m = np.zeros((1, 4), dtype=bool)
    assert np.shares_memory(_core._mask_array(m, "mask"), m)
    converted = _core._array(x.astype(np.float64), np.float32, 4, "pixels")
    assert converted.dtype == np.float32 and converted.flags.c_contiguous
    strided = np.zeros((1, 3, 8, 16), dtype=np.float32)[..., ::2]
    assert _core._array(strided, np.float32, 4, "pixels").flags.c_contiguous


def test_non_contiguous_and_float64_inputs_give_the_same_outputs(ctx):
    case = REFERENCE / "mim_shared"
    x = read_safetensors(case / "inputs.safetensors")["pixel_values"]
    with beit.Model.load(ctx, case) as model:
        a = model.infer(x)["logits"]
        b = model.infer(x.astype(np.float64))["logits"]
        wide = np.zeros(x.shape[:3] + (x.shape[3] * 2,), dtype=np.float32)
        wide[..., ::2] = x
        c = model.infer(wide[..., ::2])["logits"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_save_and_reload_gives_identical_outputs(ctx, tmp_path):
    case = REFERENCE / "cls_all_pos_cls"
    x = read_safetensors(case / "inputs.safetensors")["pixel_values"]
    with beit.Model.load(ctx, case) as model:
        before = model.infer(x)
        model.save(tmp_path / "saved")
    with beit.Model.load(ctx, tmp_path / "saved") as again:
        after = again.infer(x)
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
