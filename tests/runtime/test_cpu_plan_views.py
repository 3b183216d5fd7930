"""A CPU slot plan replays the views of Slice, Shuffle, Squeeze, Unsqueeze and Flatten steps per input layout
(kiln.runtime.slots.view_replay): outputs equal ONNX Runtime's at every shape, layout and storage offset, each
view layer runs once per input layout, and layers whose result is a copy (a reversed slice, a reshape of a
transposed tensor) run every time."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.runtime.slots import MAX_VIEW_LAYOUTS, view_replay

ort = pytest.importorskip("onnxruntime")
F = TensorProto.FLOAT


def _views_model():
    """x [N, 6, 4]: a forward slice reshaped (views), squeezed and flattened; a transpose and its reshape (a
    copy); a reversed slice (a copy); each output also passed through Relu, so the engine's results are fresh."""
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Slice", ["x", "s_st", "s_en", "s_ax"], ["s"], name="slice"),
        helper.make_node("Reshape", ["s", "flat"], ["r"], name="reshape_view"),
        helper.make_node("Unsqueeze", ["s", "ax1"], ["u"], name="unsqueeze"),
        helper.make_node("Squeeze", ["u", "ax1"], ["q"], name="squeeze"),
        helper.make_node("Flatten", ["q"], ["f"], name="flatten", axis=1),
        helper.make_node("Transpose", ["x"], ["t"], name="transpose", perm=[0, 2, 1]),
        helper.make_node("Reshape", ["t", "flat"], ["tr"], name="reshape_copy"),
        helper.make_node("Slice", ["x", "b_st", "b_en", "b_ax", "b_sp"], ["b"], name="slice_back"),
        helper.make_node("Relu", ["f"], ["y1"]), helper.make_node("Relu", ["tr"], ["y2"]),
        helper.make_node("Relu", ["b"], ["y3"]),
    ]
    inits = [i64("s_st", [1]), i64("s_en", [5]), i64("s_ax", [1]), i64("flat", [0, -1]), i64("ax1", [1]),
             i64("b_st", [-1]), i64("b_en", [-100]), i64("b_ax", [2]), i64("b_sp", [-1])]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "views", [vi("x", F, ["n", 6, 4])],
                              [vi("y1", F, ["n", 16]), vi("y2", F, ["n", 24]), vi("y3", F, ["n", 6, 4]),
                               vi("r", F, ["n", 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("views") / "views.onnx"
    import onnx
    onnx.save(_views_model(), str(path))
    config = kiln.BuildConfig(device="cpu", optimization_level=0,
                              profiles={"x": ((1, 6, 4), (2, 6, 4), (3, 6, 4))})
    engine = kiln.build(kiln.onnx.parse(str(path)), config)
    return engine, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check(engine_outs, sess, x: torch.Tensor) -> None:
    refs = sess.run(None, {"x": np.ascontiguousarray(x.numpy())})
    for got, ref in zip(engine_outs, refs):
        np.testing.assert_array_equal(got.numpy(), ref)


def _inputs():
    """Each batch size at two storage offsets of one buffer, and a transposed (non-contiguous) layout."""
    base = torch.randn(12, 6, 4, generator=torch.Generator().manual_seed(0)) - 0.2
    other = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1)).transpose(1, 2)
    for n in (2, 1, 3):
        yield base[0:n]
        yield base[5:5 + n]
        yield other[:n]


def test_outputs_match_onnxruntime_at_every_shape_layout_and_offset(built) -> None:
    engine, sess = built
    ctx = engine.context(threads=1)
    for _ in range(2):                      # the second pass replays what the first recorded
        for x in _inputs():
            _check(ctx.execute([x]), sess, x)
    x = next(_inputs())
    got = ctx.run({"x": x.numpy()})
    for spec, ref in zip(engine.outputs, sess.run(None, {"x": x.numpy()})):
        np.testing.assert_array_equal(got[spec["name"]], ref)


def test_a_view_layer_runs_once_per_input_layout(built) -> None:
    engine, sess = built
    ctx = engine.context(threads=1)
    calls: dict[str, int] = {}
    for step in ctx.program.steps:          # before the first run, which makes the slot plan from these
        def counted(*args, fn=step.fn, name=step.name):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args)
        step.fn = counted
    base = torch.randn(10, 6, 4)
    runs = [base[k:k + 2] for k in range(4)] + [base[k:k + 3] for k in range(3)]     # two layouts, 7 runs
    for x in runs:
        _check(ctx.execute([x]), sess, x)
    kinds = {s.name: s.kind for s in ctx.program.steps}
    assert {kinds[n] for n in ("slice", "reshape_view", "unsqueeze", "squeeze", "flatten", "transpose")} == \
        {"Slice", "Shuffle", "Unsqueeze", "Squeeze", "Flatten"}
    for name in ("slice", "reshape_view", "unsqueeze", "squeeze", "flatten", "transpose"):
        assert calls[name] == 2, (name, calls)
    for name in ("reshape_copy", "slice_back"):       # copies: no view to replay
        assert calls[name] == 7, (name, calls)


def test_view_replay_keeps_a_bounded_number_of_layouts() -> None:
    calls = []

    def flatten(x):
        calls.append(tuple(x.shape))
        return (x.reshape(x.shape[0], -1),)
    run = view_replay(flatten)
    xs = [torch.randn(n, 2, 3) for n in range(1, MAX_VIEW_LAYOUTS + 2)]
    for x in xs[:MAX_VIEW_LAYOUTS] * 2:
        torch.testing.assert_close(run(x)[0], x.reshape(x.shape[0], -1), rtol=0, atol=0)
    assert len(calls) == MAX_VIEW_LAYOUTS           # the second round replayed every layout
    run(xs[-1])                                     # one more layout: the kept ones are dropped
    torch.testing.assert_close(run(xs[0])[0], xs[0].reshape(1, -1), rtol=0, atol=0)
    assert len(calls) == MAX_VIEW_LAYOUTS + 2
    y = run(xs[0])[0]
    assert y.untyped_storage().data_ptr() == xs[0].untyped_storage().data_ptr()    # still a view, not a copy
