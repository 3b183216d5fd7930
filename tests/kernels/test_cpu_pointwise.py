"""The CPU Pointwise tactic ``inplace`` (kernels/cpu_pointwise.py): bit for bit the torch tactic's results on
programs over every op, intermediates written in place only where they die (inputs never written, a value read
later kept, a broadcast that grows the value run out of place), numpy references, and a fused model with the
tactic forced against ONNX Runtime."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

import kiln
import kiln.onnx
from kiln.ir.pointwise import OPS
from kiln.kernels.cpu_pointwise import make_pointwise_inplace
from kiln.kernels.pointwise_fused import make_pointwise_torch
from kiln.kernels.registry import TACTICS, KernelContext


def _ctx(n: int) -> KernelContext:
    return KernelContext(device="cpu", input_dtypes=("float32",) * n)


def _both(program: list[dict], xs: list[torch.Tensor]) -> torch.Tensor:
    """The inplace tactic's result, checked equal to the torch tactic's, with the inputs left as they were."""
    kept = [x.clone() for x in xs]
    want = make_pointwise_torch({"program": program}, _ctx(len(xs)))(*xs)[0]
    got = make_pointwise_inplace({"program": program}, _ctx(len(xs)))(*xs)[0]
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    for x, k in zip(xs, kept):
        torch.testing.assert_close(x, k, rtol=0, atol=0)
    return got


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_on_a_dying_intermediate(op):
    """exp(i0) (an intermediate), then op on it (in place where it has an in-place form), then a last step."""
    g = torch.Generator().manual_seed(len(op))
    xs = [torch.rand(3, 5, generator=g) * 0.5 + 0.1, torch.rand(3, 5, generator=g) + 0.5]
    args = ["v0", "i1"] if OPS[op] == 2 else ["v0"]
    program = [{"op": "exp", "args": ["i0"]}, {"op": op, "args": args, "alpha": 0.2, "beta": 0.7},
               {"op": "sum", "args": ["v1", 0.25]}]
    _both(program, xs)
    if OPS[op] == 2:                                        # a literal second operand
        _both([{"op": "exp", "args": ["i0"]}, {"op": op, "args": ["v0", 1.5]}], xs[:1])


def test_a_value_read_later_is_not_overwritten():
    x = torch.linspace(-2, 2, 12).reshape(3, 4)
    program = [{"op": "exp", "args": ["i0"]}, {"op": "sum", "args": ["v0", 1.0]},      # v0 read again below
               {"op": "prod", "args": ["v0", "v1"]}, {"op": "tanh", "args": ["v2"]}, {"op": "prod", "args": ["v3", "v3"]}]
    got = _both(program, [x])
    e = np.exp(x.double().numpy())
    np.testing.assert_allclose(got.numpy(), np.tanh(e * (e + 1)) ** 2, rtol=1e-5, atol=1e-6)


def test_broadcasts_that_grow_the_value_and_type_promotion_run_out_of_place():
    row, full = torch.rand(1, 4) + 0.5, torch.rand(3, 4) + 0.5
    grow = [{"op": "sqrt", "args": ["i0"]}, {"op": "sum", "args": ["v0", "i1"]}, {"op": "neg", "args": ["v1"]}]
    got = _both(grow, [row, full])
    np.testing.assert_allclose(got.numpy(), -(np.sqrt(row.double().numpy()) + full.double().numpy()), rtol=1e-6)
    ints = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    promote = [{"op": "abs", "args": ["i0"]}, {"op": "prod", "args": ["v0", 0.5]}]     # int32 * float -> float32
    got = make_pointwise_inplace({"program": promote}, _ctx(1))(ints)[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ints.abs() * 0.5, rtol=0, atol=0)


def test_silero_and_magika_programs():
    g = torch.Generator().manual_seed(3)
    stft = [{"op": "pow", "args": ["i0", 2.0]}, {"op": "pow", "args": ["i1", 2.0]}, {"op": "sum", "args": ["v0", "v1"]},
            {"op": "sqrt", "args": ["v2"]}]
    a, b = torch.randn(2, 129, 4, generator=g), torch.randn(2, 129, 4, generator=g)
    np.testing.assert_allclose(_both(stft, [a, b]).numpy(), np.hypot(a.double().numpy(), b.double().numpy()),
                               rtol=1e-6)
    bias_gelu = [{"op": "sum", "args": ["i0", "i1"]}, {"op": "gelu_tanh", "args": ["v0"]}]
    x, bias = torch.randn(1, 64, 50, generator=g), torch.randn(1, 64, 1, generator=g)
    s = x.double().numpy() + bias.double().numpy()
    ref = 0.5 * s * (1 + np.tanh(np.sqrt(2 / np.pi) * (s + 0.044715 * s ** 3)))
    np.testing.assert_allclose(_both(bias_gelu, [x, bias]).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_fused_model_on_inplace_matches_onnxruntime(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    mine = next(t for t in TACTICS["Pointwise"] if t.name == "inplace")
    rest = [dataclasses.replace(t, supports=lambda attrs, ctx: ctx.device != "cpu") for t in TACTICS["Pointwise"]
            if t.name != "inplace"]
    monkeypatch.setitem(TACTICS, "Pointwise", [mine] + rest)
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Add", ["x", "b"], ["s"]), helper.make_node("Tanh", ["s"], ["t"]),
             helper.make_node("Mul", ["t", "s"], ["m"]), helper.make_node("Sqrt", ["b"], ["r"]),
             helper.make_node("Sub", ["m", "r"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "pw", [vi("x", TensorProto.FLOAT, [2, 8, 16]),
                                                               vi("b", TensorProto.FLOAT, [1, 8, 1])],
                                                [vi("y", TensorProto.FLOAT, [2, 8, 16])]),
                              opset_imports=[helper.make_opsetid("", 17)])
    data = model.SerializeToString()
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))
    assert "inplace" in [layer.get("tactic") for layer in engine.layers if layer["kind"] == "Pointwise"]
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 8, 16)).astype(np.float32),
             "b": rng.random((1, 8, 1)).astype(np.float32) + 0.1}
    got = engine.context(threads=1).run(feeds)["y"]
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.abs(got - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()
