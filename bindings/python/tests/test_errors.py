"""Errors: C statuses become BeitError subclasses carrying status and message; the bindings
reject bad buffers before calling; closed handles raise ClosedError instead of crashing."""

from __future__ import annotations

import gc
import shutil

import numpy as np
import pytest

import beit
from conftest import REFERENCE, read_safetensors

CASE = REFERENCE / "mim_shared"


@pytest.fixture(scope="module")
def model(ctx):
    with beit.Model.load(ctx, CASE) as m:
        yield m


def test_missing_model_dir_is_an_io_error_with_the_path(ctx, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(beit.IoError) as e:
        beit.Model.load(ctx, missing)
    assert e.value.status == 3 and e.value.status_name == "BEIT_ERR_IO"
    assert "no-such-model" in e.value.message
    assert isinstance(e.value, beit.BeitError)


def test_corrupt_files_are_format_errors(ctx, tmp_path):
    bad_json = tmp_path / "bad_json"
    shutil.copytree(CASE, bad_json)
    (bad_json / "config.json").write_text('{"hidden_size": ')
    with pytest.raises(beit.FormatError) as e:
        beit.Model.load(ctx, bad_json)
    assert e.value.status == 4 and e.value.message

    truncated = tmp_path / "truncated"
    shutil.copytree(CASE, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(beit.FormatError, match="BEIT_ERR_FORMAT"):
        beit.Model.load(ctx, truncated)


def test_bad_config_and_options(ctx):
    with pytest.raises(beit.ConfigError):
        beit.Model.create(ctx, {"hidden_size": 10, "num_attention_heads": 3})
    with pytest.raises(beit.InvalidArgumentError, match="beta2"):
        beit.Trainer.from_config(ctx, {"image_size": 16, "patch_size": 4}, options={"beta2": 1.5})
    with pytest.raises(beit.InvalidArgumentError, match="device"):
        beit.Context(device="tpu")
    # The library checks the GPU index: a cpu context has none to pick.
    with pytest.raises(beit.InvalidArgumentError, match="device_index 1 names a GPU"):
        beit.Context(device="cpu", device_index=1)
    with pytest.raises(beit.InvalidArgumentError, match="device_index"):
        beit.Context(device="cpu", device_index=-1)
    assert beit.Context(device="cpu", device_index=0).device_index == 0


def test_wrong_shapes_and_dtypes(model):
    x = read_safetensors(CASE / "inputs.safetensors")["pixel_values"]
    with pytest.raises(beit.InvalidArgumentError, match="4 dimensions"):
        model.infer(x[0])
    with pytest.raises(beit.InvalidArgumentError, match="real numbers"):
        model.infer(x.astype(np.complex64))
    with pytest.raises(beit.InvalidArgumentError) as e:  # from the C call: channel count
        model.infer(x[:, :2])
    assert e.value.status == 1 and "channel" in e.value.message
    with pytest.raises(beit.InvalidArgumentError, match=r"bool_masked_pos must have shape \(2, 16\)"):
        model.infer(x, np.zeros((2, 15), dtype=bool))
    with pytest.raises(beit.InvalidArgumentError, match="only 0 and 1"):
        model.infer(x, np.full((2, 16), 2, dtype=np.int64))
    with pytest.raises(beit.InvalidArgumentError, match="integer or bool"):
        model.infer(x, np.zeros((2, 16), dtype=np.float32))
    with pytest.raises(beit.InvalidArgumentError):  # smaller than a patch
        model.infer(np.zeros((1, 3, 4, 4), dtype=np.float32))


def test_nan_input_is_rejected(model):
    x = read_safetensors(CASE / "inputs.safetensors")["pixel_values"]
    x[1, 2, 3, 4] = np.nan
    with pytest.raises(beit.InvalidArgumentError, match="NaN"):
        model.infer(x)
    x[1, 2, 3, 4] = np.inf
    with pytest.raises(beit.InvalidArgumentError, match="infinite"):
        model.infer(x)


def test_closed_handles_raise(ctx, tmp_path):
    x = read_safetensors(CASE / "inputs.safetensors")["pixel_values"]
    m = beit.Model.load(ctx, CASE)
    m.close()
    m.close()  # idempotent
    assert m.closed
    with pytest.raises(beit.ClosedError, match="Model is closed"):
        m.infer(x)
    with pytest.raises(beit.ClosedError):
        m.info
    with beit.Model.load(ctx, CASE) as m2:
        pass
    with pytest.raises(beit.ClosedError):
        m2.save(tmp_path / "x")
    t = beit.Trainer.from_config(ctx, {"image_size": 16, "patch_size": 4, "hidden_size": 32,
                                       "num_hidden_layers": 1, "num_attention_heads": 4,
                                       "intermediate_size": 32, "vocab_size": 8})
    t.close()
    with pytest.raises(beit.ClosedError):
        t.step_count
    c = beit.Context(threads=1)
    c.close()
    with pytest.raises(beit.ClosedError):
        beit.Model.load(c, CASE)


def test_a_model_keeps_its_closed_context_alive():
    x = read_safetensors(CASE / "inputs.safetensors")["pixel_values"]
    c = beit.Context(threads=1, device="cpu")
    m = beit.Model.load(c, CASE)
    c.close()  # the native context is freed only once the model is
    assert m.infer(x)["logits"].shape == (2, 16, 64)
    m.close()
    assert c._ptr is None


def test_del_frees_without_close(ctx):
    for _ in range(3):
        beit.Model.load(ctx, CASE)
        gc.collect()
