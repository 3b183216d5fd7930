"""Where the batcher runs a batch: on the event loop for a lone short request on a CPU engine, else on its pool."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from kiln.serve import batcher
from kiln.serve.batcher import Batcher
from kiln.serve.metrics import ModelStats
from kiln.serve.model import ModelOptions, ServedModel

from _serve import run_async


LIMIT = 0.05        # the inline bound for these tests: far above a trivial run even on a loaded machine


@pytest.fixture(autouse=True)
def inline_limit(monkeypatch):
    monkeypatch.setattr(batcher, "INLINE_MAX_S", LIMIT)


class CpuEngine:
    """x [N, L] float32 -> y [N, L]; N 1..8, L 1..16 (no ``device``: a CPU engine)."""

    inputs = [{"name": "x", "dtype": "float32", "shape": ["N", "L"]}]
    outputs = [{"name": "y", "dtype": "float32", "shape": ["N", "L"]}]
    profiles = [{"x": {"min": [1, 1], "opt": [4, 4], "max": [8, 16]}}]


class GpuEngine(CpuEngine):
    device = "cuda"


class ThreadRecorder:
    """y = 3x + 1; records the thread each run ran on and whether its input was writable."""

    def __init__(self, delay: float = 0.0) -> None:
        self.threads: list[threading.Thread] = []
        self.writable: list[bool] = []
        self.delay = delay

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.append(threading.current_thread())
        self.writable.append(bool(feeds["x"].flags.writeable))
        if self.delay:
            time.sleep(self.delay)
        return {"y": 3 * feeds["x"] + 1}


def serve_one_by_one(engine, options: ModelOptions, xs: list[np.ndarray], delay: float = 0.0):
    """Sends the requests one after another (each answered before the next); returns outputs, the runs' threads
    and the loop's thread."""
    async def go():
        model = ServedModel("m", engine, options)
        inst = ThreadRecorder(delay)
        b = Batcher(model, [inst], ModelStats())
        outs = []
        for x in xs:
            rows, key = model.check_request({"x": x})
            outs.append(await b.infer({"x": x}, rows, key, 10.0))
        await b.close()
        return outs, inst, threading.current_thread()
    return run_async(go())


def test_lone_short_requests_run_on_the_event_loop_after_the_first():
    xs = [np.full((1, 4), i, np.float32) for i in range(6)]
    for options in (ModelOptions(), ModelOptions(batching=False)):
        outs, inst, loop_thread = serve_one_by_one(CpuEngine(), options, xs)
        for x, out in zip(xs, outs):
            np.testing.assert_array_equal(out["y"], 3 * x + 1)
        assert inst.threads[0] is not loop_thread             # the first run of a shape: its time is unknown
        assert all(t is loop_thread for t in inst.threads[1:]), inst.threads


def test_a_new_shape_runs_on_the_pool_first():
    xs = [np.ones((1, 4), np.float32), np.ones((1, 4), np.float32), np.ones((2, 4), np.float32),
          np.ones((2, 4), np.float32)]
    _, inst, loop_thread = serve_one_by_one(CpuEngine(), ModelOptions(), xs)
    assert [t is loop_thread for t in inst.threads] == [False, True, False, True]


def test_slow_runs_and_gpu_engines_stay_on_the_pool():
    xs = [np.ones((1, 4), np.float32) for _ in range(4)]
    _, inst, loop_thread = serve_one_by_one(CpuEngine(), ModelOptions(), xs, delay=2 * LIMIT)
    assert not any(t is loop_thread for t in inst.threads)
    _, inst, loop_thread = serve_one_by_one(GpuEngine(), ModelOptions(), xs)
    assert not any(t is loop_thread for t in inst.threads)


def test_requests_that_overlap_run_on_the_pool():
    async def go():
        model = ServedModel("m", CpuEngine(), ModelOptions(batching=False))
        inst = ThreadRecorder(delay=0.01)
        b = Batcher(model, [inst], ModelStats())
        xs = [np.full((1, 4), i, np.float32) for i in range(4)]
        outs = await asyncio.gather(*(b.infer({"x": x}, *model.check_request({"x": x}), 10.0) for x in xs))
        await b.close()
        return xs, outs, inst, threading.current_thread()
    xs, outs, inst, loop_thread = run_async(go())
    for x, out in zip(xs, outs):
        np.testing.assert_array_equal(out["y"], 3 * x + 1)
    assert len(inst.threads) == 4                     # each taken with others still queued runs on the pool
    assert not any(t is loop_thread for t in inst.threads[:3]), inst.threads     # the last one ran alone


def test_an_input_over_immutable_bytes_reaches_the_engine_writable_with_its_values():
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    frozen = np.frombuffer(x.tobytes(), np.float32).reshape(2, 4)        # as decoded from a request's bytes
    assert not frozen.flags.writeable
    outs, inst, _ = serve_one_by_one(CpuEngine(), ModelOptions(), [frozen, frozen])
    assert inst.writable == [True, True]
    for out in outs:
        np.testing.assert_array_equal(out["y"], 3 * x + 1)


def test_with_inline_batches_a_short_merged_batch_runs_on_the_loop_too():
    async def go(inline_batches: bool):
        model = ServedModel("m", CpuEngine(), ModelOptions(max_queue_delay_us=50_000))
        inst = ThreadRecorder()
        b = Batcher(model, [inst], ModelStats(), inline_batches=inline_batches)
        xs = [np.full((1, 4), i, np.float32) for i in range(3)]
        for _ in range(2):                    # the first merged run of 3 rows is timed on the pool
            outs = await asyncio.gather(*(b.infer({"x": x}, *model.check_request({"x": x}), 10.0) for x in xs))
            for x, out in zip(xs, outs):
                np.testing.assert_array_equal(out["y"], 3 * x + 1)
        await b.close()
        return inst, threading.current_thread()
    inst, loop_thread = run_async(go(True))
    assert len(inst.threads) == 2 and inst.threads[0] is not loop_thread and inst.threads[1] is loop_thread
    inst, loop_thread = run_async(go(False))
    assert len(inst.threads) == 2 and not any(t is loop_thread for t in inst.threads)
