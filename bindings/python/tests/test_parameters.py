"""Parameters by Hugging Face name on models and trainers: the listing equals the names and
shapes of model.safetensors (read here, independently of libbeit), get returns what was set,
copies between models and trainers, and trainer.model() holds the trainer's weights."""

from __future__ import annotations

import numpy as np
import pytest

import beit
from conftest import REFERENCE, read_safetensors

from test_trainer import CONFIG, batch


def test_a_loaded_model_lists_and_reads_its_safetensors(ctx):
    path = REFERENCE / "mim_shared"
    stored = read_safetensors(path / "model.safetensors")
    with beit.Model.load(ctx, path) as m:
        params = m.parameters()
        assert all(isinstance(p, beit.ParameterInfo) for p in params)
        assert sorted(p.name for p in params) == sorted(stored)
        for p in params:
            assert p.shape == stored[p.name].shape, p.name
            got = m.get_parameter(p.name)
            assert got.dtype == np.float32 and got.shape == p.shape
            assert got.tobytes() == stored[p.name].astype(np.float32).tobytes(), p.name
        # Offsets lay the parameters out without overlap, and they are all of the model's.
        spans = sorted((p.offset, p.numel) for p in params)
        assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))
        assert sum(p.numel for p in params) == m.info.num_parameters


def test_set_then_get_round_trips_and_changes_inference(ctx, tmp_path):
    rng = np.random.default_rng(1)
    with beit.Model.create(ctx, CONFIG, "BeitForMaskedImageModeling", seed=1) as m:
        name = "beit.encoder.layer.1.attention.attention.query.weight"
        shape = next(p.shape for p in m.parameters() if p.name == name)
        assert shape == (32, 32)
        px, mask, _ = batch(b=2)
        before = m.infer(px, mask)["logits"]
        new = rng.standard_normal(shape)  # float64: converted once
        m.set_parameter(name, new)
        assert m.get_parameter(name).tobytes() == new.astype(np.float32).tobytes()
        assert not np.array_equal(m.infer(px, mask)["logits"], before)
        # The saved file holds the new values under the same name.
        m.save(tmp_path / "m")
        assert read_safetensors(tmp_path / "m" / "model.safetensors")[name].tobytes() == new.astype(np.float32).tobytes()

        # Refusals change nothing.
        kept = m.get_parameter(name)
        with pytest.raises(beit.InvalidArgumentError, match=r"\[32, 32\]"):
            m.set_parameter(name, new[:4])
        bad = new.copy()
        bad[2, 3] = np.inf
        with pytest.raises(beit.InvalidArgumentError):  # the library's finiteness check
            m.set_parameter(name, bad)
        with pytest.raises(beit.InvalidArgumentError, match="no parameter"):
            m.set_parameter("beit.no.such.weight", new)
        with pytest.raises(beit.InvalidArgumentError, match="no parameter"):
            m.get_parameter("beit.no.such.weight")
        with pytest.raises(beit.InvalidArgumentError, match="real numbers"):
            m.set_parameter(name, np.full(shape, "x"))
        assert m.get_parameter(name).tobytes() == kept.tobytes()


def test_copy_parameters_between_models(ctx):
    with beit.Model.create(ctx, CONFIG, "BeitForMaskedImageModeling", seed=1) as a, \
            beit.Model.create(ctx, CONFIG, "BeitForMaskedImageModeling", seed=2) as b:
        px, mask, _ = batch(b=2)
        assert not np.array_equal(a.infer(px, mask)["logits"], b.infer(px, mask)["logits"])
        b.copy_parameters_from(a)
        for p in a.parameters():
            assert a.get_parameter(p.name).tobytes() == b.get_parameter(p.name).tobytes(), p.name
        assert np.array_equal(a.infer(px, mask)["logits"], b.infer(px, mask)["logits"])
        with pytest.raises(beit.InvalidArgumentError):
            a.copy_parameters_from(a)
        wider = dict(CONFIG, vocab_size=33)
        with beit.Model.create(ctx, wider, "BeitForMaskedImageModeling", seed=1) as w:
            with pytest.raises(beit.InvalidArgumentError, match="lm_head"):
                w.copy_parameters_from(a)


def test_trainer_parameters_and_its_model(ctx, tmp_path):
    with beit.Trainer.from_config(ctx, CONFIG, init_seed=3, options={"learning_rate": 1e-3}) as t:
        px, mask, labels = batch()
        t.step(px, mask, labels)
        # trainer.model(): the trainer's weights, listed alike; save_model's file agrees.
        t.save_model(tmp_path / "saved")
        stored = read_safetensors(tmp_path / "saved" / "model.safetensors")
        with t.model() as m:
            assert isinstance(m, beit.Model) and m.context is ctx
            assert m.info == t.model_info
            assert m.parameters() == t.parameters()
            assert sorted(p.name for p in m.parameters()) == sorted(stored)
            for p in t.parameters():
                assert m.get_parameter(p.name).tobytes() == t.get_parameter(p.name).tobytes(), p.name
                assert stored[p.name].tobytes() == t.get_parameter(p.name).tobytes(), p.name
            # A copy: it does not follow later steps.
            name = t.parameters()[5].name
            snapshot = m.get_parameter(name)
            t.step(px, mask, labels)
            assert m.get_parameter(name).tobytes() == snapshot.tobytes()
            assert t.get_parameter(name).tobytes() != snapshot.tobytes()

            # Trainer set / get, and copying a model in.
            new = np.linspace(-1, 1, snapshot.size, dtype=np.float32).reshape(snapshot.shape)
            t.set_parameter(name, new)
            assert t.get_parameter(name).tobytes() == new.tobytes()
            t.copy_parameters_from(m)
            for p in m.parameters():
                assert m.get_parameter(p.name).tobytes() == t.get_parameter(p.name).tobytes(), p.name
            assert t.step_count == 2  # the optimizer state and step are kept

        # A trainer made from the model trains exactly like one made from the saved directory.
        with t.model() as m2, beit.Trainer.from_model(ctx, m2) as a, \
                beit.Trainer.from_model_dir(ctx, tmp_path / "saved") as b:
            b.copy_parameters_from(m2)
            assert a.step(px, mask, labels).loss == b.step(px, mask, labels).loss


def test_model_needs_a_live_context(tmp_path):
    c = beit.Context(threads=1, device="cpu")
    t = beit.Trainer.from_config(c, CONFIG)
    c.close()
    with pytest.raises(beit.ClosedError):
        t.model()
    with beit.Context(threads=1, device="cpu") as other, t.model(other) as m:
        assert m.context is other and m.info == t.model_info
    t.close()
