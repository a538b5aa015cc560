"""Four Python threads infer on one shared model (the GIL is released in the C call) and get
the single-threaded results."""

from __future__ import annotations

import threading

import numpy as np

import beit
from conftest import REFERENCE, read_safetensors


def test_four_threads_share_one_model(ctx):
    case = REFERENCE / "mim_shared"
    inputs = read_safetensors(case / "inputs.safetensors")
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, 3, 32, 32)).astype(np.float32) for _ in range(4)]
    with beit.Model.load(ctx, case) as model:
        want = [model.infer(x, inputs["bool_masked_pos"]) for x in batches]
        errors, results = [], [[] for _ in batches]
        start = threading.Barrier(4)

        def work(k):
            try:
                start.wait()
                for _ in range(10):
                    results[k].append(model.infer(batches[k], inputs["bool_masked_pos"]))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for k in range(4):
        assert len(results[k]) == 10
        for got in results[k]:
            for name in want[k]:
                np.testing.assert_array_equal(got[name], want[k][name])


def test_errors_are_per_thread(ctx):
    """Each thread's failure carries its own message (the C message is thread-local)."""
    messages = {}

    def fail(k):
        try:
            beit.Model.load(ctx, f"/nonexistent/model-{k}")
        except beit.IoError as e:
            messages[k] = e.message

    threads = [threading.Thread(target=fail, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(messages) == [0, 1, 2, 3]
    for k, m in messages.items():
        assert f"model-{k}" in m, m
