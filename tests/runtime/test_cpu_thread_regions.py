"""Small layers on one thread: a CPU step whose static shapes make it a GEMM-like layer under SMALL_LAYER_FLOPS
runs on one thread whatever the run's count; small simple steps run on either, so a stretch of them is one
region with one switch down and one back; a GEMM-like step without static shapes chooses per input shape at run
time. Checked against FLOPs written out from the shapes, the thread count each layer sees, the count after a run
(also after a failing layer), and ONNX Runtime's outputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.errors import ShapeError
from kiln.kernels.cpu_threads import ALL, ANY, ONE, SHAPE, SMALL_LAYER_FLOPS, layer_flops, layer_threads
from kiln.runtime.slots import one_thread_regions

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_flops_of_each_gemm_like_kind():
    # conv: N·Cout·Lo outputs, each Cin·k multiply-adds
    assert layer_flops("Convolution", [(2, 129, 4), (128, 129, 3), (128,)], [(2, 128, 4)]) == 2 * (2 * 128 * 4) * (129 * 3)
    assert layer_flops("Convolution", [(1, 8, 5, 5), (16, 4, 3, 3)], [(1, 16, 3, 3)]) == 2 * (16 * 9) * (4 * 9)
    # deconvolution: every input element times Cout/groups·kernel
    assert layer_flops("Deconvolution", [(1, 8, 4, 4), (8, 2, 3, 3)], [(1, 2, 6, 6)]) == 2 * (8 * 16) * (2 * 9)
    # RNN: T·N rows through W [dirs, G·H, I] and R [dirs, G·H, H]
    assert layer_flops("RNN", [(2, 1, 128), (1, 512, 128), (1, 512, 128), (1, 1024)], [(2, 1, 1, 128)]) == \
        2 * 2 * (512 * 128 + 512 * 128)
    # matrix products: M·N outputs, K each
    assert layer_flops("MatMul", [(3, 4, 64), (64, 32)], [(3, 4, 32)]) == 2 * (3 * 4 * 32) * 64
    assert layer_flops("FullyConnected", [(4, 64), (32, 64), (32,)], [(4, 32)]) == 2 * (4 * 32) * 64
    assert layer_flops("Gemm", [(5, 7), (7, 9)], [(5, 9)]) == 2 * 45 * 7
    assert layer_flops("Relu", [(4, 4)], [(4, 4)]) is None


def test_thread_choice_by_size_and_kind():
    big_k = SMALL_LAYER_FLOPS // (2 * 16) + 1          # 16 outputs of K each: just over the bound
    assert layer_threads("MatMul", [(1, big_k), (big_k, 16)], [(1, 16)]) == ALL
    assert layer_threads("MatMul", [(1, big_k - 2), (big_k - 2, 16)], [(1, 16)]) == ONE
    assert layer_threads("ElementWise", [(1, 100), (1, 100)], [(1, 100)]) == ANY
    assert layer_threads("ElementWise", [(1, 40000), (1, 40000)], [(1, 40000)]) == ALL
    assert layer_threads("If", [()], [(1, 4)]) == ALL                # control flow: its bodies choose
    assert layer_threads("Plugin", [(1, 4)], [(1, 4)]) == ALL


@pytest.mark.parametrize("choices,regions", [
    (["one", "any", "one", "all", "any", "one", "any"], ((0, 2), (5, 5))),
    (["any", "one", "any", "any"], ((1, 1),)),
    (["all", "any", "all"], ()),
    (["one", "all", "one", "one"], ((0, 0), (2, 3))),
    ([], ()),
])
def test_regions_span_from_a_one_thread_step_to_the_last_before_an_all_step(choices, regions):
    assert one_thread_regions(choices) == regions


def _model(big: int = 128):
    """x [1, 16] → MatMul (small) → Relu → MatMul (small) → Add → MatMul [1, big·big]·[big·big, big] (large)."""
    rng = np.random.default_rng(0)
    w = lambda *s: numpy_helper.from_array((rng.standard_normal(s) * 0.2).astype(np.float32))   # noqa: E731
    inits = [w(16, 32), w(32, 16), w(1, 16), w(16, big * big), w(big * big, big)]
    for t, n in zip(inits, ("w1", "w2", "c", "w3", "w4")):
        t.name = n
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="small1"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["b"], name="small2"), helper.make_node("Add", ["b", "c"], ["d"]),
             helper.make_node("MatMul", ["d", "w3"], ["e"], name="wide"),
             helper.make_node("MatMul", ["e", "w4"], ["y"], name="large")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, big])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _seen_threads(ctx) -> list[tuple[str, int]]:
    seen = []
    for step in ctx.program.steps:
        fn = step.fn
        step.fn = lambda *a, fn=fn, step=step: (seen.append((step.kind, step.threads, torch.get_num_threads())),
                                                fn(*a))[1]
    ctx.program._slot_plan = None
    return seen


def test_small_layers_run_on_one_thread_and_the_run_count_comes_back():
    data = _model()
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu", optimization_level=0))
    ctx = engine.context(threads=2)
    seen = _seen_threads(ctx)
    x = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for _ in range(2):
        seen.clear()
        got = ctx.run({"x": x})["y"]
        assert torch.get_num_threads() == 2
        assert np.abs(got - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()
    gemms = [(t, n) for kind, t, n in seen if kind in ("MatMul", "FullyConnected")]
    # 16·32 and 32·16 multiply-adds are small, [1, 16]·[16, 16384] 0.5 MFLOP; [1, 16384]·[16384, 128] 4.2 MFLOP
    assert gemms == [(ONE, 1), (ONE, 1), (ONE, 1), (ALL, 2)]
    assert [n for _, t, n in seen if t == ANY] == [1, 1]            # inside the region: on its one thread


def test_one_switch_down_and_one_back_per_region(monkeypatch):
    engine = kiln.build(kiln.onnx.parse(_model()), kiln.BuildConfig(device="cpu", optimization_level=0))
    ctx = engine.context(threads=2)
    x = np.ones((1, 16), np.float32)
    ctx.run({"x": x})
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n))[1])
    ctx.run({"x": x})
    assert calls == [1, 2]
    calls.clear()
    one = engine.context(threads=1)
    one.run({"x": x})
    calls.clear()
    one.run({"x": x})
    assert calls == []                                  # on one thread nothing switches


def test_a_failing_layer_inside_a_region_leaves_the_run_count():
    engine = kiln.build(kiln.onnx.parse(_model()), kiln.BuildConfig(device="cpu", optimization_level=0))
    ctx = engine.context(threads=2)
    step = next(s for s in ctx.program.steps if s.kind == "ElementWise")

    def broken(*args):
        assert torch.get_num_threads() == 1
        raise RuntimeError("broken on purpose")
    step.fn = broken
    ctx.program._slot_plan = None
    with pytest.raises(ShapeError, match=r"^Layer .* failed on inputs .*: broken on purpose$"):
        ctx.run({"x": np.ones((1, 16), np.float32)})
    assert torch.get_num_threads() == 2


def test_gemm_like_layers_without_static_shapes_choose_per_input_shape(monkeypatch):
    """A dynamic batch: no static shapes, so no regions; each MatMul decides at its first run at a shape (on the
    run's count) and then runs on one thread where it is small, switching around itself alone."""
    import onnx
    m = onnx.load_from_string(_model())
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "n"
    data = m.SerializeToString()
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu", optimization_level=0,
                                                                profiles={"x": [(1, 16), (2, 16), (4, 16)]}))
    ctx = engine.context(threads=2)
    assert {s.threads for s in ctx.program.steps if s.kind == "MatMul"} == {SHAPE}
    seen = _seen_threads(ctx)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).standard_normal((2, 16)).astype(np.float32)
    ctx.run({"x": x})
    assert ctx.program._slot_plan.regions == ()
    assert [n for kind, _, n in seen if kind == "MatMul"] == [2, 2, 2, 2]        # first run at the shape
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n))[1])
    seen.clear()
    got = ctx.run({"x": x})["y"]
    ref = sess.run(None, {"x": x})[0]
    assert np.abs(got - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()
    # batch 2: the last product is 2·16384·128 multiply-adds (8.4 MFLOP), the others small
    assert [n for kind, _, n in seen if kind == "MatMul"] == [1, 1, 1, 2]
    assert calls == [1, 2] * 3
    assert torch.get_num_threads() == 2
