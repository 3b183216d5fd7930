"""ONNX Runtime contrib ops (com.microsoft) against ONNX Runtime itself.

Each case is a small onnx.helper model (opset 17 + com.microsoft 1) run by ONNX Runtime on CPU with
graph optimizations off (so ORT runs the contrib kernel) and by Kiln on CPU. Float outputs must agree
within max|err| ≤ 1e-5 + 1e-4·max|ref|; quantized outputs exactly or within one step, as each test says.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import kiln
import kiln.onnx
from kiln.errors import ParseError

MS = "com.microsoft"
RNG = np.random.default_rng(0)


def _model(nodes, feeds: dict, inits: dict, outputs) -> onnx.ModelProto:
    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
           for k, v in feeds.items()]
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
    """Kiln on CPU; dynamic input dims are fixed to the feeds' shapes."""
    profiles = {k: (v.shape, v.shape, v.shape) for k, v in feeds.items()}
    engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu", profiles=profiles))
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
    assert got.shape == ref.shape and got.dtype == ref.dtype, \
        f"{what}: {got.dtype}{got.shape} vs ORT {ref.dtype}{ref.shape}"
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

@pytest.mark.parametrize("with_segment,with_pos_ids,with_mask", [(True, False, True), (False, True, True),
                                                                 (True, False, False)])
def test_embed_layer_norm(with_segment, with_pos_ids, with_mask) -> None:
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
    if not with_mask:
        del feeds["mask"]
        ins[7] = ""
    if with_pos_ids:
        feeds["pids"] = RNG.integers(0, 10, (b, s)).astype(np.int32)
        ins.append("pids")
    check([node("EmbedLayerNormalization", ins, ["y", "mask_index", "emb_sum"], epsilon=1e-12)], feeds, inits,
          outputs=("y", "mask_index", "emb_sum"))


# ---- attention -----------------------------------------------------------------------------------

def _lengths_mask(b: int, t: int, lengths) -> np.ndarray:
    m = np.zeros((b, t), np.int32)
    for i, n in enumerate(lengths):
        m[i, :n] = 1
    return m


@pytest.mark.parametrize("mask_kind", ["none", "raw2d", "raw3d", "lengths", "ends_starts", "all_masked_row"])
@pytest.mark.parametrize("unidirectional", [0, 1])
def test_attention_masks(mask_kind, unidirectional) -> None:
    b, s, hin, heads = 2, 5, 12, 3
    feeds = {"x": rand(b, s, hin)}
    inits = {"w": rand(hin, 3 * 12, scale=0.5), "bias": rand(3 * 12)}
    ins = ["x", "w", "bias"]
    if mask_kind != "none":
        feeds["mask"] = {"raw2d": _lengths_mask(b, s, [5, 3]),
                         "raw3d": (RNG.random((b, s, s)) > 0.3).astype(np.int32),
                         "lengths": np.asarray([4, 2], np.int32),
                         "ends_starts": np.asarray([5, 4, 1, 0], np.int32),
                         "all_masked_row": _lengths_mask(b, s, [5, 0])}[mask_kind]
        ins.append("mask")
    check([node("Attention", ins, num_heads=heads, unidirectional=unidirectional)], feeds, inits)


@pytest.mark.parametrize("with_past", [True, False])
def test_attention_past_or_bias_and_sizes(with_past) -> None:
    """A custom scale and mask value; past → present, or an attention bias and a different V width
    (qkv_hidden_sizes): ONNX Runtime takes past only without either."""
    b, s, p, hin, heads = 2, 3, 4, 8, 2
    t = p + s if with_past else s
    feeds = {"x": rand(b, s, hin), "mask": _lengths_mask(b, t, [t, t - 2])}
    ins, outs = ["x", "w", "bias", "mask"], ["y"]
    if with_past:
        feeds["past"] = rand(2, b, heads, p, 2)
        ins.append("past")
        outs.append("present")
    else:
        feeds["ab"] = rand(b, heads, s, t)
        ins += ["", "ab"]
    sizes = [4, 4, 4] if with_past else [4, 4, 6]
    inits = {"w": rand(hin, sum(sizes), scale=0.5), "bias": rand(sum(sizes))}
    check([node("Attention", ins, outs, num_heads=heads, qkv_hidden_sizes=sizes, scale=0.3,
                mask_filter_value=-500.0, unidirectional=1)], feeds, inits, outputs=outs)


