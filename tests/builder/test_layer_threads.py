"""Each CPU layer's thread count, measured at build: on more than one thread the build times every layer's chosen
tactic on one thread and on the engine's count and records "one" where that count is not clearly faster
(kiln.builder.tactics.select_threads); the engine stores the choice per layer, validated on load, and the runtime
runs each layer on it. Timing decisions are checked on a fake clock (each fake layer advances it by its cost at
the thread count it was made at, as a oneDNN primitive runs on the count it was made at); a real build checks the
field's round trip, that the runtime honours it, and outputs against ONNX Runtime."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.builder.tactics as bt
import kiln.onnx
from kiln.errors import EngineFormatError
from kiln.kernels.cpu_threads import ALL, ANY, ONE, set_default_threads

ort = pytest.importorskip("onnxruntime")
REPS = 10


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    set_default_threads(None)
    torch.set_num_threads(before)


class Clock:
    def __init__(self) -> None:
        self.now_ms = 0.0

    def perf_counter(self) -> float:
        return self.now_ms / 1e3


def _fake_layer(clock: Clock, cost_ms: dict[int, float], made: list[int]):
    """make() -> a layer function whose calls cost ``cost_ms[n]`` of fake time, n the thread count torch had when
    it was made (whatever the count when it is called); ``made`` records each making's count."""
    def make():
        n = torch.get_num_threads()
        made.append(n)

        def run(x):
            clock.now_ms += cost_ms[n]
            return (x + 1.0,)
        return run
    return make


