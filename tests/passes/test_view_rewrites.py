"""View-chain collapse (passes/collapse_views.py) and shuffles through linear layers
(passes/sink_shuffles.py) on small hand-written ONNX graphs: the layers they leave, and the values
against ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.passes._views import NotAView, ViewMap

RNG = np.random.default_rng(0)


def _model(nodes, inputs, output_shape, inits=()) -> bytes:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in inits])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m.SerializeToString()


def _shape(name, dims):
    return (name, np.asarray(dims, np.int64))


def _run(model: bytes, feeds: dict) -> list[dict]:
    engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu",
                                                                profiles={n: v.shape for n, v in feeds.items()}))
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(engine.context().run(feeds)["y"], ref, rtol=1e-5, atol=1e-5)
    return engine.layers


def test_heads_split_chain_becomes_one_shuffle():
    """[S, B·H, hd] → Transpose → [B·H, S, hd] → Reshape[B, H, S, hd] after a projection: one split+permute."""
    s, b, h, hd = 5, 2, 3, 4
    w = RNG.standard_normal((h * hd, h * hd)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["p"]),
             helper.make_node("Reshape", ["p", "s1"], ["r1"]),
             helper.make_node("Transpose", ["r1"], ["t"], perm=[1, 0, 2]),
             helper.make_node("Reshape", ["t", "s2"], ["r2"]),
             helper.make_node("Relu", ["r2"], ["y"])]
    model = _model(nodes, [("x", [s, b, h * hd])], [b, h, s, hd],
                   [("w", w), _shape("s1", [s, b * h, hd]), _shape("s2", [b, h, s, hd])])
    layers = _run(model, {"x": RNG.standard_normal((s, b, h * hd)).astype(np.float32)})
    shuffles = [layer for layer in layers if layer["kind"] == "Shuffle"]
    assert len(shuffles) == 1
    assert shuffles[0]["attrs"]["reshape"] == [s, b, h, hd] and shuffles[0]["attrs"]["second_transpose"] == [1, 2, 0, 3]


def test_chain_that_is_no_view_of_its_source_stays():
    """[2, 3] → Transpose → Reshape[2, 3] regroups elements across dims of unrelated sizes."""
    with pytest.raises(NotAView):
        m = ViewMap((2, 3))
        m.apply(("perm", (1, 0)))
        m.apply(("reshape", (2, 3)))
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Transpose", ["a"], ["t"], perm=[1, 0]),
             helper.make_node("Reshape", ["t", "s"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"])]
    model = _model(nodes, [("x", [2, 3])], [2, 3], [_shape("s", [2, 3])])
    layers = _run(model, {"x": RNG.standard_normal((2, 3)).astype(np.float32)})
    assert [layer["kind"] for layer in layers].count("Shuffle") == 2


def test_transposes_that_cancel_through_reshapes_vanish():
    """Transpose → Reshape (merge) → Reshape (split back) → Transpose is the identity: no shuffle is
    left, and the two ReLUs it separated fuse into one Pointwise layer."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Transpose", ["a"], ["t1"], perm=[1, 0, 2]),
             helper.make_node("Reshape", ["t1", "s1"], ["r1"]),
             helper.make_node("Reshape", ["r1", "s2"], ["r2"]),
             helper.make_node("Transpose", ["r2"], ["t2"], perm=[1, 0, 2]),
             helper.make_node("Relu", ["t2"], ["y"])]
    model = _model(nodes, [("x", [2, 5, 8])], [2, 5, 8], [_shape("s1", [10, 8]), _shape("s2", [5, 2, 8])])
    layers = _run(model, {"x": RNG.standard_normal((2, 5, 8)).astype(np.float32)})
    assert [layer["kind"] for layer in layers] == ["Pointwise"]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [(6,), (1, 6), ()])
