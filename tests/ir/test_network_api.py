"""Networks built by hand through the typed API, checked against numpy written here.

Each layer gets inputs with awkward values (negative numbers, asymmetric pads,
negative indices) so an attribute read the wrong way shows up as a wrong value.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.builder.shapes import infer_shapes
from kiln.errors import NetworkError, ShapeError
from kiln.ir import Tensor, verify

RNG = np.random.default_rng(0)


def rand(*shape: int, dtype=np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def run(net: kiln.Network, feeds: dict[str, np.ndarray], profiles=None) -> dict[str, np.ndarray]:
    return kiln.build(net, kiln.BuildConfig(device="cpu", profiles=profiles)).context().run(feeds)


def one_layer(add, x: np.ndarray, **inputs: np.ndarray) -> np.ndarray:
    """Network with input "x" (plus named inputs) and the one layer ``add(net, x, **tensors)`` as output."""
    net = kiln.Network("one")
    xt = net.add_input("x", x.dtype.name, x.shape)
    extra = {k: net.add_input(k, v.dtype.name, v.shape) for k, v in inputs.items()}
    net.mark_output(add(net, xt, **extra).output, "y")
    return run(net, {"x": x, **inputs})["y"]


def close(got: np.ndarray, ref: np.ndarray, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    assert got.shape == ref.shape, f"shape {got.shape} != {ref.shape}"
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


# ---- numpy references -----------------------------------------------------------------------

def np_conv2d(x, w, b, stride, pads, dilation, groups):
    n, c, h, wd = x.shape
    co, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (xp.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (xp.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, co, oh, ow), np.float64)
    per = co // groups
    for o in range(co):
        g = o // per
        for i in range(oh):
            for j in range(ow):
                hs, ws = i * stride[0], j * stride[1]
                patch = xp[:, g * cg:(g + 1) * cg, hs:hs + dilation[0] * (kh - 1) + 1:dilation[0],
                           ws:ws + dilation[1] * (kw - 1) + 1:dilation[1]]
                out[:, o, i, j] = (patch * w[o]).sum((1, 2, 3))
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out.astype(np.float32)


def np_deconv2d(x, w, b, stride, pads):
    n, ci, h, wd = x.shape
    _, co, kh, kw = w.shape
    full = np.zeros((n, co, (h - 1) * stride[0] + kh, (wd - 1) * stride[1] + kw), np.float64)
    for i in range(h):
        for j in range(wd):
            full[:, :, i * stride[0]:i * stride[0] + kh, j * stride[1]:j * stride[1] + kw] += \
                np.einsum("nc,cokl->nokl", x[:, :, i, j], w)
    out = full[:, :, pads[0]:full.shape[2] - pads[2], pads[1]:full.shape[3] - pads[3]]
    return (out + b.reshape(1, -1, 1, 1)).astype(np.float32)


def np_pool(x, kind, k, s, pads):
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=fill)
    ones = np.pad(np.ones_like(x), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh, ow = (xp.shape[2] - k[0]) // s[0] + 1, (xp.shape[3] - k[1]) // s[1] + 1
    out = np.zeros(x.shape[:2] + (oh, ow), np.float32)
    for i in range(oh):
        for j in range(ow):
            win = xp[:, :, i * s[0]:i * s[0] + k[0], j * s[1]:j * s[1] + k[1]]
            cnt = ones[:, :, i * s[0]:i * s[0] + k[0], j * s[1]:j * s[1] + k[1]].sum((2, 3))
            out[:, :, i, j] = win.max((2, 3)) if kind == "max" else win.sum((2, 3)) / cnt
    return out


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_lstm(x, W, R, B, H):
    """ONNX LSTM, one direction, gates i, o, f, c; returns Y [T, 1, N, H]."""
    T, N, _ = x.shape
    h, c = np.zeros((N, H)), np.zeros((N, H))
    ys = []
    for t in range(T):
        g = x[t] @ W[0].T + h @ R[0].T + B[0, :4 * H] + B[0, 4 * H:]
        i, o, f, cc = (g[:, k * H:(k + 1) * H] for k in range(4))
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(cc)
        h = sigmoid(o) * np.tanh(c)
        ys.append(h)
    return np.stack(ys)[:, None].astype(np.float32), h[None].astype(np.float32), c[None].astype(np.float32)


def np_gru(x, W, R, B, H):
    """ONNX GRU (linear_before_reset=0), one direction, gates z, r, h."""
    T, N, _ = x.shape
    h = np.zeros((N, H))
    wb, rb = B[0, :3 * H], B[0, 3 * H:]
    ys = []
    for t in range(T):
        xw = x[t] @ W[0].T + wb
        z = sigmoid(xw[:, :H] + h @ R[0, :H].T + rb[:H])
        r = sigmoid(xw[:, H:2 * H] + h @ R[0, H:2 * H].T + rb[H:2 * H])
        hh = np.tanh(xw[:, 2 * H:] + (r * h) @ R[0, 2 * H:].T + rb[2 * H:])
        h = (1 - z) * hh + z * h
        ys.append(h)
    return np.stack(ys)[:, None].astype(np.float32), h[None].astype(np.float32)


# ---- the classic layers ---------------------------------------------------------------------

def test_convolution_asymmetric_pads_stride_dilation_groups() -> None:
    x, w, b = rand(2, 4, 9, 8), rand(6, 2, 3, 2), rand(6)
    got = one_layer(lambda n, x: n.add_convolution(x, w, b, stride=(2, 1), pads=(1, 0, 2, 1), dilation=(1, 2),
                                                   groups=2), x)
    close(got, np_conv2d(x, w, b, (2, 1), (1, 0, 2, 1), (1, 2), 2), atol=1e-4)


def test_convolution_1d_and_3d_match_torch_functional() -> None:
    x1, w1 = rand(2, 3, 10), rand(4, 3, 3)
    close(one_layer(lambda n, x: n.add_convolution(x, w1, stride=(2,), pads=(1, 1)), x1),
          F.conv1d(torch.from_numpy(x1), torch.from_numpy(w1), stride=2, padding=1).numpy(), atol=1e-5)
    x3, w3, b3 = rand(1, 2, 4, 5, 6), rand(3, 2, 3, 3, 3), rand(3)
    close(one_layer(lambda n, x: n.add_convolution(x, w3, b3, pads=(1, 1, 1, 1, 1, 1)), x3),
          F.conv3d(torch.from_numpy(x3), torch.from_numpy(w3), torch.from_numpy(b3), padding=1).numpy(), atol=1e-4)


def test_deconvolution_with_pads() -> None:
    x, w, b = rand(2, 3, 4, 5), rand(3, 2, 3, 3), rand(2)
    got = one_layer(lambda n, x: n.add_deconvolution(x, w, b, stride=(2, 2), pads=(1, 0, 0, 1)), x)
    close(got, np_deconv2d(x, w, b, (2, 2), (1, 0, 0, 1)), atol=1e-4)


@pytest.mark.parametrize("kind,ref", [
    ("relu", lambda x: np.maximum(x, 0)),
    ("sigmoid", sigmoid),
    ("tanh", np.tanh),
    ("leaky_relu", lambda x: np.where(x > 0, x, 0.1 * x)),
    ("elu", lambda x: np.where(x > 0, x, 0.1 * (np.exp(x) - 1))),
    ("softplus", lambda x: np.log1p(np.exp(x))),
    ("softsign", lambda x: x / (1 + np.abs(x))),
    ("hard_sigmoid", lambda x: np.clip(0.1 * x + 0.3, 0, 1)),
    ("hard_swish", lambda x: x * np.clip(x / 6 + 0.5, 0, 1)),
    ("silu", lambda x: x * sigmoid(x)),
    ("gelu", lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))),
    ("clip", lambda x: np.clip(x, 0.1, 0.3)),
    ("selu", lambda x: 0.3 * np.where(x > 0, x, 0.1 * np.expm1(x))),
])
def test_activation(kind: str, ref) -> None:
    x = rand(3, 7) * 3
    alpha, beta = {"clip": (0.1, 0.3), "hard_sigmoid": (0.1, 0.3), "selu": (0.1, 0.3)}.get(kind, (0.1, 0.0))
    close(one_layer(lambda n, x: n.add_activation(x, kind, alpha=alpha, beta=beta), x),
          ref(x.astype(np.float64)).astype(np.float32))


@pytest.mark.parametrize("kind,k,s,pads", [("max", (3, 2), (2, 1), (1, 0, 1, 1)), ("average", (2, 3), (1, 2), (0, 1, 1, 0)),
                                           ("max", (2, 2), (2, 2), (0, 0, 0, 0))])
def test_pooling(kind: str, k, s, pads) -> None:
    x = rand(2, 3, 7, 6)
    got = one_layer(lambda n, x: n.add_pooling(x, kind, k, stride=s, pads=pads), x)
    close(got, np_pool(x, kind, k, s, pads))


def test_global_pooling() -> None:
    x = rand(2, 3, 5, 4)
    close(one_layer(lambda n, x: n.add_pooling(x, "average", None), x), x.mean((2, 3), keepdims=True))
    close(one_layer(lambda n, x: n.add_pooling(x, "max", None), x), x.max((2, 3), keepdims=True))


def test_fully_connected() -> None:
    x, w, b = rand(2, 5, 6), rand(4, 6), rand(4)
    close(one_layer(lambda n, x: n.add_fully_connected(x, w, b), x), x @ w.T + b)


@pytest.mark.parametrize("op,ref", [("sum", np.add), ("sub", np.subtract), ("prod", np.multiply),
                                    ("div", np.divide), ("max", np.maximum), ("min", np.minimum),
                                    ("pow", lambda a, b: np.abs(a) ** b)])
def test_elementwise_with_broadcasting(op: str, ref) -> None:
    x, c = rand(2, 3, 4), rand(3, 1) + 2.5
    if op == "pow":
        x = np.abs(x)
    close(one_layer(lambda n, x: n.add_elementwise(x, c, op), x), ref(x, c).astype(np.float32), rtol=1e-5)


def test_elementwise_comparison_gives_bool() -> None:
    x, y = rand(4, 3), rand(4, 3)
    got = one_layer(lambda n, x, b: n.add_elementwise(x, b, "greater"), x, b=y)
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, x > y)


def test_shuffle_transpose_reshape_transpose() -> None:
    x = rand(2, 3, 4, 5)
    got = one_layer(lambda n, x: n.add_shuffle(x, first_transpose=(0, 2, 1, 3), reshape=(0, 4, -1),
                                               second_transpose=(2, 0, 1)), x)
    close(got, x.transpose(0, 2, 1, 3).reshape(2, 4, 15).transpose(2, 0, 1))


@pytest.mark.parametrize("axis", [1, -1])
def test_softmax_and_log_softmax(axis: int) -> None:
    x = rand(2, 5, 3) * 4
    e = np.exp(x - x.max(axis, keepdims=True))
    sm = e / e.sum(axis, keepdims=True)
    close(one_layer(lambda n, x: n.add_softmax(x, axis), x), sm)
    close(one_layer(lambda n, x: n.add_softmax(x, axis, log=True), x), np.log(sm), atol=1e-5)


def test_concatenation() -> None:
    a, b, c = rand(2, 1, 3), rand(2, 4, 3), rand(2, 2, 3)
    got = one_layer(lambda n, x, b, c: n.add_concatenation([x, b, c], axis=-2), a, b=b, c=c)
    close(got, np.concatenate([a, b, c], 1))


def test_padding_modes() -> None:
    x = rand(1, 2, 3, 4)
    pads = (0, 0, 1, 2, 0, 0, 2, 1)
    np_pads = ((0, 0), (0, 0), (1, 2), (2, 1))
    close(one_layer(lambda n, x: n.add_padding(x, pads, "constant", 1.5), x), np.pad(x, np_pads, constant_values=1.5))
    close(one_layer(lambda n, x: n.add_padding(x, pads, "reflect"), x), np.pad(x, np_pads, mode="reflect"))
    close(one_layer(lambda n, x: n.add_padding(x, pads, "edge"), x), np.pad(x, np_pads, mode="edge"))


def test_flatten() -> None:
    x = rand(2, 3, 4, 5)
    close(one_layer(lambda n, x: n.add_flatten(x, 2), x), x.reshape(6, 20))
    close(one_layer(lambda n, x: n.add_flatten(x, 0), x), x.reshape(1, -1))


def test_lrn() -> None:
    x, size, alpha, beta, bias = rand(2, 7, 3, 3), 3, 1e-2, 0.75, 2.0
    sq = np.pad(x ** 2, ((0, 0), ((size - 1) // 2, size - 1 - (size - 1) // 2), (0, 0), (0, 0)))
    s = sum(sq[:, i:i + x.shape[1]] for i in range(size))
    close(one_layer(lambda n, x: n.add_lrn(x, size, alpha, beta, bias), x), x / (bias + alpha / size * s) ** beta)


def test_scale_per_channel_with_power() -> None:
    x = np.abs(rand(2, 3, 4, 4)) + 0.1
    s, t, p = np.array([0.5, 1.0, 2.0], np.float32), np.array([0.1, 0.2, 0.3], np.float32), \
        np.array([1.0, 2.0, 0.5], np.float32)
    c = lambda v: v.reshape(1, 3, 1, 1)     # noqa: E731
    close(one_layer(lambda n, x: n.add_scale(x, s, t, p), x), (x * c(s) + c(t)) ** c(p))


def test_squeeze_and_unsqueeze() -> None:
    x = rand(2, 1, 3, 1)
    close(one_layer(lambda n, x: n.add_squeeze(x, [1, -1]), x), x.reshape(2, 3))
    close(one_layer(lambda n, x: n.add_unsqueeze(x, [0, 5]), x), x.reshape(1, 2, 1, 3, 1, 1))


@pytest.mark.parametrize("op,ref", [("exp", np.exp), ("log", np.log), ("sqrt", np.sqrt), ("recip", np.reciprocal),
                                    ("abs", np.abs), ("neg", np.negative), ("sin", np.sin), ("floor", np.floor),
                                    ("erf", np.vectorize(math.erf)), ("sign", np.sign)])
def test_unary(op: str, ref) -> None:
    x = rand(3, 5) * 2
    if op in ("log", "sqrt"):
        x = np.abs(x) + 0.1
    close(one_layer(lambda n, x: n.add_unary(x, op), x), ref(x.astype(np.float64)).astype(np.float32))


def test_lstm_and_gru() -> None:
    T, N, I, H = 5, 2, 3, 4
    x = rand(T, N, I)
    W, R, B = rand(1, 4 * H, I), rand(1, 4 * H, H), rand(1, 8 * H)
    net = kiln.Network("lstm")
    xt = net.add_input("x", "float32", x.shape)
    layer = net.add_rnn(xt, W, R, B, cell="lstm", hidden_size=H)
    for t, name in zip(layer.outputs, ("Y", "Y_h", "Y_c")):
        net.mark_output(t, name)
    got = run(net, {"x": x})
    for name, ref in zip(("Y", "Y_h", "Y_c"), np_lstm(x.astype(np.float64), W, R, B, H)):
        close(got[name], ref)
    Wg, Rg, Bg = rand(1, 3 * H, I), rand(1, 3 * H, H), rand(1, 6 * H)
    net = kiln.Network("gru")
    xt = net.add_input("x", "float32", x.shape)
    layer = net.add_rnn(xt, Wg, Rg, Bg, cell="gru", hidden_size=H)
    net.mark_output(layer.outputs[0], "Y")
    net.mark_output(layer.outputs[1], "Y_h")
    got = run(net, {"x": x})
    ref_y, ref_h = np_gru(x.astype(np.float64), Wg, Rg, Bg, H)
    close(got["Y"], ref_y)
    close(got["Y_h"], ref_h)


# ---- what modern models need ----------------------------------------------------------------

def test_matmul_batched_broadcast_and_transposes() -> None:
    a, b = rand(2, 1, 3, 4), rand(3, 5, 4)
    close(one_layer(lambda n, x, b: n.add_matmul(x, b, transpose_b=True), a, b=b), a @ np.swapaxes(b, -1, -2),
          atol=1e-5)
    c, d = rand(4, 3), rand(4, 5)
    close(one_layer(lambda n, x: n.add_matmul(x, d, transpose_a=True), c), c.T @ d, atol=1e-5)


@pytest.mark.parametrize("op,ref", [("sum", np.sum), ("mean", np.mean), ("max", np.max), ("min", np.min),
                                    ("prod", np.prod), ("l2", lambda x, axis, keepdims: np.sqrt((x * x).sum(
                                        axis, keepdims=keepdims))),
                                    ("log_sum_exp", lambda x, axis, keepdims: np.log(np.exp(x).sum(
                                        axis, keepdims=keepdims)))])
def test_reduce(op: str, ref) -> None:
    x = rand(2, 3, 4)
    close(one_layer(lambda n, x: n.add_reduce(x, op, [0, -1], keepdims=True), x), ref(x, axis=(0, 2), keepdims=True))
    close(one_layer(lambda n, x: n.add_reduce(x, op, [1], keepdims=False), x), ref(x, axis=1, keepdims=False))


def test_gather_negative_and_nd_indices() -> None:
    x = rand(5, 3)
    idx = np.array([[0, -1], [2, -5]], np.int64)
    close(one_layer(lambda n, x: n.add_gather(x, idx, axis=0), x), x[idx % 5])
    close(one_layer(lambda n, x: n.add_gather(x, np.array(-1, np.int64), axis=1), x), x[:, -1])


def test_slice_with_steps_and_negative_bounds() -> None:
    x = rand(6, 7, 5)
    close(one_layer(lambda n, x: n.add_slice(x, [1, -1], [100, -8], axes=[0, 1], steps=[2, -2]), x),
          x[1::2, -1:-8:-2])
    close(one_layer(lambda n, x: n.add_slice(x, [-3], [2**62], axes=[2]), x), x[:, :, -3:])


def test_resize_nearest_and_linear() -> None:
    x = rand(1, 2, 3, 4)
    close(one_layer(lambda n, x: n.add_resize(x, scales=[1, 1, 2, 3]), x), x.repeat(2, 2).repeat(3, 3))
    got = one_layer(lambda n, x: n.add_resize(x, sizes=[1, 2, 5, 7], mode="linear",
                                              coordinate_transformation_mode="half_pixel"), x)
    ref = F.interpolate(torch.from_numpy(x), size=(5, 7), mode="bilinear", align_corners=False).numpy()
    close(got, ref)


def test_normalization_layer_instance_group() -> None:
    x, g, b = rand(2, 6, 5) * 3 + 1, rand(5), rand(5)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    close(one_layer(lambda n, x: n.add_normalization(x, g, b, type="layer", axis=-1, epsilon=1e-5), x),
          (x - mu) / np.sqrt(var + 1e-5) * g + b, atol=1e-5)
    xi, gi, bi = rand(2, 4, 3, 3), rand(4), rand(4)
    mu, var = xi.mean((2, 3), keepdims=True), xi.var((2, 3), keepdims=True)
    close(one_layer(lambda n, x: n.add_normalization(x, gi, bi, type="instance"), xi),
          (xi - mu) / np.sqrt(var + 1e-5) * gi.reshape(1, 4, 1, 1) + bi.reshape(1, 4, 1, 1), atol=1e-5)
    grp = xi.reshape(2, 2, -1)
    mu, var = grp.mean(-1, keepdims=True), grp.var(-1, keepdims=True)
    ref = ((grp - mu) / np.sqrt(var + 1e-5)).reshape(xi.shape) * gi.reshape(1, 4, 1, 1) + bi.reshape(1, 4, 1, 1)
    close(one_layer(lambda n, x: n.add_normalization(x, gi, bi, type="group", num_groups=2), xi), ref, atol=1e-5)


def test_cast() -> None:
    x = np.array([[-2.7, -0.5, 0.5, 2.7]], np.float32)
    got = one_layer(lambda n, x: n.add_cast(x, "int32"), x)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, x.astype(np.int32))
    got = one_layer(lambda n, x: n.add_cast(x, "float16"), x)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, x.astype(np.float16))


def test_topk_values_and_indices() -> None:
    x = np.array([[3, 1, 3, 2, 5], [0, 0, -1, 4, 4]], np.float32)
    for largest in (True, False):
        net = kiln.Network("topk")
        xt = net.add_input("x", "float32", x.shape)
        layer = net.add_topk(xt, 3, axis=-1, largest=largest)
        net.mark_output(layer.outputs[0], "v")
        net.mark_output(layer.outputs[1], "i")
        got = run(net, {"x": x})
        order = np.argsort(-x if largest else x, axis=-1, kind="stable")[:, :3]
        np.testing.assert_array_equal(got["i"], order)
        np.testing.assert_array_equal(got["v"], np.take_along_axis(x, order, -1))


def test_where() -> None:
    x, y = rand(3, 4), rand(4)
    got = one_layer(lambda n, x, b: n.add_where(n.add_elementwise(x, b, "greater").output, x, b), x, b=y)
    close(got, np.where(x > y, x, y))


def test_identity_output() -> None:
    x = rand(2, 3)
    close(one_layer(lambda n, x: n.add_identity(n.add_activation(x, "relu").output), x), np.maximum(x, 0))
    close(one_layer(lambda n, x: n.add_identity(x), x), x)       # an input straight through to an output


@pytest.mark.parametrize("cond", [True, False])
def test_if_with_constant_condition_is_inlined(cond: bool) -> None:
    x = rand(2, 3)
    net = kiln.Network("if")
    xt = net.add_input("x", "float32", x.shape)
    then_g, else_g = kiln.Network("then"), kiln.Network("else")
    then_g.mark_output(then_g.add_elementwise(xt, np.float32(2.0), "prod").output)
    else_g.mark_output(else_g.add_unary(xt, "neg").output)
    flag = net.add_constant(np.array(cond))
    layer = net.add_if(flag, then_g, else_g)
    net.mark_output(net.add_activation(layer.output, "relu").output, "y")
    engine = kiln.build(net, kiln.BuildConfig(device="cpu"))
    assert not [l for l in engine.layers if l["kind"] == "If"], "a constant If must be folded away"
    close(engine.context().run({"x": x})["y"], np.maximum(2 * x if cond else -x, 0))


def test_shape_arithmetic_reshape_from_shape() -> None:
    """Shape → Gather → Concat feeding a Shuffle's shape input, with a dynamic batch."""
    net = kiln.Network("shape")
    x = net.add_input("x", "float32", ("batch", 3, 4))
    shp = net.add_shape(x).output
    batch = net.add_gather(shp, np.array([0], np.int64)).output
    target = net.add_concatenation([batch, net.add_constant(np.array([-1], np.int64))], axis=0).output
    layer = net.add_layer("Shuffle", [x, target], {"first_transpose": None, "reshape": None,
                                                    "second_transpose": None, "allowzero": False})
    net.mark_output(layer.output, "y")
    engine = kiln.build(net, kiln.BuildConfig(device="cpu", profiles={"x": ((1, 3, 4), (2, 3, 4), (5, 3, 4))}))
    for b in (1, 5):
        xv = rand(b, 3, 4)
        close(engine.context().run({"x": xv})["y"], xv.reshape(b, 12))


