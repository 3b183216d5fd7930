"""CPU programs run their slot plan (kiln.runtime.slots): the same outputs as the step-by-step path and as
ONNX Runtime (a chain of tiny layers, If and Loop bodies reading outer values, Scan, a corpus model with If),
values dropped after their last reader, one-line errors, and Kiln's own per-layer time bounded relative to
the layer functions it calls (CPU time, so other load on the machine moves both sides alike)."""
from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.errors import EngineFormatError, ShapeError
from kiln.runtime.program import Program

ort = pytest.importorskip("onnxruntime")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
F = TensorProto.FLOAT


def _bench():
    sys.path.insert(0, str(BENCH))
    try:
        import cpu_overhead
    finally:
        sys.path.remove(str(BENCH))
    return cpu_overhead


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _if_model():
    """y = (x*2 + c) if cond else (x*2 - x): both branches read the outer values o = x*2 and x."""
    vi = helper.make_tensor_value_info
    then = helper.make_graph([helper.make_node("Add", ["o", "c"], ["y_then"])], "then", [],
                             [vi("y_then", F, [2, 3])],
                             [numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3) / 7, "c")])
    other = helper.make_graph([helper.make_node("Sub", ["o", "x"], ["y_else"])], "else", [],
                              [vi("y_else", F, [2, 3])])
    return _model([helper.make_node("Mul", ["x", "two"], ["o"]),
                   helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
                  [vi("x", F, [2, 3]), vi("cond", TensorProto.BOOL, [])], [vi("y", F, [2, 3])],
                  [numpy_helper.from_array(np.array(2.0, np.float32), "two")])


def _loop_model():
    """A 5-iteration Loop whose body adds the outer value w = x/2 to its carried value and scans relu of it."""
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "w"], ["acc_out"]),
         helper.make_node("Relu", ["acc_out"], ["scan"])],
        "body", [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []), vi("acc_in", F, [1, 4])],
        [vi("cond_out", TensorProto.BOOL, []), vi("acc_out", F, [1, 4]), vi("scan", F, [1, 4])])
    return _model([helper.make_node("Mul", ["x", "half"], ["w"]),
                   helper.make_node("Loop", ["M", "", "x"], ["y", "ys"], body=body)],
                  [vi("x", F, [1, 4])], [vi("y", F, [1, 4]), vi("ys", F, [5, 1, 4])],
                  [numpy_helper.from_array(np.array(5, np.int64), "M"),
                   numpy_helper.from_array(np.array(0.5, np.float32), "half")])


def _scan_model():
    """A Scan over 6 rows: state += row; each step emits state * 3."""
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "row"], ["s_out"]), helper.make_node("Mul", ["s_out", "three"], ["y_t"])],
        "body", [vi("s_in", F, [4]), vi("row", F, [4])], [vi("s_out", F, [4]), vi("y_t", F, [4])],
        [numpy_helper.from_array(np.array(3.0, np.float32), "three")])
    return _model([helper.make_node("Scan", ["s0", "xs"], ["s", "ys"], body=body, num_scan_inputs=1)],
                  [vi("s0", F, [4]), vi("xs", F, [6, 4])], [vi("s", F, [4]), vi("ys", F, [6, 4])])


def _feeds(name: str) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    if name == "chain":
        return [{"x": rng.standard_normal((1, 8)).astype(np.float32)}]
    if name == "if":
        x = rng.standard_normal((2, 3)).astype(np.float32)
        return [{"x": x, "cond": np.array(True)}, {"x": x, "cond": np.array(False)}]
    if name == "loop":
        return [{"x": rng.standard_normal((1, 4)).astype(np.float32)}]
    return [{"s0": rng.standard_normal(4).astype(np.float32), "xs": rng.standard_normal((6, 4)).astype(np.float32)}]