@pytest.mark.parametrize("layout", ["separate", "bias", "bnsh_kv"])
def test_multi_head_attention(layout) -> None:
    b, s, t, heads, hd = 2, 3, 5, 2, 4
    d = heads * hd
    feeds = {"q": rand(b, s, d)}
    inits = {}
    if layout == "bnsh_kv":
        feeds["k"], feeds["v"] = rand(b, heads, t, hd), rand(b, heads, t, hd)
    else:
        feeds["k"], feeds["v"] = rand(b, t, d), rand(b, t, d)
    ins = ["q", "k", "v"]
    if layout == "bias":
        inits["pb"] = rand(3 * d)
        ins.append("pb")
    check([node("MultiHeadAttention", ins, num_heads=heads)], feeds, inits)


@pytest.mark.parametrize("packed", ["qkv", "kv"])
def test_multi_head_attention_packed(packed) -> None:
    """ONNX Runtime runs packed layouts on CUDA only: the reference is its CPU kernel on the unpacked tensors."""
    b, s, heads, hd = 2, 4, 2, 4
    q5 = rand(b, s, heads, 3, hd)
    q, k, v = (q5[:, :, :, i].reshape(b, s, heads * hd) for i in range(3))
    ref = ort(_model([node("MultiHeadAttention", ["q", "k", "v"], num_heads=heads)], {"q": q, "k": k, "v": v}, {},
                     ["y"]), {"q": q, "k": k, "v": v})["y"]
    if packed == "qkv":
        feeds, ins = {"q": q5}, ["q"]
    else:
        feeds, ins = {"q": q, "kv": np.ascontiguousarray(q5[:, :, :, 1:])}, ["q", "kv"]
    got = kiln_run(_model([node("MultiHeadAttention", ins, num_heads=heads)], feeds, {}, ["y"]), feeds)["y"]
    assert_fp32(got, ref, "y")


@pytest.mark.parametrize("mask", ["lengths", "raw2d", "raw3d"])
def test_multi_head_attention_mask_bias_past(mask) -> None:
    b, s, p, heads, hd = 2, 3, 2, 2, 4
    d = heads * hd
    t = p + s
    masks = {"lengths": np.asarray([5, 3], np.int32), "raw2d": _lengths_mask(b, t, [4, 5]),
             "raw3d": (RNG.random((b, s, t)) > 0.3).astype(np.int32)}
    feeds = {"q": rand(b, s, d), "k": rand(b, s, d), "v": rand(b, s, d), "mask": masks[mask],
             "ab": rand(1, heads, s, t), "pk": rand(b, heads, p, hd), "pv": rand(b, heads, p, hd)}
    check([node("MultiHeadAttention", ["q", "k", "v", "", "mask", "ab", "pk", "pv"], ["y", "present_k", "present_v"],
                num_heads=heads, unidirectional=1, scale=0.4)],
          feeds, outputs=("y", "present_k", "present_v"))


def _caches(max_len: int, half: int):
    inv = 1.0 / (10000 ** (np.arange(half) / half))
    ang = np.arange(max_len)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@pytest.mark.parametrize("layout,interleaved,rot_dim,pos_kind", [
    ("bsd", 0, 0, "2d"), ("bsd", 1, 0, "start"), ("bnsh", 0, 0, "2d"), ("bnsh", 1, 0, "start"),
    ("bsd", 0, 4, "2d"), ("bsd_infer_heads", 0, 0, "2d")])