def test_gemm_between_shuffles_reads_and_writes_batch_major(trans_b, bias_shape):
    """nn.MultiheadAttention's out-projection: [B, S, K] → [S·B, K] → Gemm → [S, B, N] → [B, S, N]
    becomes one FullyConnected on [B, S, K], with Gemm's alpha and beta folded into its weights."""
    b, s, k, n = 2, 3, 4, 6
    w = RNG.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = RNG.standard_normal(bias_shape).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Transpose", ["a"], ["t1"], perm=[1, 0, 2]),
             helper.make_node("Reshape", ["t1", "s1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w", "c"], ["g"], alpha=0.5, beta=2.0, transB=trans_b),
             helper.make_node("Reshape", ["g", "s2"], ["r2"]),
             helper.make_node("Transpose", ["r2"], ["t2"], perm=[1, 0, 2]),
             helper.make_node("Relu", ["t2"], ["y"])]
    model = _model(nodes, [("x", [b, s, k])], [b, s, n],
                   [("w", w), ("c", c), _shape("s1", [s * b, k]), _shape("s2", [s, b, n])])
    layers = _run(model, {"x": RNG.standard_normal((b, s, k)).astype(np.float32)})
    assert [layer["kind"] for layer in layers] == ["Activation", "FullyConnected"]
    assert layers[1]["attrs"].get("activation") == "relu"


def test_transpose_before_a_projection_moves_after_it():
    """``LN → Transpose[1,0,2] → in-projection → Reshape → Transpose``: the projection reads its input
    in place, and the two shuffles around it become one."""
    b, s, k, n = 2, 3, 4, 6
    w = RNG.standard_normal((k, n)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Transpose", ["a"], ["t1"], perm=[1, 0, 2]),
             helper.make_node("MatMul", ["t1", "w"], ["p"]),
             helper.make_node("Reshape", ["p", "s1"], ["r1"]),
             helper.make_node("Transpose", ["r1"], ["t2"], perm=[2, 1, 0, 3]),
             helper.make_node("Sigmoid", ["t2"], ["y"])]
    model = _model(nodes, [("x", [b, s, k])], [2, b, s, n // 2], [("w", w), _shape("s1", [s, b, 2, n // 2])])
    layers = _run(model, {"x": RNG.standard_normal((b, s, k)).astype(np.float32)})
    kinds = [layer["kind"] for layer in layers]
    assert kinds == ["Activation", "FullyConnected", "Shuffle", "Activation"]
    assert layers[1]["inputs"][0] == layers[0]["outputs"][0]


def test_a_transpose_stays_before_the_projection_where_moving_it_would_copy():
    """``Transpose[1,0,2] → MatMul → Reshape[S·B, N]``: after the projection the transpose would meet a
    Reshape merging S and B of a [B, S]-ordered tensor, a copy; before it, both are views."""
    b, s, k, n = 2, 3, 4, 6
    w = RNG.standard_normal((k, n)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Transpose", ["a"], ["t1"], perm=[1, 0, 2]),
             helper.make_node("MatMul", ["t1", "w"], ["p"]),
             helper.make_node("Reshape", ["p", "s1"], ["r1"]),
             helper.make_node("Sigmoid", ["r1"], ["y"])]
    model = _model(nodes, [("x", [b, s, k])], [s * b, n], [("w", w), _shape("s1", [s * b, n])])
    layers = _run(model, {"x": RNG.standard_normal((b, s, k)).astype(np.float32)})
    kinds = [layer["kind"] for layer in layers]
    assert kinds == ["Activation", "Shuffle", "MatMul", "Shuffle", "Activation"]
    assert layers[1]["attrs"]["first_transpose"] == [1, 0, 2]


def test_transpose_projection_transpose_is_the_projection():
    """Transpose → projection → the inverse transpose: the transposes meet below the projection and cancel."""
    b, s, k, n = 2, 3, 4, 6
    w = RNG.standard_normal((n, k)).astype(np.float32)
    c = RNG.standard_normal((n,)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Transpose", ["a"], ["t1"], perm=[1, 0, 2]),
             helper.make_node("MatMul", ["t1", "wt"], ["p"]),
             helper.make_node("Add", ["p", "c"], ["q"]),
             helper.make_node("Transpose", ["q"], ["t2"], perm=[1, 0, 2]),
             helper.make_node("Sigmoid", ["t2"], ["y"])]
    model = _model(nodes, [("x", [b, s, k])], [b, s, n], [("wt", w.T.copy()), ("c", c)])
    layers = _run(model, {"x": RNG.standard_normal((b, s, k)).astype(np.float32)})
    assert [layer["kind"] for layer in layers] == ["Activation", "FullyConnected"]     # sigmoid as its epilogue
    assert layers[1]["inputs"][0] == layers[0]["outputs"][0] and layers[1]["attrs"]["activation"] == "sigmoid"