def test_a_small_convnet_end_to_end() -> None:
    """conv → scale → relu → max pool → flatten → fc → softmax, against the numpy references above."""
    x, w, b = rand(2, 3, 8, 8), rand(4, 3, 3, 3), rand(4)
    s, t = np.array([1.5, 0.5, -1.0, 2.0], np.float32), rand(4)
    fw, fb = rand(5, 64), rand(5)
    net = kiln.Network("convnet")
    xt = net.add_input("x", "float32", ("batch", 3, 8, 8))
    y = net.add_convolution(xt, w, b, pads=(1, 1, 1, 1)).output
    y = net.add_scale(y, s, t).output
    y = net.add_activation(y, "relu").output
    y = net.add_pooling(y, "max", (2, 2)).output
    y = net.add_flatten(y).output
    y = net.add_fully_connected(y, fw, fb).output
    net.mark_output(net.add_softmax(y, -1).output, "probs")
    got = run(net, {"x": x}, profiles={"x": ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))})["probs"]
    r = np_conv2d(x, w, b, (1, 1), (1, 1, 1, 1), (1, 1), 1) * s.reshape(1, 4, 1, 1) + t.reshape(1, 4, 1, 1)
    r = np_pool(np.maximum(r, 0), "max", (2, 2), (2, 2), (0, 0, 0, 0)).reshape(2, -1) @ fw.T + fb
    e = np.exp(r - r.max(-1, keepdims=True))
    close(got, e / e.sum(-1, keepdims=True), atol=1e-5)


