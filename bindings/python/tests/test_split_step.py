"""The split step (forward_backward, gradients, apply_gradients / discard_gradients): equal to
step() bit for bit; the gradients are the trainer's own buffer, zero-copy, laid out like the
parameters; a pending step refuses what would lose it; and the precision option."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import beit

from test_trainer import CONFIG, batch


def trainer(ctx, **options):
    return beit.Trainer.from_config(ctx, CONFIG, init_seed=5, options={"learning_rate": 1e-3, **options})


def all_parameters(t):
    return {p.name: t.get_parameter(p.name) for p in t.parameters()}


def assert_same_bits(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


def test_split_step_is_step_bit_for_bit(ctx):
    # Drop path on: the split step must draw the step's stochastic depth as step() does.
    with trainer(ctx, drop_path_rate=0.3, seed=9) as whole, trainer(ctx, drop_path_rate=0.3, seed=9) as split:
        for i in range(3):
            px, mask, labels = batch(seed=i)
            want = whole.step(px, mask, labels)
            passed = split.forward_backward(px, mask, labels)
            assert isinstance(passed, beit.PassStats)
            assert (passed.loss, passed.images, passed.masked) == (want.loss, 4, int(mask.sum()))
            got = split.apply_gradients()
            assert (got.step, got.loss, got.lr, got.grad_norm, got.masked) == (
                want.step, want.loss, want.lr, want.grad_norm, want.masked)
        assert_same_bits(all_parameters(whole), all_parameters(split))
        assert split.step_count == whole.step_count == 3 and split.data_position == 3
        # The optimizer state too: the next steps agree.
        px, mask, labels = batch(seed=7)
        assert split.step(px, mask, labels).grad_norm == whole.step(px, mask, labels).grad_norm
        assert_same_bits(all_parameters(whole), all_parameters(split))


def test_gradients_are_the_buffer_apply_reads(ctx):
    opts = {"clip_grad_norm": 0.0, "weight_decay": 0.0}
    with trainer(ctx, **opts) as t, trainer(ctx, **opts) as reference:
        px, mask, labels = batch()
        t.forward_backward(px, mask, labels)
        grads = t.gradients()
        assert grads.dtype == np.float32 and grads.ndim == 1 and grads.flags.writeable
        params = t.parameters()
        assert grads.size >= sum(p.numel for p in params)
        # The same buffer every time (zero-copy), not a snapshot.
        assert t.gradients().ctypes.data == grads.ctypes.data
        norm = float(np.sqrt(np.sum(grads.astype(np.float64) ** 2)))
        grads *= 2  # in place, as an all-reduce would write
        doubled = t.apply_gradients()
        want = reference.step(px, mask, labels)
        # The numpy norm of the view is the norm the library computes; doubling it doubles it.
        assert want.grad_norm == pytest.approx(norm, rel=1e-6)
        assert doubled.grad_norm == pytest.approx(2 * want.grad_norm, rel=1e-6)
        assert doubled.step == 1 and doubled.loss == want.loss


def test_offsets_place_each_parameter_in_the_gradients(ctx):
    # Without weight decay a zero gradient moves nothing (AdamW: m = v = 0, update 0); so with
    # only one parameter's part of the buffer left, only that parameter changes.
    with trainer(ctx, weight_decay=0.0) as t:
        before = all_parameters(t)
        kept = next(p for p in t.parameters() if p.name.endswith("attention.attention.query.weight"))
        px, mask, labels = batch()
        t.forward_backward(px, mask, labels)
        grads = t.gradients()
        part = kept.of(grads)
        assert part.shape == kept.shape and np.shares_memory(part, grads)
        own = part.copy()
        assert np.any(own != 0)
        grads[:] = 0
        part[...] = own
        stats = t.apply_gradients()
        assert stats.grad_norm == pytest.approx(float(np.linalg.norm(own.astype(np.float64))), rel=1e-6)
        after = all_parameters(t)
        changed = [name for name in before if before[name].tobytes() != after[name].tobytes()]
        assert changed == [kept.name]


def test_a_pending_step_refuses_what_would_lose_it_and_discard_restores(ctx, tmp_path):
    with trainer(ctx, drop_path_rate=0.3) as t, trainer(ctx, drop_path_rate=0.3) as reference:
        before = all_parameters(t)
        with pytest.raises(beit.InvalidArgumentError, match="no step is pending"):
            t.gradients()
        with pytest.raises(beit.InvalidArgumentError):
            t.apply_gradients()
        px, mask, labels = batch()
        t.forward_backward(px, mask, labels)
        with pytest.raises(beit.InvalidArgumentError, match="pending"):
            t.step(px, mask, labels)
        with pytest.raises(beit.InvalidArgumentError, match="pending"):
            t.forward_backward(px, mask, labels)
        with pytest.raises(beit.InvalidArgumentError, match="pending"):
            t.save_checkpoint(tmp_path / "ckpt")
        assert not (tmp_path / "ckpt").exists()
        name = t.parameters()[0].name
        with pytest.raises(beit.InvalidArgumentError, match="pending"):
            t.set_parameter(name, np.zeros(t.parameters()[0].shape))
        t.discard_gradients()
        t.discard_gradients()  # nothing pending: nothing to do
        assert t.step_count == 0
        assert_same_bits(all_parameters(t), before)
        # Random state included: the next steps are the reference's.
        for i in range(2):
            assert t.step(px, mask, labels).loss == reference.step(px, mask, labels).loss
        assert_same_bits(all_parameters(t), all_parameters(reference))


def test_non_finite_gradients_drop_the_step(ctx):
    with trainer(ctx) as t:
        before = all_parameters(t)
        px, mask, labels = batch()
        t.forward_backward(px, mask, labels)
        t.gradients()[3] = np.nan
        with pytest.raises(beit.NumericalError):
            t.apply_gradients()
        assert t.step_count == 0
        assert_same_bits(all_parameters(t), before)
        with pytest.raises(beit.InvalidArgumentError):  # dropped: nothing pending any more
            t.gradients()
        assert t.step(px, mask, labels).step == 1


def test_the_view_keeps_the_trainer_memory_alive(ctx):
    t = trainer(ctx)
    px, mask, labels = batch()
    t.forward_backward(px, mask, labels)
    grads = t.gradients()
    first = grads.copy()
    t.close()
    assert t.closed
    with pytest.raises(beit.ClosedError):
        t.gradients()
    # The native trainer is freed only when the last view goes.
    assert t._ptr is not None
    assert grads.tobytes() == first.tobytes()
    view = grads[10:20]
    del grads
    gc.collect()
    assert t._ptr is not None and view.tobytes() == first[10:20].tobytes()
    del view
    gc.collect()
    assert t._ptr is None


def test_device_gradients_on_a_cpu_context_is_refused(ctx):
    with trainer(ctx) as t:
        t.forward_backward(*batch())
        with pytest.raises(beit.UnsupportedError, match="gradients()"):
            t.device_gradients()


def test_precision_option(ctx):
    assert beit.TrainerOptions.defaults().precision == "default"
    px, mask, labels = batch()
    with trainer(ctx) as default, trainer(ctx, precision="fp32") as fp32:
        # The CPU trains in fp32: the two are the same trainer.
        assert default.step(px, mask, labels).loss == fp32.step(px, mask, labels).loss
    with pytest.raises(beit.UnsupportedError, match="precision"):
        trainer(ctx, precision="bf16")
    with pytest.raises(beit.InvalidArgumentError, match="precision"):
        trainer(ctx, precision="fp16")
