"""The dynamic batcher in-process, on a stand-in engine whose answer (2*x + row sum) is checked row by row."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from kiln.errors import ShapeError
from kiln.serve import batcher
from kiln.serve.batcher import Batcher
from kiln.serve.errors import BadRequest, DeadlineExceeded, Unavailable
from kiln.serve.metrics import ModelStats
from kiln.serve.model import ModelOptions, ServedModel

from _serve import run_async


class FakeEngine:
    """x [N, L] float32 -> y [N, L]; a profile of N 1..8, L 1..16."""

    inputs = [{"name": "x", "dtype": "float32", "shape": ["N", "L"]}]
    outputs = [{"name": "y", "dtype": "float32", "shape": ["N", "L"]}]
    profiles = [{"x": {"min": [1, 1], "opt": [4, 4], "max": [8, 16]}}]


class FakeInstance:
    """Records the rows of every run; a row holding -1 makes the run raise (a request the engine refuses)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[int] = []
        self.seen: list[np.ndarray] = []
        self.delay = delay
        self.lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feeds["x"]
        with self.lock:
            self.batches.append(x.shape[0])
            self.seen.append(x.copy())
        time.sleep(self.delay)
        if np.any(x == -1):
            raise ShapeError("row holds -1")
        return {"y": 2 * x + x.sum(axis=1, keepdims=True)}


def expected(x: np.ndarray) -> np.ndarray:
    return 2 * x + x.sum(axis=1, keepdims=True)


def make(options: ModelOptions, instances: int = 1, delay: float = 0.0):
    model = ServedModel("fake", FakeEngine(), options)
    insts = [FakeInstance(delay) for _ in range(instances)]
    return model, insts, ModelStats()


async def submit(batcher: Batcher, model: ServedModel, x: np.ndarray, timeout: float | None = None):
    rows, key = model.check_request({"x": x})
    return await batcher.infer({"x": x}, rows, key, timeout)


def run(coro):
    return run_async(coro)


def test_merges_same_shapes_up_to_max_batch_and_splits_rows_back():
    async def go():
        model, insts, stats = make(ModelOptions(max_queue_delay_us=200_000))
        b = Batcher(model, insts, stats)
        xs = [np.full((1 + i % 3, 4), i, np.float32) for i in range(6)]    # rows 1,2,3,1,2,3 = 12
        outs = await asyncio.gather(*(submit(b, model, x) for x in xs))
        await b.close()
        return xs, outs, insts[0].batches
    xs, outs, batches = run(go())
    for x, out in zip(xs, outs):
        np.testing.assert_array_equal(out["y"], expected(x))
    assert batches == [7, 5]                # 1+2+3+1 = 7 (+2 would pass 8), then 2+3
    assert model_max() == 8


def model_max() -> int:
    return ServedModel("fake", FakeEngine(), ModelOptions()).max_batch


def test_different_shapes_are_never_merged():
    async def go():
        model, insts, stats = make(ModelOptions(max_queue_delay_us=100_000))
        b = Batcher(model, insts, stats)
        xs = [np.arange(2 * L, dtype=np.float32).reshape(2, L) for L in (3, 5, 3, 5, 7)]
        outs = await asyncio.gather(*(submit(b, model, x) for x in xs))
        await b.close()
        return xs, outs, insts[0].batches
    xs, outs, batches = run(go())
    for x, out in zip(xs, outs):
        np.testing.assert_array_equal(out["y"], expected(x))
    assert sorted(batches) == [2, 4, 4]


def test_preferred_size_runs_without_waiting_for_the_delay():
    async def go():
        model, insts, stats = make(ModelOptions(max_queue_delay_us=5_000_000, preferred_batch_sizes=(2,)))
        b = Batcher(model, insts, stats)
        t0 = time.monotonic()
        await asyncio.gather(*(submit(b, model, np.ones((1, 2), np.float32)) for _ in range(2)))
        took = time.monotonic() - t0
        await b.close()
        return took, insts[0].batches
    took, batches = run(go())
    assert batches == [2] and took < 2.5


def test_no_batching_runs_each_request_alone():
    async def go():
        model, insts, stats = make(ModelOptions(batching=False, max_queue_delay_us=100_000))
        b = Batcher(model, insts, stats)
        await asyncio.gather(*(submit(b, model, np.ones((2, 2), np.float32)) for _ in range(4)))
        await b.close()
        return model.max_batch, insts[0].batches
    assert run(go()) == (1, [2, 2, 2, 2])


def test_a_failing_request_does_not_fail_the_others_in_its_batch():
    async def go():
        model, insts, stats = make(ModelOptions(max_queue_delay_us=100_000))
        b = Batcher(model, insts, stats)
        xs = [np.full((1, 3), v, np.float32) for v in (1, 2, -1, 4)]
        outs = await asyncio.gather(*(submit(b, model, x) for x in xs), return_exceptions=True)
        await b.close()
        return xs, outs, insts[0].batches
    xs, outs, batches = run(go())
    assert isinstance(outs[2], BadRequest) and "-1" in str(outs[2])
    for i in (0, 1, 3):
        np.testing.assert_array_equal(outs[i]["y"], expected(xs[i]))
    assert batches[0] == 4 and sorted(batches[1:]) == [1, 1, 1, 1]    # merged, then one by one