# ---- verification errors --------------------------------------------------------------------

def test_no_outputs() -> None:
    net = kiln.Network("empty")
    net.add_activation(net.add_input("x", "float32", (2,)), "relu")
    with pytest.raises(NetworkError) as info:
        verify(net)
    assert "'empty'" in str(info.value) and "no outputs" in str(info.value) and "mark_output" in str(info.value)
    with pytest.raises(NetworkError):
        kiln.build(net, kiln.BuildConfig(device="cpu"))


def test_cycle() -> None:
    net = kiln.Network("loop")
    x = net.add_input("x", "float32", (2,))
    a = net.add_elementwise(x, x, "sum", name="a")
    b = net.add_activation(a.output, "relu", name="b")
    a.set_input(1, b.output)            # a reads b, b reads a
    net.mark_output(b.output)
    with pytest.raises(NetworkError) as info:
        verify(net)
    msg = str(info.value)
    assert "cycle" in msg and ("'a'" in msg or "'b'" in msg), msg


def test_unknown_kind() -> None:
    net = kiln.Network("n")
    x = net.add_input("x", "float32", (2,))
    with pytest.raises(NetworkError) as info:
        net.add_layer("Frobnicate", [x], name="weird")
    msg = str(info.value)
    assert "'weird'" in msg and "'Frobnicate'" in msg and "Convolution" in msg and "Plugin" in msg, msg


