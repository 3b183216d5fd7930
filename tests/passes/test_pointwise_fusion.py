"""Pointwise fusion: element-wise chains become one Pointwise layer with the same values, and the
generated Triton kernel (through Triton's interpreter on the CPU) computes what the torch path does."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

import kiln


class _Decode(torch.nn.Module):
    """YOLO's box decode and a few activations with broadcast operands."""

    def forward(self, x, grid):
        y = x.sigmoid()
        xy = (y[..., :2] * 2 + grid) * 8.0
        wh = (y[..., 2:4] * 2) ** 2 * grid
        z = torch.nn.functional.hardswish(y[..., 4:] * 3.0 - 1.0).clamp(-0.5, 2.0)
        return torch.cat((xy, wh, z), -1)


def test_decode_chain_fuses_and_matches_onnxruntime():
    x, grid = torch.randn(2, 3, 5, 7, 9), torch.rand(1, 1, 5, 7, 2) * 4
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Decode().eval(), (x, grid), f, input_names=["x", "grid"], opset_version=17, dynamo=False)
    b = f.getvalue()
    engine = kiln.build(kiln.onnx.parse(b), kiln.BuildConfig(device="cpu", profiles={"x": tuple(x.shape),
                                                                                    "grid": tuple(grid.shape)}))
    fused = [layer for layer in engine.layers if layer["kind"] == "Pointwise"]
    assert len(fused) >= 2 and all(len(layer["attrs"]["program"]) >= 2 for layer in fused)
    got = engine.context().run({"x": x.numpy(), "grid": grid.numpy()})
    ref = ort.InferenceSession(b, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy(), "grid": grid.numpy()})
    np.testing.assert_allclose(list(got.values())[0], ref[0], rtol=1e-5, atol=1e-5)


PROGRAMS = [
    [{"op": "prod", "args": ["i0", 2.0]}, {"op": "sum", "args": ["v0", "i1"]}, {"op": "prod", "args": ["v1", 8.0]}],
    [{"op": "prod", "args": ["i0", 2.0]}, {"op": "pow", "args": ["v0", 2.0]}, {"op": "prod", "args": ["v1", "i1"]}],
    [{"op": "sub", "args": [1.0, "i0"]}, {"op": "max", "args": ["v0", "i1"]}, {"op": "exp", "args": ["v1"]}],
    [{"op": "gelu", "args": ["i0"], "alpha": 0.0, "beta": 0.0}, {"op": "tanh", "args": ["v0"], "alpha": 0.0,
                                                                 "beta": 0.0},
     {"op": "hard_sigmoid", "args": ["v1"], "alpha": 0.2, "beta": 0.5}, {"op": "div", "args": ["v2", "i1"]}],
    [{"op": "silu", "args": ["i0"], "alpha": 0.0, "beta": 0.0},
     {"op": "clip", "args": ["v0"], "alpha": -0.3, "beta": 0.4}, {"op": "min", "args": ["v1", 0.2]}],
]


@pytest.mark.parametrize("program", PROGRAMS)
def test_generated_triton_kernel_matches_torch(program, monkeypatch):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from kiln.kernels import KernelContext
    from kiln.kernels.pointwise_fused import make_pointwise_torch, run_triton
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(2, 3, 4, 5, device=dev)
    b = torch.rand(1, 3, 1, 5, device=dev) + 0.5              # broadcast along two axes
    ref = make_pointwise_torch({"program": program}, KernelContext())(a, b)[0]
    got = run_triton(program, [a, b], block=64)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    from kiln.codecache import cache_dir
    assert any(p.suffix == ".py" for p in cache_dir("kernels").iterdir())        # the per-user kernel cache