def test_rotary_embedding(layout, interleaved, rot_dim, pos_kind) -> None:
    b, s, heads, hd = 2, 5, 3, 8
    x = rand(b, heads, s, hd) if layout == "bnsh" else rand(b, s, heads * hd)
    cos, sin = _caches(16, (rot_dim or hd) // 2)
    pos = RNG.integers(0, 16, (b, s)).astype(np.int64) if pos_kind == "2d" else np.asarray([3], np.int64)
    attrs = {"interleaved": interleaved}
    if layout != "bsd_infer_heads":
        attrs["num_heads"] = heads
    if rot_dim:
        attrs["rotary_embedding_dim"] = rot_dim
    check([node("RotaryEmbedding", ["x", "pos", "cos", "sin"], **attrs)], {"x": x, "pos": pos},
          {"cos": cos, "sin": sin})


@pytest.mark.parametrize("case", ["plain", "packed", "rotary", "rotary_interleaved", "window", "softcap", "padded"])
def test_group_query_attention_prefill(case) -> None:
    b, s, heads, kv_heads = 2, 6, 4, 2
    hd = 16 if case.startswith("rotary") else 8      # ONNX Runtime rotates heads of a multiple of 16
    q, k, v = rand(b, s, heads * hd), rand(b, s, kv_heads * hd), rand(b, s, kv_heads * hd)
    seqlens = np.full((b,), s - 1, np.int32)
    if case == "padded":
        seqlens[1] = 3                   # the second prompt has 4 tokens; its rows past them are unspecified
    feeds = {"seqlens_k": seqlens, "total": np.asarray(s, np.int32)}
    inits = {}
    attrs = {"num_heads": heads, "kv_num_heads": kv_heads}
    if case == "packed":
        feeds["q"] = np.concatenate([q, k, v], -1)
        ins = ["q", "", ""]
    else:
        feeds.update(q=q, k=k, v=v)
        ins = ["q", "k", "v"]
    ins += ["", "", "seqlens_k", "total"]
    if case.startswith("rotary"):
        inits["cos"], inits["sin"] = _caches(16, hd // 2)
        ins += ["cos", "sin"]
        attrs.update(do_rotary=1, rotary_interleaved=int(case == "rotary_interleaved"))
    if case == "window":
        attrs["local_window_size"] = 2
    if case == "softcap":
        attrs["softcap"] = 1.5
    nodes = [node("GroupQueryAttention", ins, ["y", "present_k", "present_v"], **attrs)]
    m = _model(nodes, feeds, inits, ["y", "present_k", "present_v"])
    ref, got = ort(m, feeds), kiln_run(m, feeds)
    rows = [slice(None), slice(None)] if case != "padded" else [slice(None), slice(0, 4)]
    for name in ("present_k", "present_v"):
        assert_fp32(got[name], ref[name], name)
    assert_fp32(got["y"][0], ref["y"][0], "y[0]")
    assert_fp32(got["y"][1, rows[1]], ref["y"][1, rows[1]], "y[1]")


def test_group_query_attention_decode_with_past() -> None:
    """One new token after a past of 5 (no shared buffer): keys concatenate, rotary positions continue."""
    b, p, heads, kv_heads, hd = 2, 5, 4, 2, 16
    feeds = {"q": rand(b, 1, heads * hd), "k": rand(b, 1, kv_heads * hd), "v": rand(b, 1, kv_heads * hd),
             "pk": rand(b, kv_heads, p, hd), "pv": rand(b, kv_heads, p, hd),
             "seqlens_k": np.full((b,), p, np.int32), "total": np.asarray(p + 1, np.int32)}
    cos, sin = _caches(16, hd // 2)
    check([node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens_k", "total", "cos", "sin"],
                ["y", "present_k", "present_v"], num_heads=heads, kv_num_heads=kv_heads, do_rotary=1)],
          feeds, {"cos": cos, "sin": sin}, outputs=("y", "present_k", "present_v"))


# ---- quantized -----------------------------------------------------------------------------------

def _q(dtype, *shape) -> np.ndarray:
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max + 1, shape).astype(dtype)


def _qparams(dtype, scale: float, zp: int) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(scale, np.float32), np.asarray(zp, dtype)


@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_binary(op, dtype) -> None:
    """Within one step of ONNX Runtime (its vectorized kernel may round a scaled sum differently)."""
    zp = 128 if dtype == np.uint8 else 0
    a_s, a_zp = _qparams(dtype, 0.05, zp + 3)
    b_s, b_zp = _qparams(dtype, 0.02, zp - 7)
    c_s, c_zp = _qparams(dtype, 0.07 if op == "QLinearAdd" else 0.4, zp + 1)
    inits = {"as": a_s, "az": a_zp, "bs": b_s, "bz": b_zp, "cs": c_s, "cz": c_zp}
    check([node(op, ["a", "as", "az", "b", "bs", "bz", "cs", "cz"])], {"a": _q(dtype, 2, 3, 64), "b": _q(dtype, 3, 64)},
          inits, lsb=1)


@pytest.mark.parametrize("op,attrs", [("QLinearSigmoid", {}), ("QLinearLeakyRelu", {"alpha": 0.15})])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_lookup_ops_every_value(op, attrs, dtype) -> None:
    """All 256 inputs; within one step (ONNX Runtime's table comes from its own sigmoid approximation)."""
    x = np.arange(256, dtype=np.int64).astype(np.uint8).view(dtype).reshape(4, 64)
    zp = 128 if dtype == np.uint8 else -5
    x_s, x_zp = _qparams(dtype, 0.06, zp)
    y_s, y_zp = _qparams(dtype, 1 / 250 if op == "QLinearSigmoid" else 0.04, 0 if dtype == np.uint8 else -128)
    check([node(op, ["x", "xs", "xz", "ys", "yz"], **attrs)], {"x": x},
          {"xs": x_s, "xz": x_zp, "ys": y_s, "yz": y_zp}, lsb=1)


@pytest.mark.parametrize("channels_last", [0, 1])
def test_qlinear_conv_contrib(channels_last) -> None:
    """Weights within ±60: ONNX Runtime's AVX2 u8·s8 kernel saturates int16 pair sums for full-range weights
    (its quantizer's reduce_range avoids them), so full-range weights have no exact reference on such CPUs."""
    x = _q(np.uint8, 1, 6, 7, 3) if channels_last else _q(np.uint8, 1, 3, 6, 7)
    inits = {"xs": np.float32(0.02), "xz": np.uint8(120),
             "w": RNG.integers(-60, 61, (4, 3, 3, 3)).astype(np.int8),
             "ws": np.asarray([0.01, 0.02, 0.015, 0.03], np.float32), "wz": np.zeros(4, np.int8),
             "ys": np.float32(0.1), "yz": np.uint8(100), "b": RNG.integers(-500, 500, 4).astype(np.int32)}
    check([node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], pads=[1, 1, 1, 1],
                channels_last=channels_last)], {"x": x}, inits, lsb=1)