def test_wrong_input_count() -> None:
    net = kiln.Network("n")
    x = net.add_input("x", "float32", (1, 1, 4, 4))
    with pytest.raises(NetworkError) as info:
        net.add_layer("Convolution", [x], name="conv1")
    msg = str(info.value)
    assert "'conv1'" in msg and "Convolution" in msg and "at least 2" in msg and "got 1" in msg, msg
    with pytest.raises(NetworkError) as info:
        net.add_layer("Activation", [x, x], name="act2")
    assert "at most 1" in str(info.value) and "got 2" in str(info.value)


def test_non_tensor_input() -> None:
    net = kiln.Network("n")
    with pytest.raises(NetworkError) as info:
        net.add_layer("Activation", [np.zeros(3)], {"type": "relu"}, name="act")
    assert "'act'" in str(info.value) and "ndarray" in str(info.value) and "add_constant" in str(info.value)


def test_duplicate_tensor_name() -> None:
    net = kiln.Network("n")
    net.add_input("x", "float32", (2,))
    with pytest.raises(NetworkError) as info:
        net.add_input("x", "float32", (3,))
    assert "'x'" in str(info.value) and "twice" in str(info.value)


def test_read_of_a_tensor_nothing_produces() -> None:
    net = kiln.Network("n")
    orphan = net._add_tensor(Tensor("orphan", "float32", (2,)))
    net.mark_output(net.add_activation(orphan, "relu", name="act").output)
    with pytest.raises(NetworkError) as info:
        verify(net)
    assert "'act'" in str(info.value) and "'orphan'" in str(info.value)