def test_full_queue_answers_unavailable_and_a_timeout_frees_its_slot():
    async def go():
        model, insts, stats = make(ModelOptions(max_queue=1, max_queue_delay_us=3_000_000))
        b = Batcher(model, insts, stats)
        first = asyncio.ensure_future(submit(b, model, np.ones((1, 2), np.float32), timeout=0.3))
        await asyncio.sleep(0.05)
        with pytest.raises(Unavailable, match="max-queue"):
            await submit(b, model, np.ones((1, 2), np.float32))
        with pytest.raises(DeadlineExceeded, match="300 ms"):
            await first
        assert b.depth == 0
        out = await submit(b, model, np.ones((1, 2), np.float32), timeout=10)  # the slot is free again
        await b.close()
        return out, insts[0].batches
    out, batches = run(go())
    np.testing.assert_array_equal(out["y"], expected(np.ones((1, 2), np.float32)))
    assert batches == [1]                     # the timed-out request never ran


def test_each_request_fails_at_its_own_deadline_whatever_the_order_they_came_in():
    async def go():
        model, insts, stats = make(ModelOptions(max_queue_delay_us=3_000_000))
        b = Batcher(model, insts, stats)
        loop = asyncio.get_running_loop()
        t0, ended = loop.time(), {}

        async def one(t):
            with pytest.raises(DeadlineExceeded, match=f"{t * 1e3:.0f} ms"):
                await submit(b, model, np.ones((1, 2), np.float32), timeout=t)
            ended[t] = loop.time() - t0
        await asyncio.gather(*(one(t) for t in (0.4, 0.1, 0.25)))
        depth = b.depth
        await b.close()
        return ended, depth, insts[0].batches
    ended, depth, batches = run(go())
    assert sorted(ended, key=ended.get) == [0.1, 0.25, 0.4]
    assert all(t - 0.001 <= ended[t] < t + 2.0 for t in ended), ended
    assert depth == 0 and batches == []               # none ran; the queue is empty


def test_deadlines_of_answered_requests_do_not_pile_up():
    async def go():
        model, insts, stats = make(ModelOptions(batching=False))
        b = Batcher(model, insts, stats)
        x = np.ones((1, 2), np.float32)
        for _ in range(2 * batcher.COMPACT_AT + 10):
            np.testing.assert_array_equal((await submit(b, model, x, timeout=60))["y"], expected(x))
        held = len(b._deadlines)
        await b.close()
        return held
    assert run(go()) <= batcher.COMPACT_AT


def test_close_finishes_queued_requests_then_refuses_new_ones():
    async def go():
        model, insts, stats = make(ModelOptions(batching=False), instances=2, delay=0.05)
        b = Batcher(model, insts, stats)
        tasks = [asyncio.ensure_future(submit(b, model, np.full((1, 2), i, np.float32))) for i in range(6)]
        await asyncio.sleep(0.01)
        await b.close()
        outs = [t.result() for t in tasks]                    # every one answered before close returned
        with pytest.raises(Unavailable):
            await submit(b, model, np.ones((1, 2), np.float32))
        return outs, insts
    outs, insts = run(go())
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out["y"], expected(np.full((1, 2), i, np.float32)))
    assert all(inst.batches for inst in insts)           # both instances took work
    assert sum(sum(inst.batches) for inst in insts) == 6


def test_stats_count_queue_compute_and_batch_sizes():
    async def go():
        model, insts, stats = make(ModelOptions(max_queue_delay_us=100_000))
        b = Batcher(model, insts, stats)
        await asyncio.gather(*(submit(b, model, np.ones((2, 2), np.float32)) for _ in range(3)))
        await b.close()
        return stats
    stats = run(go())
    assert stats.batch_size.count == 1 and stats.batch_size.total == 6
    assert stats.queue_seconds.count == 3 and stats.compute_seconds.count == 1


def test_warmup_feeds_cover_every_batch_size_inside_the_profile():
    model = ServedModel("fake", FakeEngine(), ModelOptions(max_batch=5, warmup=True))
    feeds = model.warmup_feeds()
    assert [f["x"].shape for f in feeds] == [(b, 4) for b in range(1, 6)]       # L: the profile's opt
    assert all(f["x"].dtype == np.float32 and not f["x"].any() for f in feeds)

    class NoProfile(FakeEngine):
        profiles = []
    assert ServedModel("free", NoProfile(), ModelOptions()).warmup_feeds() == []    # dynamic dims, no sizes known


def test_buckets_pad_a_nearly_full_batch_with_zero_rows_and_split_a_sparse_one():
    async def go(n: int):
        model, insts, stats = make(ModelOptions(max_queue_delay_us=100_000, buckets="on"))
        b = Batcher(model, insts, stats)
        xs = [np.full((1, 2), i + 1, np.float32) for i in range(n)]
        outs = await asyncio.gather(*(submit(b, model, x) for x in xs))
        await b.close()
        return model, xs, outs, insts[0]
    for n, want in ((7, [8]), (6, [8]), (3, [4]), (5, [4, 1])):       # padded when >= 3/4 of the bucket is real
        model, xs, outs, inst = run(go(n))
        assert model.buckets == (1, 2, 4, 8)
        assert inst.batches == want, n
        for x, out in zip(xs, outs):
            np.testing.assert_array_equal(out["y"], expected(x))
        seen = inst.seen[0]
        assert (seen[min(n, want[0]):] == 0).all() and (seen[:min(n, want[0])] > 0).all()   # pad rows are zeros
    assert ServedModel("fake", FakeEngine(), ModelOptions()).buckets == ()          # auto: off on the CPU
    gpu = type("GpuEngine", (FakeEngine,), {"device": "cuda"})()
    assert ServedModel("gpu", gpu, ModelOptions(max_batch=6)).buckets == (1, 2, 4, 6)
    assert [f["x"].shape[0] for f in ServedModel("gpu", gpu, ModelOptions(max_batch=6)).warmup_feeds()] == [1, 2, 4, 6]
