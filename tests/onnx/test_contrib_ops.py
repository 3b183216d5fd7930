"""ONNX Runtime contrib ops (com.microsoft) against ONNX Runtime itself.

Each case is a small onnx.helper model (opset 17 + com.microsoft 1) run by ONNX Runtime on CPU with
graph optimizations off (so ORT runs the contrib kernel) and by Kiln on CPU. Float outputs must agree
within max|err| ≤ 1e-5 + 1e-4·max|ref|; quantized outputs exactly or within one step, as each test says.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx

MS = "com.microsoft"
RNG = np.random.default_rng(0)


def _model(nodes, feeds: dict, inits: dict, outputs) -> onnx.ModelProto:
    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()]
    outs = [onnx.ValueInfoProto(name=o) for o in outputs]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
    graph = helper.make_graph(nodes, "g", ins, outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
                             ir_version=8)


def ort(model: onnx.ModelProto, feeds: dict) -> dict:
    import onnxruntime as rt
    so = rt.SessionOptions()
    so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = rt.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def kiln_run(model: onnx.ModelProto, feeds: dict) -> dict:
    engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu"))
    return engine.context().run(feeds)


def assert_fp32(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != ORT {ref.shape}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != ORT {ref.dtype}"
    assert np.isfinite(ref).all(), f"{what}: ORT output has non-finite values"
    err = float(np.abs(got.astype(np.float64) - ref).max()) if ref.size else 0.0
    bound = 1e-5 + 1e-4 * (float(np.abs(ref).max()) if ref.size else 0.0)
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def assert_quant(got: np.ndarray, ref: np.ndarray, what: str, lsb: int = 0) -> None:
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape and got.dtype == ref.dtype, f"{what}: {got.dtype}{got.shape} vs {ref.dtype}{ref.shape}"
    diff = int(np.abs(got.astype(np.int64) - ref.astype(np.int64)).max()) if ref.size else 0
    assert diff <= lsb, f"{what}: differs from ORT by {diff} steps (allowed {lsb})"


def check(nodes, feeds: dict, inits: dict | None = None, outputs=("y",), lsb: int | None = None) -> dict:
    """Run the graph on ORT and Kiln and compare every output; returns ORT's outputs."""
    m = _model(nodes, feeds, inits or {}, outputs)
    ref = ort(m, feeds)
    got = kiln_run(m, feeds)
    for name in outputs:
        if ref[name].dtype.kind in "iub" and lsb is not None:
            assert_quant(got[name], ref[name], name, lsb)
        elif ref[name].dtype.kind in "iub":
            np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
            assert got[name].dtype == ref[name].dtype, name
        else:
            assert_fp32(got[name], ref[name], name)
    return ref