def test_incompatible_shapes_name_the_layer() -> None:
    net = kiln.Network("n")
    a, b = net.add_input("a", "float32", (2, 3)), net.add_input("b", "float32", (4, 5))
    net.mark_output(net.add_matmul(a, b, name="mm").output, "y")
    with pytest.raises(ShapeError) as info:
        run(net, {"a": rand(2, 3), "b": rand(4, 5)})
    assert "'mm'" in str(info.value) and "(2, 3)" in str(info.value) and "(4, 5)" in str(info.value)


# ---- symbolic shapes ------------------------------------------------------------------------

def test_symbolic_batch_propagates() -> None:
    net = kiln.Network("sym")
    x = net.add_input("x", "float32", ("batch", 3, 8, 8))
    c = net.add_convolution(x, rand(4, 3, 3, 3), pads=(1, 1, 1, 1), stride=(2, 2)).output
    p = net.add_pooling(c, "max", (2, 2)).output
    f = net.add_flatten(p).output
    y = net.add_fully_connected(f, rand(5, 16)).output
    t = net.add_shuffle(y, first_transpose=(1, 0)).output
    g = net.add_reduce(x, "mean", [2, 3], keepdims=False).output
    for v in (y, t, g):
        net.mark_output(v)
    infer_shapes(net)
    assert c.shape == ("batch", 4, 4, 4)
    assert p.shape == ("batch", 4, 2, 2)
    assert f.shape == ("batch", 16)
    assert y.shape == ("batch", 5)
    assert t.shape == (5, "batch")
    assert g.shape == ("batch", 3)
    engine = kiln.build(net, kiln.BuildConfig(device="cpu", profiles={"x": ((1, 3, 8, 8), (2, 3, 8, 8),
                                                                           (8, 3, 8, 8))}))
    assert [o["shape"] for o in engine.outputs] == [["batch", 5], [5, "batch"], ["batch", 3]]