def _step_by_step(ctx, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The program's steps called one by one over a dict of names (the runtime before slot plans)."""
    program = ctx.program
    values = {**program.constants, **{spec["name"]: torch.from_numpy(feeds[spec["name"]])
                                      for spec in ctx.engine.inputs}}
    with torch.inference_mode():
        for step in program.steps:
            args = [None if n is None else step.fixed[i] if i in step.fixed else values[n] for i, n in enumerate(step.ins)]
            values.update(zip(step.outs, step.fn(*args)))
    return [values[n].numpy() for n in program.outputs]


def test_a_timed_cpu_run_runs_the_slot_plan(tmp_path) -> None:
    """ctx.profile and ctx.run_all time and read the path a run takes (the slot plan), with its results."""
    model = _bench().chain_model(8)
    engine = _bench().build_cpu(model, tmp_path / "m.onnx")
    ctx = engine.context(threads=1)
    x = np.random.default_rng(5).standard_normal((1, 8)).astype(np.float32)
    rows = ctx.profile({"x": x}, runs=2)
    assert ctx.program._slot_plan is not None and len(rows) == 8
    seen = ctx.run_all({"x": x})
    out = engine.outputs[0]["name"]
    np.testing.assert_array_equal(seen[out], _step_by_step(ctx, {"x": x})[0])
    assert len(seen) == 8


@pytest.mark.parametrize("name", ["chain", "if", "loop", "scan"])
def test_same_outputs_as_the_step_path_and_onnxruntime(tmp_path, name) -> None:
    model = {"chain": lambda: _bench().chain_model(60), "if": _if_model, "loop": _loop_model,
             "scan": _scan_model}[name]()
    engine = _bench().build_cpu(model, tmp_path / "m.onnx", level=0 if name == "chain" else 3)
    ctx = engine.context(threads=1)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for feeds in _feeds(name):
        got = ctx.run(feeds)
        refs = sess.run(None, feeds)
        for spec, ref, step_path in zip(engine.outputs, refs, _step_by_step(ctx, feeds)):
            np.testing.assert_array_equal(got[spec["name"]], step_path)
            bound = 1e-5 + 1e-4 * float(np.abs(ref).max())
            assert got[spec["name"]].shape == ref.shape
            assert float(np.abs(got[spec["name"]] - ref).max()) <= bound, (name, spec["name"])


def test_a_corpus_model_with_if_matches_onnxruntime() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpus"))
    try:
        import corpus_lib as cl
    finally:
        sys.path.pop(0)
    model = cl.load_manifest().model("silero_vad_16k_op15")
    path = cl.model_path(cl.corpus_dir(), model)
    if not path.exists():
        pytest.skip(f"corpus model {path} not fetched (scripts/fetch_corpus.py)")
    feeds = cl.make_feeds(model)
    config = kiln.BuildConfig(device="cpu", profiles={n: a.shape for n, a in feeds.items()})
    engine = kiln.build(kiln.onnx.parse(str(path)), config)
    assert any(layer["kind"] == "If" for layer in engine.layers)
    got = engine.context(threads=1).run(feeds)
    refs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    for spec, ref in zip(engine.outputs, refs):
        assert float(np.abs(got[spec["name"]] - ref).max()) <= 1e-5 + 1e-4 * float(np.abs(ref).max())


def _plan(layers: list[dict], inputs: list[str], outputs: list[str]) -> dict:
    return {"inputs": [{"name": n, "dtype": "float32"} for n in inputs],
            "outputs": [{"name": n, "dtype": "float32"} for n in outputs], "layers": layers}


def _relu(name: str, src: str, dst: str) -> dict:
    return {"name": name, "kind": "Activation", "inputs": [src], "outputs": [dst], "attrs": {"type": "relu"},
            "tactic": "torch"}


def test_a_value_is_dropped_after_its_last_reader() -> None:
    program = Program(_plan([_relu(f"r{i}", "x" if i == 0 else f"t{i - 1}", f"t{i}") for i in range(5)],
                            ["x"], ["t4"]), {}, "cpu")
    first: list = []
    seen_alive: list[bool] = []
    make_t0, read_t2 = program.steps[0].fn, program.steps[3].fn
    program.steps[0].fn = lambda x: (lambda out: (first.append(weakref.ref(out[0])), out)[1])(make_t0(x))
    program.steps[3].fn = lambda x: (seen_alive.append(first[0]() is not None), read_t2(x))[1]
    x = torch.randn(3, 4)
    with torch.inference_mode():
        y = program.run_env({}, [x])[0]
    assert seen_alive == [False]            # t0's last reader was step 1
    torch.testing.assert_close(y, x.relu(), rtol=0, atol=0)


def test_a_value_nothing_defines_is_one_line_error() -> None:
    program = Program(_plan([_relu("r", "nowhere", "y")], ["x"], ["y"]), {}, "cpu")
    with pytest.raises(EngineFormatError) as err:
        program.run_env({}, [torch.zeros(2)])
    assert "'nowhere'" in str(err.value) and "\n" not in str(err.value)


def test_fewer_inputs_than_the_plan_takes_is_one_line_error() -> None:
    program = Program(_plan([_relu("r", "b", "y")], ["a", "b"], ["y"]), {}, "cpu")
    with pytest.raises(EngineFormatError) as err:
        program.run_env({}, [torch.zeros(2)])
    assert "takes 2 inputs" in str(err.value) and "\n" not in str(err.value)


def test_a_failing_layer_is_named_in_one_line() -> None:
    add = {"name": "the_add", "kind": "ElementWise", "inputs": ["a", "b"], "outputs": ["y"], "attrs": {"op": "sum"},
           "tactic": "torch"}
    program = Program(_plan([add], ["a", "b"], ["y"]), {}, "cpu")
    with pytest.raises(ShapeError) as err:
        program.run_env({}, [torch.zeros(1, 8), torch.zeros(1, 9)])
    msg = str(err.value)
    assert msg.startswith("Layer 'the_add' (ElementWise) failed on inputs [(1, 8), (1, 9)]") and "\n" not in msg


def _cpu_ratios(fns: dict, base: str, calls: int, repeats: int) -> dict[str, float]:
    """Each contender's least CPU time over the repeats ÷ ``base``'s (contenders alternate, as the benchmark's
    cpu_per_call times them; the least time is the one other jobs on the machine disturbed least: their cache
    traffic only ever adds)."""
    gc.collect()
    gc.disable()        # as timeit does: in a full suite the collector walks millions of objects, and it runs
    try:                # in whichever contender allocates the most, not in proportion to its own work
        took = _bench().cpu_per_call(fns, calls, repeats)
    finally:
        gc.enable()
    return {k: min(v) / min(took[base]) for k, v in took.items()}


@pytest.mark.serial
@pytest.mark.skipif(sys.gettrace() is not None, reason="a tracer (coverage, debugger) slows Python, not torch")
def test_per_layer_overhead_is_small_against_the_layer_functions(tmp_path) -> None:
    bench = _bench()
    model = bench.chain_model(100)
    engine = bench.build_cpu(model, tmp_path / "chain.onnx")
    assert len(engine.layers) == 100
    ctx = engine.context(threads=1)
    x = torch.randn(1, 8)
    layer_fns = [(s.fn, s.fixed.get(1)) for s in ctx.program.steps]      # each layer's function and constant

    def direct():
        y = x
        for fn, c in layer_fns:
            y = fn(y)[0] if c is None else fn(y, c)[0]
        return y
    bare = bench.chain_reference(model)
    torch.testing.assert_close(ctx.execute([x])[0], bare(x), rtol=0, atol=0)
    with torch.inference_mode():
        r = {"kiln": float("inf")}
        for _ in range(3):      # up to three measurements, the least disturbed kept: other jobs only add time
            got = _cpu_ratios({"direct": direct, "bare": lambda: bare(x), "kiln": lambda: ctx.execute([x])},
                              "direct", calls=20, repeats=40)
            r = min(r, got, key=lambda m: m["kiln"])
            if r["kiln"] < 1.4:
                break
    # 40 repeats: the least of 15 was once 1.47x in a full suite run where it is 1.15x alone (the suite's own
    # garbage and other jobs only ever add time; more repeats give the undisturbed one more chances).
    # The runtime around the layer functions: about 1.1x them on a loaded 2-core VM, where a dict of names with
    # per-step device checks took 1.6-1.8x. The whole (layer functions included) against bare torch calls: ~1.6x.
    assert r["kiln"] < 1.4, r
    assert r["kiln"] / r["bare"] < 3.0, r


def test_numpy_inputs_of_any_layout_and_results_that_outlive_the_next_run(tmp_path) -> None:
    """run() shares plain C-ordered writeable arrays with torch and converts the rest; its numpy outputs
    share the output tensors' memory, so a later run must not change an earlier result."""
    model = _bench().chain_model(6)
    engine = _bench().build_cpu(model, tmp_path / "m.onnx")
    ctx = engine.context(threads=1)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    out = engine.outputs[0]["name"]
    strided = np.random.default_rng(3).standard_normal((1, 16)).astype(np.float32)[:, ::2]
    readonly = strided.copy() * 2
    readonly.flags.writeable = False
    layouts = {"c": strided.copy(), "strided": strided, "readonly": readonly, "big-endian": (-strided).astype(">f4")}
    kept = {}
    for name, x in layouts.items():
        kept[name] = (ctx.run({"x": x})[out], x.copy())
    for name, (got, x) in kept.items():
        np.testing.assert_array_equal(got, sess.run(None, {"x": np.ascontiguousarray(x, np.float32)})[0],
                                      err_msg=name)


def test_the_overhead_benchmark_runs(tmp_path) -> None:
    out = tmp_path / "rows.json"
    assert _bench().main(["--layers", "6", "--trips", "3", "--calls", "10", "--repeats", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows["chain"]["layers"] == 6 and rows["loop"]["trips"] == 3
    for row in (rows["chain"], rows["loop"]):
        assert row["execute"]["median_us"] > 0 and row["bare"]["median_us"] > 0