def rand(*shape, scale=1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def node(op, ins, outs=("y",), **attrs):
    return helper.make_node(op, list(ins), list(outs), domain=MS, **attrs)


# ---- fused conv / gemm / matmul ------------------------------------------------------------------

@pytest.mark.parametrize("act,params", [("", []), ("Relu", []), ("LeakyRelu", [0.2]), ("Clip", [-0.5, 0.7]),
                                        ("HardSigmoid", [0.3, 0.4]), ("Sigmoid", []), ("Tanh", [])])
def test_fused_conv(act, params) -> None:
    attrs = {"activation": act} if act else {}
    if params:
        attrs["activation_params"] = params
    check([node("FusedConv", ["x", "w", "b"], strides=[2, 1], pads=[1, 0, 1, 1], group=2, **attrs)],
          {"x": rand(2, 4, 7, 6)}, {"w": rand(6, 2, 3, 3), "b": rand(6)})


def test_fused_conv_sum_input_before_activation() -> None:
    check([node("FusedConv", ["x", "w", "", "z"], pads=[1, 1, 1, 1], activation="Relu")],
          {"x": rand(1, 3, 5, 5), "z": rand(1, 4, 5, 5)}, {"w": rand(4, 3, 3, 3)})


@pytest.mark.parametrize("act,attrs", [("Relu", {}), ("LeakyRelu", {"activation_alpha": 0.3}),
                                       ("Elu", {"activation_alpha": 0.5}), ("Tanh", {}),
                                       ("HardSigmoid", {"activation_alpha": 0.3, "activation_beta": 0.6}),
                                       ("Selu", {"activation_alpha": 1.5, "activation_gamma": 1.1}),
                                       ("ScaledTanh", {"activation_alpha": 0.9, "activation_beta": 1.3}),
                                       ("ThresholdedRelu", {"activation_alpha": 0.2}),
                                       ("ParametricSoftplus", {"activation_alpha": 0.7, "activation_beta": 1.8}),
                                       ("Softplus", {}), ("Softsign", {}), ("Sigmoid", {})])
def test_fused_gemm(act, attrs) -> None:
    check([node("FusedGemm", ["a", "b", "c"], activation=act, alpha=0.8, beta=1.2, transB=1, **attrs)],
          {"a": rand(3, 5)}, {"b": rand(4, 5), "c": rand(4)})


def test_fused_gemm_transposed_a_runtime_b() -> None:
    check([node("FusedGemm", ["a", "b"], activation="Relu", transA=1)], {"a": rand(5, 3), "b": rand(5, 4)})


@pytest.mark.parametrize("ta,tb,tba,tbb", [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (1, 1, 0, 0),
                                           (0, 0, 1, 0), (1, 0, 1, 0), (0, 0, 0, 1), (0, 1, 0, 1), (1, 1, 1, 1)])
def test_fused_matmul(ta, tb, tba, tbb) -> None:
    batch, m, k, n = (2, 3), 4, 5, 6

    def stored(rows, cols, trans, trans_batch):
        dims = [*batch, cols, rows] if trans else [*batch, rows, cols]
        if trans_batch:        # the axis before the last goes first
            dims = [dims[-2], *dims[:-2], dims[-1]]
        return rand(*dims)
    check([node("FusedMatMul", ["a", "b"], alpha=0.5, transA=ta, transB=tb, transBatchA=tba, transBatchB=tbb)],
          {"a": stored(m, k, ta, tba), "b": stored(k, n, tb, tbb)})


def test_fused_matmul_broadcast() -> None:
    check([node("FusedMatMul", ["a", "b"], alpha=1.5, transB=1)], {"a": rand(2, 3, 4, 5)}, {"b": rand(6, 5)})


# ---- GELU family, bias add -----------------------------------------------------------------------

def test_gelu_family() -> None:
    x = rand(2, 3, 8, scale=3.0)
    check([node("Gelu", ["x"], ["g"]), node("BiasGelu", ["x", "bias"], ["bg"]), node("FastGelu", ["x"], ["fg"]),
           node("FastGelu", ["x", "bias"], ["fgb"]), node("QuickGelu", ["x"], ["qg"]),
           node("QuickGelu", ["x"], ["qg2"], alpha=1.1)],
          {"x": x}, {"bias": rand(8)}, outputs=("g", "bg", "fg", "fgb", "qg", "qg2"))


def test_bias_add() -> None:
    """ONNX Runtime has BiasAdd on CUDA only: the reference is numpy's x + bias + skip."""
    feeds, bias = {"x": rand(2, 9, 8), "skip": rand(2, 9, 8)}, rand(8)
    got = kiln_run(_model([node("BiasAdd", ["x", "bias", "skip"])], feeds, {"bias": bias}, ["y"]), feeds)["y"]
    assert_fp32(got, (feeds["x"] + bias) + feeds["skip"], "y")


# ---- normalization -------------------------------------------------------------------------------

@pytest.mark.parametrize("skip_shape", [(2, 5, 16), (1, 5, 16), (5, 16)])
def test_skip_layer_norm(skip_shape) -> None:
    check([node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"], ["y", "", "", "sum"],
                epsilon=1e-5)],
          {"x": rand(2, 5, 16), "skip": rand(*skip_shape)}, {"gamma": rand(16), "beta": rand(16), "bias": rand(16)},
          outputs=("y", "sum"))


def test_skip_layer_norm_statistics() -> None:
    check([node("SkipLayerNormalization", ["x", "skip", "gamma"], ["y", "mean", "inv"])],
          {"x": rand(2, 3, 8) + 1.0, "skip": rand(2, 3, 8)}, {"gamma": rand(8)}, outputs=("y", "mean", "inv"))


def test_skip_simplified_layer_norm() -> None:
    check([node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma", "bias"], ["y", "", "inv", "sum"],
                epsilon=1e-6)],
          {"x": rand(2, 5, 16), "skip": rand(2, 5, 16)}, {"gamma": rand(16), "bias": rand(16)},
          outputs=("y", "inv", "sum"))


def test_simplified_and_contrib_layer_norm() -> None:
    """Both live in the default domain in ONNX Runtime; LayerNormalization here at opset 11 (< 17)."""
    feeds, inits = {"x": rand(2, 3, 16)}, {"g": rand(16), "b": rand(16)}
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["rms", "rms_inv"], epsilon=1e-6),
             helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], epsilon=1e-5)]
    m = _model(nodes, feeds, inits, ["rms", "rms_inv", "ln"])
    m.opset_import[0].version = 11
    ref, got = ort(m, feeds), kiln_run(m, feeds)
    for name in ("rms", "rms_inv", "ln"):
        assert_fp32(got[name], ref[name], name)


# ---- embeddings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("with_segment,with_pos_ids", [(True, False), (False, True)])
def test_embed_layer_norm(with_segment, with_pos_ids) -> None:
    b, s, h, vocab = 2, 6, 16, 30
    ids = RNG.integers(0, vocab, (b, s)).astype(np.int32)
    mask = np.ones((b, s), np.int32)
    mask[0, 4:] = 0
    mask[1, 2] = 0                       # a hole: mask_index counts the ones
    feeds = {"ids": ids, "mask": mask}
    inits = {"word": rand(vocab, h), "pos": rand(10, h), "gamma": rand(h), "beta": rand(h)}
    ins = ["ids", "", "word", "pos", "", "gamma", "beta", "mask"]
    if with_segment:
        feeds["seg"] = RNG.integers(0, 2, (b, s)).astype(np.int32)
        inits["segtab"] = rand(2, h)
        ins[1], ins[4] = "seg", "segtab"
    if with_pos_ids:
        feeds["pids"] = RNG.integers(0, 10, (b, s)).astype(np.int32)
        ins.append("pids")
    check([node("EmbedLayerNormalization", ins, ["y", "mask_index", "emb_sum"], epsilon=1e-12)], feeds, inits,
          outputs=("y", "mask_index", "emb_sum"))