@pytest.mark.parametrize("cost_ms, want", [
    ({1: 0.050, 2: 0.080}, ONE),        # a short layer: the wake-up on 2 threads costs more than the core gives
    ({1: 0.100, 2: 0.098}, ONE),        # 2 % faster on 2 threads: not clearly faster, one thread
    ({1: 0.400, 2: 0.220}, ALL),        # a mid-size convolution: 2 threads win
    ({1: 4.000, 2: 2.100}, ALL),        # at least LONG_LAYER_MS on 2 threads: kept there without a 1-thread timing
    ({1: 0.500, 2: 0.600}, ALL),        # the same, even where one thread would be faster (load at build time)
])
def test_a_layer_runs_on_one_thread_unless_the_engines_count_is_clearly_faster(monkeypatch, cost_ms, want):
    clock, made = Clock(), []
    monkeypatch.setattr(bt, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    times = bt.thread_times(_fake_layer(clock, cost_ms, made), [torch.zeros(4)], 2, REPS)
    assert sorted(made) == [1, 2]                       # one function per thread count, made at that count
    if cost_ms[2] >= bt.LONG_LAYER_MS:
        assert times == {"2": pytest.approx(cost_ms[2])}
    else:
        assert times == {"1": pytest.approx(cost_ms[1]), "2": pytest.approx(cost_ms[2])}
    assert bt.thread_choice(times, 2) == want


def test_a_long_stepwise_layer_is_still_timed_on_one_thread(monkeypatch):
    """An RNN's call is a chain of short regions: however long, it is timed on both counts."""
    clock, made = Clock(), []
    monkeypatch.setattr(bt, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    times = bt.thread_times(_fake_layer(clock, {1: 30.0, 2: 36.0}, made), [torch.zeros(4)], 2, REPS, False)
    assert times == {"1": pytest.approx(30.0), "2": pytest.approx(36.0)}
    assert bt.thread_choice(times, 2) == ONE


def test_thread_choice_edges():
    assert bt.thread_choice({"1": 1.0, "4": 1.0 / bt.THREADS_MARGIN * 0.99}, 4) == ALL
    assert bt.thread_choice({"1": 1.0, "4": 1.0 / bt.THREADS_MARGIN * 1.01}, 4) == ONE
    assert bt.thread_choice({"1": float("inf"), "2": 1.0}, 2) == ALL          # fails on one thread
    assert bt.thread_choice({"1": 1.0, "2": float("inf")}, 2) is None         # fails on two: the runtime's rule
    assert bt.thread_choice({}, 2) is None


def _model() -> bytes:
    """x [1, 8, 16, 16] → Conv 8→16 3×3 → Relu → GlobalAveragePool → Flatten → Gemm 16→4 (small) → y [1, 4]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("w", (16, 8, 3, 3)), ("b", (16,)), ("g", (4, 16)), ("c", (4,)))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["h"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "g", "c"], ["y"], transB=1, name="fc")]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "small_cnn", [vi("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [vi("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _build(data: bytes, threads: int, cache=None):
    set_default_threads(threads)
    try:
        return kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu", timing_cache=cache))
    finally:
        set_default_threads(None)


def test_a_build_on_two_threads_records_each_layers_measured_choice(monkeypatch, tmp_path):
    """Decisions from times that favour one thread for the pool and two for the rest: each timed layer carries
    its choice (the Flatten, a view no region runs, is not timed), in the timing cache under "2 threads"; the
    engine file keeps the field; the runtime runs each layer on it; outputs match ONNX Runtime."""
    timed: list[str] = []

    def fake_times(make, ins, threads, reps, long_alone=True):
        make()
        timed.append(tuple(ins[0].shape))
        return {"1": 1.0, str(threads): 2.0 if ins[0].dim() == 4 and ins[0].shape[-1] == 16 and
                ins[0].shape[1] == 16 else 0.5}
    monkeypatch.setattr(bt, "thread_times", fake_times)
    data = _model()
    cache = tmp_path / "cpu.timing"
    engine = _build(data, 2, str(cache))
    got = {layer["name"]: layer.get("threads") for layer in engine.layers}
    conv = next(n for n in got if n.startswith("conv"))
    pool = next(n for n in got if n.startswith("pool"))
    fc = next(n for n in got if n.startswith("fc"))
    assert (got[conv], got[pool], got[fc]) == ("all", "one", "all")
    assert all(v is None for n, v in got.items() if n not in (conv, pool, fc))
    keys = [k for k in json.loads(cache.read_text())["entries"] if "|threads:" in k]
    assert len(keys) == 3 and all(k.split("|")[0].endswith("/2 threads") for k in keys)

    path = tmp_path / "m.kiln"
    engine.save(str(path))
    loaded = kiln.load(str(path))
    assert {layer["name"]: layer.get("threads") for layer in loaded.layers} == got
    ctx = loaded.context(threads=2)
    seen = []
    for step in ctx.program.steps:
        fn = step.fn
        step.fn = lambda *a, fn=fn, step=step: (seen.append((step.name, step.threads, torch.get_num_threads())),
                                                fn(*a))[1]
    x = np.random.default_rng(1).standard_normal((1, 8, 16, 16)).astype(np.float32)
    y = ctx.run({"x": x})["y"]
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(y - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()
    on = {name: n for name, _, n in seen}
    assert (on[conv], on[pool], on[fc]) == (2, 1, 2)
    assert torch.get_num_threads() == 2


def test_a_real_build_on_two_threads_times_every_layer_and_matches_onnxruntime():
    """Real timings (their outcome depends on the machine): every layer a region runs gets a choice, the view does
    not; on one thread nothing is measured and no layer carries the field."""
    data = _model()
    engine = _build(data, 2)
    got = {layer["kind"]: layer.get("threads") for layer in engine.layers}
    assert got.pop("Flatten") is None
    assert got and all(v in ("one", "all") for v in got.values()), got
    x = np.random.default_rng(2).standard_normal((1, 8, 16, 16)).astype(np.float32)
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for threads in (2, 1):
        y = engine.context(threads=threads).run({"x": x})["y"]
        assert np.abs(y - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()
    assert all("threads" not in layer for layer in _build(data, 1).layers)


@pytest.mark.parametrize("bad", ["two", 2, None, ["one"]])
def test_a_damaged_threads_field_is_refused_in_one_line(tmp_path, bad):
    engine = _build(_model(), 1)
    engine.header["plan"]["layers"][0]["threads"] = bad
    path = tmp_path / "bad.kiln"
    engine.save(str(path))
    with pytest.raises(EngineFormatError) as err:
        kiln.load(str(path))
    msg = str(err.value)
    assert "\n" not in msg and "'threads' must be one of 'one', 'all'" in msg, msg


def test_an_engine_without_the_field_keeps_the_size_rule():
    """Engines built before the measurement (no ``threads``): the runtime's rule (layer_threads) decides."""
    engine = _build(_model(), 2)
    for layer in engine.header["plan"]["layers"]:
        layer.pop("threads", None)
    ctx = engine.context(threads=2)
    rule = {s.kind: s.threads for s in ctx.program.steps}
    assert rule["Flatten"] == ANY and rule["Gemm" if "Gemm" in rule else "FullyConnected"] == ONE