def test_two_symbols_stay_apart_and_products_are_unknown() -> None:
    net = kiln.Network("sym2")
    x = net.add_input("x", "float32", ("batch", "seq", 8))
    y = net.add_fully_connected(x, rand(4, 8)).output
    z = net.add_shuffle(y, reshape=(-1, 4)).output
    tt = net.add_shuffle(y, first_transpose=(1, 0, 2)).output
    net.mark_output(z)
    net.mark_output(tt)
    infer_shapes(net)
    assert y.shape == ("batch", "seq", 4)
    assert tt.shape == ("seq", "batch", 4)
    assert z.shape == (None, 4)            # batch*seq is no single symbol


def test_one_registry_names_every_layer() -> None:
    """Generated layer names never repeat a name the network already has, whoever chose it: a name given
    by hand, one made for a kind (``Kind_<position>``) or one made for an ONNX node (``node/Kind_k``)."""
    net = kiln.Network("names")
    x = net.add_input("x", "float32", (2,))
    net.add_identity(x, name="Identity_1")              # taken by hand where the next generated one would go
    auto = net.add_identity(x)
    assert auto.name == "Identity_2"
    assert net.unique_layer_name("Relu", "conv1") == "conv1"
    assert net.unique_layer_name("Relu", "conv1") == "conv1/Relu_1"
    net.add_identity(x, name="conv2")
    assert net.unique_layer_name("Cast", "conv2") == "conv2/Cast_1"
    names = [layer.name for layer in net.layers]
    assert len(names) == len(set(names))
