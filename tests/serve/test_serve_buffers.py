"""Reusable batch buffers (kiln.serve.instance): the staged path (pinned host and fixed device buffers on a GPU)
run on CPU engines, answers checked against numpy, buffers never shared between instances or batches in flight."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from kiln.serve import instance as inst_mod
from kiln.serve import ipc
from kiln.serve.batcher import Batcher
from kiln.serve.instance import EngineInstance
from kiln.serve.metrics import ModelStats
from kiln.serve.model import ModelOptions, ServedModel

from _serve import run_async


def load(folder, name):
    import kiln
    return kiln.load(str(folder / f"{name}.kiln"))


def scale_ref(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """out = x * k in float32: the exact product rounded once, as the engine's float32 Mul does."""
    return (x.astype(np.float64) * k).astype(np.float32)


class Slow:
    """Wraps a context's ``execute``: records each run's input shapes and how many runs overlap, and sleeps."""

    def __init__(self, instances: list[EngineInstance], seconds: float) -> None:
        self.shapes: list[tuple] = []
        self.dtypes: list[tuple] = []
        self.active = self.peak = 0
        self.lock = threading.Lock()
        for inst in instances:
            inst.ctx.execute = self._wrap(inst.ctx.execute, seconds)

    def _wrap(self, execute, seconds):
        def run(tensors, copy=False):
            with self.lock:
                self.active += 1
                self.peak = max(self.peak, self.active)
                self.shapes.append(tuple(tuple(t.shape) for t in tensors))
                self.dtypes.append(tuple(str(t.dtype) for t in tensors))
            try:
                time.sleep(seconds)
                return execute(tensors, copy)
            finally:
                with self.lock:
                    self.active -= 1
        return run


def test_two_instances_with_batches_in_flight_at_once_answer_every_request_from_its_own_rows(repo):
    folder, _ = repo
    engine = load(folder, "scale")
    instances = [EngineInstance(engine, staged=True) for _ in range(2)]
    slow = Slow(instances, 0.03)
    rng = np.random.default_rng(0)
    reqs = []
    for i in range(40):
        rows, width = 1 + i % 2, (3, 5)[i % 3 == 0]                      # two widths: never merged together
        reqs.append((rng.integers(-50, 50, (rows, width)).astype(np.float32),
                     rng.integers(-9, 9, (rows, width)).astype(np.int64)))

    async def go():
        model = ServedModel("scale", engine, ModelOptions(max_queue_delay_us=2000, buckets="on", instances=2))
        b = Batcher(model, instances, ModelStats())

        async def one(x, k):
            await asyncio.sleep(0.002 * rng.random())
            feeds = {"x": x, "k": k} if rng.random() < 0.5 else {"k": k, "x": x}     # either order
            rows, key = model.check_request(feeds)
            return await b.infer(feeds, rows, key, None)
        outs = await asyncio.gather(*(one(x, k) for x, k in reqs))
        await b.close()
        return model, outs
    model, outs = run_async(go())
    for (x, k), out in zip(reqs, outs):
        np.testing.assert_array_equal(out["out"], scale_ref(x, k))
    assert slow.peak == 2                                                 # two batches did run at the same time
    for xs, ks in slow.shapes:
        assert xs == ks and xs[0] in model.buckets and xs[1] in (3, 5)   # one width per batch, a bucket's rows
    assert any(s[0][0] > 2 for s in slow.shapes)                          # and requests were merged
    assert set(slow.dtypes) == {("torch.float32", "torch.int64")}         # the engine's input order, always
    mine = [[a for held in i._buffers.values() for a in held.host.values()] for i in instances]
    assert not any(np.shares_memory(a, b) for a in mine[0] for b in mine[1])


def test_outputs_lent_to_a_borrowing_callback_are_buffer_views_and_other_requests_own_theirs(repo):
    folder, _ = repo
    engine = load(folder, "scale")
    instance = EngineInstance(engine, staged=True)
    assert instance.reuses_outputs

    async def go():
        model = ServedModel("scale", engine, ModelOptions(max_queue_delay_us=0, buckets="on"))
        b = Batcher(model, [instance], ModelStats())
        owned, borrowed = [], []
        for i in range(6):                                    # one request at a time: each run overwrites the buffers
            x, k = np.full((2, 4), i + 1, np.float32), np.full((2, 4), 3, np.int64)
            rows, key = model.check_request({"x": x, "k": k})
            owned.append((x, await b.infer({"x": x, "k": k}, rows, key, None)))
            done = asyncio.get_running_loop().create_future()

            def keep(result, done=done):
                held = next(iter(instance._buffers.values()))
                done.set_result((np.shares_memory(result["out"], held.out["out"]), result["out"].copy()))
            b.submit({"x": x, "k": k}, rows, key, None, keep, borrow=True)
            borrowed.append((x, await done))
        await b.close()
        return owned, borrowed
    owned, borrowed = run_async(go())
    for x, out in owned:                                      # still right after later runs reused the buffers
        np.testing.assert_array_equal(out["out"], x * 3)
    for x, (shared, value) in borrowed:
        assert shared                                         # lent without a copy
        np.testing.assert_array_equal(value, x * 3)