def test_qlinear_binary_ties() -> None:
    """Scale ratios of 1/2 and 1/4 with odd zero points put many results exactly halfway between steps."""
    a, b = _q(np.uint8, 4, 64), _q(np.uint8, 4, 64)
    inits = {"as": np.float32(0.5), "az": np.uint8(129), "bs": np.float32(0.25), "bz": np.uint8(129),
             "cs": np.float32(1.0), "cz": np.uint8(127)}
    check([node("QLinearAdd", ["a", "as", "az", "b", "bs", "bz", "cs", "cz"], ["add"]),
           node("QLinearMul", ["a", "as", "az", "b", "bs", "bz", "cs", "cz"], ["mul"])], {"a": a, "b": b}, inits,
          outputs=("add", "mul"), lsb=1)


@pytest.mark.parametrize("channels_last", [0, 1])
def test_qlinear_global_average_pool(channels_last) -> None:
    x = _q(np.uint8, 2, 5, 4, 3) if channels_last else _q(np.uint8, 2, 3, 5, 4)
    check([node("QLinearGlobalAveragePool", ["x", "xs", "xz", "ys", "yz"], channels_last=channels_last)], {"x": x},
          {"xs": np.float32(0.05), "xz": np.uint8(131), "ys": np.float32(0.02), "yz": np.uint8(125)}, lsb=1)


def test_qlinear_concat() -> None:
    """The second input shares the output's quantization (copied); the others are requantized."""
    feeds = {"a": _q(np.uint8, 2, 3, 4), "b": _q(np.uint8, 2, 2, 4), "c": _q(np.uint8, 2, 1, 4)}
    inits = {"ys": np.float32(0.1), "yz": np.uint8(128), "as": np.float32(0.05), "az": np.uint8(120),
             "cs": np.float32(0.3), "cz": np.uint8(100)}
    check([node("QLinearConcat", ["ys", "yz", "a", "as", "az", "b", "ys", "yz", "c", "cs", "cz"], axis=1)], feeds,
          inits, lsb=1)


@pytest.mark.parametrize("quantized_out,trans", [(False, 0), (True, 0), (True, 1)])
def test_qgemm(quantized_out, trans) -> None:
    a = _q(np.uint8, 3, 16) if not trans else _q(np.uint8, 16, 3)
    b = RNG.integers(-60, 61, (16, 5) if not trans else (5, 16)).astype(np.int8)
    inits = {"as": np.float32(0.02), "az": np.uint8(128), "b": b,
             "bs": (RNG.random(5) * 0.02 + 0.01).astype(np.float32),
             "bz": np.zeros(5, np.int8), "c": RNG.integers(-2000, 2000, 5).astype(np.int32)}
    ins = ["a", "as", "az", "b", "bs", "bz", "c"]
    if quantized_out:
        inits.update(ys=np.float32(0.05), yz=np.uint8(130))
        ins += ["ys", "yz"]
    check([node("QGemm", ins, alpha=0.75, transA=trans, transB=trans)], {"a": a}, inits, lsb=1)


