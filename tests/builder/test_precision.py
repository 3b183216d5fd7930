"""FP16/BF16 builds: constants are narrowed without turning large finite values into infinities.

Runs on the CPU: the precision rewrite (casts at the edges, narrowed weights) is the same as on CUDA.
"""
from __future__ import annotations

import numpy as np
import pytest

import kiln

F32_MIN = np.finfo(np.float32).min


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _masked_softmax(fill: float, where: bool) -> kiln.Network:
    """softmax(scores + (1 - mask) * fill), or softmax(where(mask, scores, fill)): the two HF mask idioms."""
    net = kiln.Network("mask")
    s = net.add_input("scores", "float32", (2, 4))
    m = net.add_input("mask", "float32", (2, 4))
    if where:
        keep = net.add_elementwise(m, np.float32(0.5), "greater").output
        x = net.add_where(keep, s, np.float32(fill)).output
    else:
        inv = net.add_elementwise(np.float32(1.0), m, "sub").output
        x = net.add_elementwise(s, net.add_elementwise(inv, np.float32(fill), "prod").output, "sum").output
    net.mark_output(net.add_softmax(x, -1).output, "p")
    return net


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("fill,where", [(F32_MIN, False), (F32_MIN, True), (-np.inf, True), (-1e4, False)],
                         ids=["additive-f32min", "where-f32min", "where-inf", "additive-1e4"])
def test_mask_constants_survive_narrowing(precision: str, fill: float, where: bool) -> None:
    scores = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    masked = np.where(mask > 0.5, scores, -np.inf)
    engine = kiln.build(_masked_softmax(fill, where), kiln.BuildConfig(device="cpu", precision=precision))
    got = engine.context().run({"scores": scores, "mask": mask})["p"]
    assert np.isfinite(got).all(), got
    np.testing.assert_allclose(got, _softmax(masked), atol=1e-2 if precision == "bf16" else 2e-3)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_large_weights_saturate_and_infinities_stay(precision: str) -> None:
    net = kiln.Network("sat")
    x = net.add_input("x", "float32", (3,))
    big = np.array([1e38, -1e38, np.inf], np.float32)
    net.mark_output(net.add_elementwise(x, big, "min").output, "y")
    got = kiln.build(net, kiln.BuildConfig(device="cpu", precision=precision)).context().run(
        {"x": np.array([1.0, 2.0, 3.0], np.float32)})["y"]
    assert got[0] == 1.0 and np.isfinite(got[1]) and got[1] < -6e4 and got[2] == 3.0, got