def test_buffers_are_kept_per_shape_up_to_the_shape_and_byte_limits(repo, monkeypatch):
    folder, _ = repo
    engine = load(folder, "mlp")
    a, b = EngineInstance(engine), EngineInstance(engine)
    assert not a.staged and not a.reuses_outputs                          # a CPU engine: plain host buffers
    f32 = np.dtype(np.float32)
    s4, s8 = (("x", (4, 8), f32),), (("x", (8, 8), f32),)
    assert a.buffers(s4) is a.buffers(s4)                                # reused
    assert not np.shares_memory(a.buffers(s4).host["x"], b.buffers(s4).host["x"])
    monkeypatch.setattr(inst_mod, "BUFFER_SHAPES", 2)
    first = a.buffers(s4)
    a.buffers(s8)
    a.buffers((("x", (2, 8), f32),))                                      # a third shape: the least recent goes
    assert list(a._buffers) == [s8, (("x", (2, 8), f32),)] and a.buffers(s4) is not first
    monkeypatch.setattr(inst_mod, "BUFFER_BYTES", 8 * 8 * 4)
    a.buffers(s8)                                                         # alone it fits the byte limit
    assert list(a._buffers) == [s8] and a._bytes == 8 * 8 * 4
    a.buffers((("x", (16, 8), f32),))                                     # over the limit alone: still run, kept alone
    assert len(a._buffers) == 1 and a._bytes == 16 * 8 * 4


@pytest.mark.parametrize("staged", [False, True])
def test_warm_runs_through_the_buffers_and_a_batch_after_it_is_right(repo, staged):
    folder, mlp = repo
    engine = load(folder, "mlp")
    instance = EngineInstance(engine, staged=staged)
    instance.warm({"x": np.zeros((4, 8), np.float32)})
    held = instance.buffers((("x", (4, 8), np.dtype(np.float32)),))
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    held.host["x"][...] = x
    mlp.check(x, instance.run_batch(held)["y"])
    if staged:                                           # the output buffers count too, and leave with their set
        assert instance._bytes == held.nbytes == (4 * 8 + 4 * 4) * 4
        instance._drop(next(iter(instance._buffers)))
        assert instance._bytes == 0


def test_the_engine_link_answers_from_staged_instances_each_request_its_own_rows(repo, monkeypatch):
    """The engine process of --frontends with staged instances (as on a GPU): answers are copied out of the lent
    output buffers into each request's slot or record before the next batch overwrites them."""
    from kiln.serve import repository
    from test_serve_engine_link import request, with_link
    folder, mlp = repo
    made: list[EngineInstance] = []

    def staged(engine):
        made.append(EngineInstance(engine, staged=True))
        return made[-1]
    monkeypatch.setattr(repository, "EngineInstance", staged)
    rng = np.random.default_rng(2)
    frames = [[rng.standard_normal((rows, 8)).astype(np.float32) for rows in (1, 2, 3)] for _ in range(4)]

    async def body(peer, repo_, link):
        got = []
        for f, xs in enumerate(frames):
            ids = [100 * f + k for k in range(len(xs))]
            slots = [0, None, 2]                                   # in slots and in the record
            peer.send(ipc.RECORDS, b"".join(request(n, x, s, peer.slab) for n, x, s in zip(ids, xs, slots)))
            answers = await peer.answers(len(xs))
            got.append([peer.outputs(answers[n], s) for n, s in zip(ids, slots)])
        return got
    got = run_async(with_link(folder, body, max_queue_delay_us=20000, buckets="on", instances=2))
    assert made and all(i.staged and i.reuses_outputs for i in made)
    assert any(held.out is not None for i in made for held in i._buffers.values())   # outputs went through them
    for xs, ys in zip(frames, got):
        for x, y in zip(xs, ys):
            mlp.check(x, y)