def test_matmul_integer_to_float_and_dynamic_quantize_matmul() -> None:
    a, x = _q(np.uint8, 2, 3, 16), rand(2, 3, 16)
    inits = {"b": RNG.integers(-60, 61, (16, 5)).astype(np.int8), "as": np.float32(0.03), "az": np.uint8(127),
             "bs": (RNG.random(5) * 0.02 + 0.01).astype(np.float32), "bz": np.zeros(5, np.int8), "bias": rand(5)}
    check([node("MatMulIntegerToFloat", ["a", "b", "as", "bs", "az", "bz", "bias"], ["y1"]),
           node("DynamicQuantizeMatMul", ["x", "b", "bs", "bz", "bias"], ["y2"])], {"a": a, "x": x}, inits,
          outputs=("y1", "y2"))


def _nbits_weights(n: int, k: int, bits: int, block: int, zp_kind: str):
    blocks = -(-k // block)
    packed = RNG.integers(0, 256, (n, blocks, block * bits // 8)).astype(np.uint8)
    scales = (RNG.random((n, blocks)) * 0.1 + 0.01).astype(np.float32)
    zps = None
    if zp_kind == "packed":
        zps = RNG.integers(0, 256, (n, -(-blocks * bits // 8))).astype(np.uint8)
    elif zp_kind == "float":
        zps = (RNG.random((n, blocks)) * (1 << bits)).astype(np.float32)
    return packed, scales, zps


@pytest.mark.parametrize("bits,k,zp_kind,with_bias", [(4, 64, "none", False), (4, 80, "packed", True),
                                                      (4, 48, "float", False), (8, 40, "packed", False),
                                                      (2, 64, "packed", True)])
def test_matmul_nbits(bits, k, zp_kind, with_bias) -> None:
    n, block = 24, 16
    packed, scales, zps = _nbits_weights(n, k, bits, block, zp_kind)
    inits = {"b": packed, "s": scales}
    ins = ["a", "b", "s", "z" if zps is not None else ""]
    if zps is not None:
        inits["z"] = zps
    if with_bias:
        inits["bias"] = rand(n)
        ins += ["", "bias"]
    check([node("MatMulNBits", ins, K=k, N=n, bits=bits, block_size=block)], {"a": rand(2, 3, k)}, inits)


# ---- DynamicQuantizeLSTM -------------------------------------------------------------------------

def _qlstm_inits(d: int, i: int, h: int, codes=np.int8, per_column: bool = False, peepholes: bool = False) -> dict:
    """W [d, i, 4h] and R [d, h, 4h] codes, a bias, per-direction (or per-column) scales and zero points. int8
    codes stay within ±64: ONNX Runtime's AVX2 u8s8 kernel (without VNNI) saturates pairs of larger products."""
    lo, hi = (-64, 65) if codes == np.int8 else (0, 256)
    shape = (d, 4 * h) if per_column else (d,)
    zp = np.zeros(shape, codes) if codes == np.int8 else np.full(shape, 128, codes)
    inits = {"W": RNG.integers(lo, hi, (d, i, 4 * h)).astype(codes), "R": RNG.integers(lo, hi, (d, h, 4 * h)).astype(codes),
             "B": rand(d, 8 * h, scale=0.1), "ws": (RNG.random(shape) * 0.02 + 0.005).astype(np.float32), "wz": zp,
             "rs": (RNG.random(shape) * 0.02 + 0.005).astype(np.float32), "rz": zp.copy()}
    if peepholes:
        inits["P"] = rand(d, 3 * h, scale=0.1)
    return inits


# (direction, batch, input size, initial states, sequence_lens, codes, per-column scales, peepholes, outputs, attrs)
_QLSTM = {
    "forward": ("forward", 3, 6, False, None, np.int8, False, False, ("y", "yh", "yc"), {}),
    "reverse_states_lengths": ("reverse", 2, 6, True, [3, 5], np.int8, False, False, ("y", "yh", "yc"), {}),
    "bidirectional_uint8_per_column_peepholes": ("bidirectional", 2, 6, False, [0, 4], np.uint8, True, True,
                                                 ("y", "yh", "yc"), {}),
    "bidirectional_states_clip_input_forget": ("bidirectional", 2, 6, True, None, np.int8, True, False,
                                               ("y", "yh", "yc"), {"clip": 0.8, "input_forget": 1}),
    "no_y_output_lengths": ("bidirectional", 3, 6, True, [2, 5, 1], np.int8, False, False, ("", "yh", "yc"), {}),
    "other_activations": ("forward", 2, 6, False, [4, 2], np.int8, False, False, ("y", "yh", "yc"),
                          {"activations": ["HardSigmoid", "Softsign", "Tanh"], "activation_alpha": [0.3],
                           "activation_beta": [0.4]}),
    "float64_products": ("reverse", 1, 600, False, None, np.uint8, False, False, ("y", "yh", "yc"), {}),
    "bidirectional_mixed_activations": ("bidirectional", 2, 6, True, [5, 3], np.int8, False, True, ("y", "yh", "yc"),
                                        {"activations": ["Sigmoid", "Tanh", "Tanh", "HardSigmoid", "Relu", "Softsign"],
                                         "clip": 2.0}),
}


@pytest.mark.parametrize("case", sorted(_QLSTM))
def test_dynamic_quantize_lstm(case) -> None:
    """Against ONNX Runtime: X and each step's hidden state quantized per product, every direction, with and
    without initial states and sequence_lens; float64_products has an input long enough that float32 products
    of the codes could round (the kernel switches to float64)."""
    direction, n, i, states, lengths, codes, per_column, peepholes, outs, attrs = _QLSTM[case]
    d, t, h = (2 if direction == "bidirectional" else 1), 5, 4
    inits = _qlstm_inits(d, i, h, codes, per_column, peepholes)
    if case == "float64_products":      # codes 0 or 255 around 128: column sums of |w - 128| pass 2**24 / 255
        inits["W"] = (RNG.integers(0, 2, inits["W"].shape) * 255).astype(np.uint8)
        inits["ws"] = inits["ws"] * 0.01
    feeds = {"x": rand(t, n, i)}
    ins = ["x", "W", "R", "B", "", "", "", "P" if peepholes else "", "ws", "wz", "rs", "rz"]
    if lengths is not None:
        feeds["sl"], ins[4] = np.asarray(lengths, np.int32), "sl"
    if states:
        feeds["h0"], feeds["c0"], ins[5], ins[6] = rand(d, n, h, scale=0.5), rand(d, n, h, scale=0.5), "h0", "c0"
    check([node("DynamicQuantizeLSTM", ins, outs, direction=direction, hidden_size=h, **attrs)], feeds, inits,
          outputs=tuple(o for o in outs if o))


@pytest.mark.parametrize("case", ["bidirectional_uint8_per_column_peepholes", "no_y_output_lengths"])
def test_dynamic_quantize_lstm_int8_products(case, monkeypatch) -> None:
    """The CPU's int8 products (taken for large weights) forced on small ones: still ONNX Runtime's results."""
    import kiln.kernels.rnn_quant as rq
    if not rq.int8_products_exact():
        pytest.skip("torch._int_mm is not exact on this CPU; the layer keeps float products")
    monkeypatch.setattr(rq, "INT8_MIN_BYTES", 0)
    test_dynamic_quantize_lstm(case)


def test_dynamic_quantize_lstm_gate_functions_are_onnx_runtimes() -> None:
    """The kernel's sigmoid and tanh against ONNX Runtime's Sigmoid and Tanh (the MLAS routines its LSTM calls):
    identical where ONNX Runtime runs its FMA3 kernels (AVX2 CPUs); elsewhere its SSE kernels round each multiply
    and add apart, within 5e-7 of the fused form (at most 2.1e-7 for sigmoid and 4.8e-7 for tanh on 220,000 values).
    torch's own functions differ in about half of these values, and one differing hidden state can move a
    quantized code in a long sequence."""
    import torch
    from kiln.kernels.rnn_quant import ort_logistic, ort_tanh
    x = np.concatenate([RNG.standard_normal(20000) * 4, RNG.uniform(-25, 25, 2000), [0.0, -0.0, 9.0, -18.0, 30.0]]
                       ).astype(np.float32)
    feeds = {"x": x}
    ref = ort(_model([helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Tanh", ["x"], ["t"])], feeds, {},
                     ["s", "t"]), feeds)
    exact = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    for fn, want in ((ort_logistic, ref["s"]), (ort_tanh, ref["t"])):
        got = fn(torch.from_numpy(x)).numpy()
        if exact:
            assert np.array_equal(got.view(np.int32), want.view(np.int32)), \
                f"{fn.__name__}: {int((got != want).sum())} values differ"
        else:
            assert np.abs(got.astype(np.float64) - want).max() <= 5e-7, fn.__name__


@pytest.mark.parametrize("wide", [False, True])
def test_matmul_integer_products_stay_exact(wide) -> None:
    """MatMulInteger against numpy's int64 product: wide=False runs in float32 (a 700-long sum of small codes),
    wide=True sums products near 255·255 past 2**24 (where float32 would round them), so float64."""
    from kiln.kernels.quantize import float32_exact
    import torch
    k, (az, bz) = 700, ((0, 0) if wide else (131, 128))
    a = RNG.integers(250 if wide else 0, 256, (3, k)).astype(np.uint8)
    b = (RNG.integers(0, 2, (k, 5)) * 255).astype(np.uint8) if wide else RNG.integers(100, 157, (k, 5)).astype(np.uint8)
    assert float32_exact(torch.from_numpy(b.astype(np.float64) - bz)) is not wide
    ref = check([helper.make_node("MatMulInteger", ["a", "b", "az", "bz"], ["y"])], {"a": a},
                {"b": b, "az": np.uint8(az), "bz": np.uint8(bz)})
    want = (a.astype(np.int64) - az) @ (b.astype(np.int64) - bz)
    np.testing.assert_array_equal(ref["y"], want)
    if wide:        # float32 products would not do here
        assert (((a.astype(np.float32) - az) @ (b.astype(np.float32) - bz)).astype(np.int64) != want).any()


@pytest.mark.parametrize("wide", [False, True])
def test_conv_integer_products_stay_exact(wide) -> None:
    """ConvInteger (grouped, strided, padded) against ONNX Runtime: float32 on the CPU where the weights allow it;
    wide=True sums products near 255·255 over 64 channels·3·3 past 2**24, so float64."""
    from kiln.kernels.quantize import float32_exact
    import torch
    if wide:
        x, xz = RNG.integers(250, 256, (1, 64, 5, 5)).astype(np.uint8), np.uint8(0)
        w, wz, attrs = (RNG.integers(0, 2, (3, 64, 3, 3)) * 255).astype(np.uint8), np.uint8(0), {}
    else:
        x, xz = RNG.integers(0, 256, (1, 4, 7, 7)).astype(np.uint8), np.uint8(119)
        w, wz = RNG.integers(-64, 65, (6, 2, 3, 3)).astype(np.int8), np.int8(3)
        attrs = {"group": 2, "pads": [1, 0, 2, 1], "strides": [2, 1]}
    assert float32_exact(torch.from_numpy(w.astype(np.float64) - wz), conv=True) is not wide
    check([helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], **attrs)], {"x": x},
          {"w": w, "xz": xz, "wz": wz})


def test_dynamic_quantize_lstm_float64_switch() -> None:
    """The codes' products run in float32 only where no partial sum can pass 2**24."""
    from kiln.kernels.rnn_quant import centered_weights
    import torch
    zp = torch.zeros(1, dtype=torch.int8)
    assert centered_weights(torch.full((1, 514, 8), -128, dtype=torch.int8), zp).dtype == torch.float32
    assert centered_weights(torch.full((1, 515, 8), -128, dtype=torch.int8), zp).dtype == torch.float64
    assert centered_weights(torch.full((1, 600, 8), 3, dtype=torch.uint8), torch.full((1,), 3, dtype=torch.uint8)
                            ).dtype == torch.float32


# ---- what Kiln refuses, in one line ---------------------------------------------------------------

_REFUSED = {
    "fused_conv_gelu": ([node("FusedConv", ["x", "w"], activation="Gelu")], {"x": rand(1, 2, 4, 4)},
                       {"w": rand(3, 2, 1, 1)}, "activation 'Gelu'"),
    "attention_rotary": ([node("Attention", ["x", "w"], num_heads=2, do_rotary=1)], {"x": rand(1, 3, 4)},
                         {"w": rand(4, 12)}, "do_rotary"),
    "attention_4d_mask": ([node("Attention", ["x", "w", "", "m"], num_heads=2)],
                          {"x": rand(1, 3, 4), "m": np.ones((1, 1, 3, 3), np.int32)}, {"w": rand(4, 12)}, "rank 4"),
    "mha_packed_bias": ([node("MultiHeadAttention", ["q", "", "", "b"], num_heads=2)], {"q": rand(1, 3, 2, 3, 2)},
                        {"b": rand(12)}, "packed QKV"),
    "gqa_quantized_cache": ([node("GroupQueryAttention", ["q", "k", "v", "", "", "sl", "t"], num_heads=2,
                                  kv_num_heads=1, k_quant_type="PER_TENSOR")],
                            {"q": rand(1, 3, 8), "k": rand(1, 3, 4), "v": rand(1, 3, 4),
                             "sl": np.asarray([2], np.int32), "t": np.asarray(3, np.int32)}, {}, "quantized KV cache"),
    "rotary_packed_batching": ([node("RotaryEmbedding", ["x", "p", "c", "s"], is_packed_batching=1)],
                               {"x": rand(1, 3, 8), "p": np.zeros((1, 3), np.int64)},
                               {"c": rand(8, 4), "s": rand(8, 4)}, "is_packed_batching"),
    "nbits_runtime_weights": ([node("MatMulNBits", ["a", "b", "s"], K=16, N=2, bits=4, block_size=16)],
                              {"a": rand(1, 16), "b": np.zeros((2, 1, 8), np.uint8)}, {"s": rand(2, 1)},
                              "run time"),
    "qlstm_onnx_weight_layout": ([node("DynamicQuantizeLSTM", ["x", "w", "r", "", "", "", "", "", "s", "z", "s", "z"],
                                       hidden_size=4)], {"x": rand(2, 1, 6)},
                                 {"w": np.zeros((1, 16, 6), np.int8), "r": np.zeros((1, 4, 16), np.int8),
                                  "s": np.ones(1, np.float32), "z": np.zeros(1, np.int8)}, "transposed"),
    "qlstm_missing_scale": ([node("DynamicQuantizeLSTM", ["x", "w", "r", "", "", "", "", "", "", "z", "s", "z"],
                                  hidden_size=4)], {"x": rand(2, 1, 6)},
                            {"w": np.zeros((1, 6, 16), np.int8), "r": np.zeros((1, 4, 16), np.int8),
                             "s": np.ones(1, np.float32), "z": np.zeros(1, np.int8)}, "no W_scale"),
    "qlstm_float_weights": ([node("DynamicQuantizeLSTM", ["x", "w", "r", "", "", "", "", "", "s", "z", "s", "z"],
                                  hidden_size=4)], {"x": rand(2, 1, 6)},
                            {"w": np.zeros((1, 6, 16), np.float32), "r": np.zeros((1, 4, 16), np.int8),
                             "s": np.ones(1, np.float32), "z": np.zeros(1, np.int8)}, "W of type float32"),
    "qlstm_varying_zero_points": ([node("DynamicQuantizeLSTM", ["x", "w", "r", "", "", "", "", "", "s", "z", "s", "z"],
                                        hidden_size=4)], {"x": rand(2, 1, 6)},
                                  {"w": np.zeros((1, 6, 16), np.uint8), "r": np.zeros((1, 4, 16), np.uint8),
                                   "s": np.ones((1, 16), np.float32), "z": np.arange(16, dtype=np.uint8).reshape(1, 16)},
                                  "zero points"),
    "qlinear_add_uint16": ([node("QLinearAdd", ["a", "s", "", "b", "s", "", "s"])],
                           {"a": np.zeros((2,), np.uint16), "b": np.zeros((2,), np.uint16)},
                           {"s": np.float32(1.0)}, "uint16"),
}


@pytest.mark.parametrize("case", sorted(_REFUSED))
def test_unsupported_features_are_one_line_errors(case) -> None:
    nodes, feeds, inits, phrase = _REFUSED[case]
    op = nodes[0].op_type
    with pytest.raises(ParseError) as info:
        kiln.onnx.parse(_model(nodes, feeds, inits, ["y"]))
    msg = str(info.value)
    assert "\n" not in msg and op in msg and MS in msg and phrase in msg, msg
