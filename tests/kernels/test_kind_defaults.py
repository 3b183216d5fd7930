"""Kernels assume the schema's one default for an attribute a layer leaves out (kiln.ir.layers):
a fused activation without alpha/beta behaves as an Activation layer without them, and an Attention
layer without a scale scales by 1/sqrt(head size) in every tactic. References are numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.ir.layers import attr_default
from kiln.kernels import KernelContext


def _conv_numpy(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A stride-1, unpadded 2-D convolution in float64."""
    n, c, h, wd = x.shape
    co, _, kh, kw = w.shape
    out = np.zeros((n, co, h - kh + 1, wd - kw + 1))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nchw,oc->nohw", x[:, :, i:i + out.shape[2], j:j + out.shape[3]], w[:, :, i, j])
    return out


def _act_numpy(name: str, y: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    if name == "leaky_relu":
        return np.where(y >= 0, y, alpha * y)
    return np.clip(alpha * y + beta, 0.0, 1.0)            # hard_sigmoid


@pytest.mark.parametrize("act", ["leaky_relu", "hard_sigmoid"])
@pytest.mark.parametrize("given", [None, (0.3, 0.4)], ids=["defaults", "given"])
def test_fused_activation_takes_the_schema_defaults(act: str, given) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    net = kiln.Network("fused")
    inp = net.add_input("x", "float32", x.shape)
    attrs = {"stride": [1, 1], "pads": [0, 0, 0, 0], "dilation": [1, 1], "activation": act}
    if given is not None:
        attrs.update(alpha=given[0], beta=given[1])
    conv = net.add_layer("Convolution", [inp, net.add_constant(w)], attrs)
    net.mark_output(conv.output, "y")
    got = kiln.build(net, kiln.BuildConfig(device="cpu")).context().run({"x": x})["y"]
    alpha, beta = given or (attr_default("Convolution", "alpha"), attr_default("Convolution", "beta"))
    assert (alpha, beta) == (given or (0.0, 0.0))
    want = _act_numpy(act, _conv_numpy(x.astype(np.float64), w.astype(np.float64)), alpha, beta)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _attention_numpy(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    s = q @ np.swapaxes(k, -1, -2) * scale
    e = np.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("tactic", ["sdpa", "matmul_softmax"])
@pytest.mark.parametrize("attrs", [{}, {"scale": None}, {"scale": 0.5}], ids=["absent", "none", "given"])
def test_attention_scale_default_is_the_same_in_every_tactic(tactic: str, attrs: dict) -> None:
    from kiln.kernels.registry import get_tactic
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 2, 5, 16)) for _ in range(3))
    make = get_tactic("Attention", tactic).make
    got = make(dict(attrs), KernelContext(device="cpu", precision="fp32", layer_name="att"))(
        *(torch.from_numpy(t) for t in (q, k, v)))[0].numpy()
    scale = attrs.get("scale") or 16 ** -0.5
    np.testing.assert_allclose(got, _attention_numpy(q, k, v, scale), rtol=1e-10, atol=1e-12)
