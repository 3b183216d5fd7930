"""Pointwise's torch tactic runs ``sqrt(a*a + b*b)`` (squares as pow(x, 2) or x*x, as silero_vad's and
akiki_vad's STFT magnitudes write it) as one ``torch.hypot`` where its squares and sum feed nothing else and
the inputs share one floating dtype; every other program runs step by step. Results against numpy in FP64."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

import kiln
import kiln.onnx
from kiln.kernels import KernelContext
from kiln.kernels.pointwise_fused import make_pointwise_torch

ort = pytest.importorskip("onnxruntime")

EPS = 2.0 ** -24
F32 = KernelContext(device="cpu", input_dtypes=("float32", "float32"))
POW = [{"op": "pow", "args": ["i0", 2.0]}, {"op": "pow", "args": ["i1", 2.0]}, {"op": "sum", "args": ["v0", "v1"]},
       {"op": "sqrt", "args": ["v2"]}]
PROD = [{"op": "prod", "args": ["i0", "i0"]}, {"op": "prod", "args": ["i1", "i1"]},
        {"op": "sum", "args": ["v0", "v1"]}, {"op": "sqrt", "args": ["v2"]}]


def _magnitude(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a64, b64 = a.double().numpy(), b.double().numpy()
    return np.sqrt(a64 * a64 + b64 * b64)


def _slices(seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary halves of an STFT-like [N, 2F, T] output read as strided [N, F, T] slices."""
    g = torch.Generator().manual_seed(seed)
    spec = (torch.randn(2, 5, 258, generator=g) * scale).transpose(1, 2)          # [2, 258, 5], strided
    return spec[:, :129], spec[:, 129:]


def _counting_hypot(monkeypatch) -> list:
    calls = []
    real = torch.hypot
    monkeypatch.setattr(torch, "hypot", lambda a, b: (calls.append(1), real(a, b))[1])
    return calls


@pytest.mark.parametrize("program", [POW, PROD], ids=["pow", "prod"])
def test_the_magnitude_is_one_hypot_within_fp32_rounding_of_fp64(monkeypatch, program):
    calls = _counting_hypot(monkeypatch)
    a, b = _slices()
    (got,) = make_pointwise_torch({"program": program}, F32)(a, b)
    assert calls == [1]
    ref = _magnitude(a, b)
    assert got.dtype == torch.float32 and got.shape == a.shape
    # hypot is correctly rounded to within 1 ulp; 2 ulp of the result is a safe bound on any libm
    assert (np.abs(got.double().numpy() - ref) <= 2 * EPS * ref + 1e-38).all()


def test_large_magnitudes_do_not_overflow_in_the_squares():
    a, b = _slices(1, scale=1e20)
    (got,) = make_pointwise_torch({"program": POW}, F32)(a, b)
    ref = _magnitude(a, b)
    assert np.isfinite(got.numpy()).all()
    assert (np.abs(got.double().numpy() - ref) <= 2 * EPS * ref).all()


def test_a_hypot_inside_a_longer_program_and_the_rest_step_by_step(monkeypatch):
    """relu(sqrt(x*x + y*y) - 1) * y: the hypot feeds later steps; y is read by a square and by the last step."""
    program = PROD + [{"op": "sub", "args": ["v3", 1.0]}, {"op": "relu", "args": ["v4"]},
                      {"op": "prod", "args": ["v5", "i1"]}]
    calls = _counting_hypot(monkeypatch)
    a, b = _slices(2)
    (got,) = make_pointwise_torch({"program": program}, F32)(a, b)
    assert calls == [1]
    ref = np.maximum(_magnitude(a, b) - 1, 0) * b.double().numpy()
    assert np.abs(got.double().numpy() - ref).max() <= 8 * EPS * (np.abs(ref).max() + 1)


@pytest.mark.parametrize("program,ctx,why", [
    (POW[:3] + [{"op": "sqrt", "args": ["v2"]}, {"op": "prod", "args": ["v3", "v0"]}], F32, "a square read again"),
    (POW[:2] + [{"op": "sum", "args": ["v0", "v1"]}, {"op": "sqrt", "args": ["v2"]},
                {"op": "sum", "args": ["v3", "v2"]}], F32, "the sum read again"),
    ([{"op": "pow", "args": ["i0", 3.0]}] + POW[1:], F32, "a cube"),
    ([{"op": "prod", "args": ["i0", "i1"]}] + POW[1:], F32, "a product of two inputs"),
    (POW, KernelContext(device="cpu", input_dtypes=("float32", "float64")), "mixed dtypes"),
    (POW, KernelContext(device="cpu"), "dtypes not known"),
])
def test_other_programs_run_step_by_step(monkeypatch, program, ctx, why):
    calls = _counting_hypot(monkeypatch)
    a, b = (t.abs() for t in _slices(3))          # a cube or a product under the root stays positive
    (got,) = make_pointwise_torch({"program": program}, ctx)(a, b)
    assert calls == [], why
    vals = []
    x = {"i0": a.double().numpy(), "i1": b.double().numpy()}
    ops = {"pow": np.power, "sum": np.add, "prod": np.multiply, "sqrt": np.sqrt}
    for s in program:
        args = [x[r] if isinstance(r, str) and r[0] == "i" else vals[int(r[1:])] if isinstance(r, str) else r
                for r in s["args"]]
        vals.append(ops[s["op"]](*args))
    ref = vals[-1]
    assert np.abs(got.double().numpy() - ref).max() <= 16 * EPS * np.abs(ref).max(), why


def test_integer_inputs_keep_the_step_by_step_result():
    ctx = KernelContext(device="cpu", input_dtypes=("int64", "int64"))
    a, b = torch.tensor([3, 5, 8]), torch.tensor([4, 12, 15])
    (got,) = make_pointwise_torch({"program": PROD}, ctx)(a, b)
    np.testing.assert_array_equal(got.numpy(), [5.0, 13.0, 17.0])


def test_an_engine_with_the_stft_magnitude_matches_onnxruntime():
    """Slice, Slice, Pow, Pow, Add, Sqrt as silero_vad writes it: one Pointwise layer on the CPU."""
    f = TensorProto.FLOAT
    two = helper.make_tensor("two", f, [], [2.0])
    nodes = [helper.make_node("Slice", ["s", "lo0", "hi0", "ax"], ["re"]),
             helper.make_node("Slice", ["s", "lo1", "hi1", "ax"], ["im"]),
             helper.make_node("Pow", ["re", "two"], ["re2"]), helper.make_node("Pow", ["im", "two"], ["im2"]),
             helper.make_node("Add", ["re2", "im2"], ["sq"]), helper.make_node("Sqrt", ["sq"], ["mag"])]
    ints = [helper.make_tensor(n, TensorProto.INT64, [1], [v])
            for n, v in (("lo0", 0), ("hi0", 9), ("lo1", 9), ("hi1", 18), ("ax", 1))]
    graph = helper.make_graph(nodes, "mag", [helper.make_tensor_value_info("s", f, [2, 18, 5])],
                              [helper.make_tensor_value_info("mag", f, [2, 9, 5])], [two] + ints)
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))
    assert [layer["kind"] for layer in engine.layers].count("Pointwise") == 1
    s = np.random.default_rng(0).standard_normal((2, 18, 5)).astype(np.float32)
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"s": s})[0]
    got = engine.context(threads=1).run({"s": s})["mag"]
    assert np.abs(got - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()
