"""The context's memory budget (Context(memory_budget=...)) and the trainer's one-call-at-a-time
rule: the library refuses a concurrent call with BusyError; the bindings' Trainer serialises."""

from __future__ import annotations

import threading
from ctypes import byref

import pytest

import beit
from beit import _core, _ffi
from test_trainer import CONFIG, batch

MIB = 1 << 20


def test_a_model_over_the_budget_is_refused_before_allocation():
    with beit.Context(threads=1, device="cpu", memory_budget=MIB) as small:
        assert small.memory_budget == MIB and "memory_budget=1048576" in repr(small)
        with pytest.raises(beit.ConfigError) as e:
            beit.Model.create(small, "{}")  # BEiT-base: about 350 MB of parameters
        assert e.value.status == _ffi.BEIT_ERR_CONFIG
        assert "memory budget set for this context" in e.value.message
        with beit.Model.create(small, CONFIG, "BeitForMaskedImageModeling") as tiny:  # fits
            assert tiny.info.num_parameters > 0
    for available in (None, 0):
        with beit.Context(threads=1, device="cpu", memory_budget=available) as ctx:
            assert ctx.memory_budget is None
            beit.Model.create(ctx, CONFIG, "BeitForMaskedImageModeling").close()


def test_bad_budgets_are_refused_by_the_bindings():
    for bad in (-1, 2**64, 1.5, "1G", True):
        with pytest.raises(beit.InvalidArgumentError, match="memory_budget"):
            beit.Context(memory_budget=bad)


def test_busy_maps_to_busy_error():
    assert beit.BusyError is beit._errors.error_class(_ffi.BEIT_ERR_BUSY)
    assert issubclass(beit.BusyError, beit.BeitError)


def _state(trainer, path):
    trainer.save_checkpoint(path)
    return path.read_bytes()


def test_concurrent_raw_steps_are_ok_or_busy(ctx, tmp_path):
    """Raw C calls from 4 threads on one trainer (past the bindings' lock): each returns OK or
    BEIT_ERR_BUSY (BusyError), and the trainer equals one that made the OK steps in sequence."""
    px, mask, labels = batch()
    with beit.Trainer.from_config(ctx, CONFIG, init_seed=3) as t, t._use() as raw:
        c_batch, _arrays = t._mim_batch(px, mask, labels)
        results, lock = [], threading.Lock()

        def work(start):
            start.wait()
            for _ in range(3):
                try:
                    _core._check(_core._lib.beit_trainer_step(raw, byref(c_batch), None))
                    outcome = "ok"
                except beit.BusyError as e:
                    assert e.message.startswith("beit_trainer_step:") and "busy" in e.message
                    outcome = "busy"
                except BaseException as e:  # noqa: BLE001 - reported below
                    outcome = e
                with lock:
                    results.append(outcome)

        for _ in range(200):
            start = threading.Barrier(4)
            threads = [threading.Thread(target=work, args=(start,)) for _ in range(4)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            if "busy" in results:
                break
        assert all(r in ("ok", "busy") for r in results), [r for r in results if r not in ("ok", "busy")]
        assert "busy" in results, "200 rounds of 4 threads never met a busy trainer"
        oks = results.count("ok")
        assert t.step_count == oks
        got = _state(t, tmp_path / "concurrent")
    with beit.Trainer.from_config(ctx, CONFIG, init_seed=3) as twin:
        for _ in range(oks):
            twin.step(px, mask, labels)
        assert _state(twin, tmp_path / "sequential") == got


def test_the_bindings_serialise_a_shared_trainer(ctx, tmp_path):
    """Trainer methods from 4 threads at once all succeed (the bindings wait their turn)."""
    px, mask, labels = batch()
    errors = []
    with beit.Trainer.from_config(ctx, CONFIG, init_seed=4) as t:
        start = threading.Barrier(4)

        def work():
            try:
                start.wait()
                for _ in range(3):
                    t.step(px, mask, labels)
                    assert t.step_count >= 1
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        assert t.step_count == 12
        got = _state(t, tmp_path / "shared")
    with beit.Trainer.from_config(ctx, CONFIG, init_seed=4) as twin:
        for _ in range(12):
            twin.step(px, mask, labels)
        assert _state(twin, tmp_path / "sequential") == got
