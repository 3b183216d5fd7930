"""The CPU Padding tactic ``gather`` (kernels/cpu_pad.py): reflect, edge and wrap padding, with negative pads and
axes, against numpy's np.pad; the index made once per input shape and pads tensor; a model with it forced
against ONNX Runtime. The ``torch`` tactic's constant mode (kernels/conv.py) against np.pad, its geometry kept per
input shape, pads and axes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.kernels import conv, cpu_pad
from kiln.kernels.registry import TACTICS, KernelContext, tactics_for

CPU = KernelContext(device="cpu", precision="fp32", layer_name="pad")
NP_MODE = {"reflect": "reflect", "edge": "edge", "wrap": "wrap"}


def _np_pad(x: np.ndarray, begins: list[int], ends: list[int], mode: str) -> np.ndarray:
    """ONNX Pad by numpy: crop the negative pads, then np.pad with the positive ones."""
    crop = tuple(slice(max(0, -b), x.shape[i] - max(0, -e)) for i, (b, e) in enumerate(zip(begins, ends)))
    return np.pad(x[crop], [(max(0, b), max(0, e)) for b, e in zip(begins, ends)], mode=NP_MODE[mode])


# (shape, pads as ONNX lists them, axes or None)
CASES = [((2, 576), [0, 128, 0, 128], None), ((2, 3, 5, 6), [0, 0, 2, 1, 0, 0, 1, 3], None),
         ((1, 4, 7), [2, -1, 3, 2], [1, 2]), ((3, 5), [-1, 2, 1, -2], None), ((4, 6), [1, 2], [-1])]


@pytest.mark.parametrize("mode", list(NP_MODE))
@pytest.mark.parametrize("shape,pads,axes", CASES)
def test_matches_numpy(mode, shape, pads, axes):
    g = torch.Generator().manual_seed(len(shape) + sum(pads))
    x = torch.randn(shape, generator=g)
    rank = len(shape)
    ax = [a % rank for a in axes] if axes is not None else list(range(rank))
    begins, ends = [0] * rank, [0] * rank
    for i, a in enumerate(ax):
        begins[a], ends[a] = pads[i], pads[i + len(ax)]
    want = _np_pad(x.numpy(), begins, ends, mode)
    run = cpu_pad.make_padding_gather({"mode": mode}, CPU)
    p, a = torch.tensor(pads), (torch.tensor(axes) if axes is not None else None)
    for x_in in (x, x.t().contiguous().t() if x.dim() == 2 else x[..., :]):      # any layout of the input
        for _ in range(2):                                                          # made, then kept
            got = run(x_in, p, None, a)[0]
            np.testing.assert_array_equal(got.numpy(), want)
    assert run(x.to("meta"), p, None, a)[0].shape == want.shape


def test_the_index_is_made_once_per_shape_and_pads(monkeypatch):
    made = []
    real = cpu_pad.make_padding

    def counting(attrs, ctx):
        fn = real(attrs, ctx)
        return lambda *args: (made.append(tuple(args[0].shape)), fn(*args))[1]
    monkeypatch.setattr(cpu_pad, "make_padding", counting)
    run = cpu_pad.make_padding_gather({"mode": "reflect"}, CPU)
    pads = torch.tensor([0, 1, 0, 2])
    for n in (5, 5, 7, 5, 7):
        x = torch.randn(2, n)
        np.testing.assert_array_equal(run(x, pads)[0].numpy(), np.pad(x.numpy(), [(0, 0), (1, 2)], "reflect"))
    assert made == [(2, 5), (2, 7)]
    x = torch.randn(2, 5)
    other = torch.tensor([0, 2, 0, 1])      # another pads tensor: its own index
    np.testing.assert_array_equal(run(x, other)[0].numpy(), np.pad(x.numpy(), [(0, 0), (2, 1)], "reflect"))
    assert made == [(2, 5), (2, 7), (2, 5)]


def test_offered_for_cpu_reflect_edge_wrap_only():
    names = lambda attrs, ctx: [t.name for t in tactics_for("Padding", attrs, ctx)]     # noqa: E731
    assert names({"mode": "reflect"}, CPU) == ["torch", "gather"]
    assert names({"mode": "constant"}, CPU) == ["torch"]
    assert "gather" not in names({"mode": "edge"}, dataclasses.replace(CPU, device="cuda"))


def test_model_on_gather_matches_onnxruntime(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    gather = next(t for t in TACTICS["Padding"] if t.name == "gather")
    torch_t = next(t for t in TACTICS["Padding"] if t.name == "torch")
    rest = dataclasses.replace(torch_t, supports=lambda attrs, ctx: not gather.supports(attrs, ctx))
    monkeypatch.setitem(TACTICS, "Padding", [gather, rest])         # gather wherever it is offered
    nodes = [helper.make_node("Pad", ["x", "p1"], ["a"], mode="reflect"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Pad", ["r", "p2"], ["y"], mode="edge")]
    inits = [numpy_helper.from_array(np.array([0, 0, 3, 0, 0, 2], np.int64), "p1"),
             numpy_helper.from_array(np.array([0, 1, 1, 0, 2, -1], np.int64), "p2")]
    vi = helper.make_tensor_value_info
    model = helper.make_model(helper.make_graph(nodes, "pads", [vi("x", TensorProto.FLOAT, [1, 2, "t"])],
                                                [vi("y", TensorProto.FLOAT, None)], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    data = model.SerializeToString()
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu", optimization_level=0, profiles={
        "x": ((1, 2, 4), (1, 2, 16), (1, 2, 32))}))
    assert [layer.get("tactic") for layer in engine.layers if layer["kind"] == "Padding"] == ["gather"] * 2
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    ctx = engine.context(threads=1)
    for t in (16, 5, 16, 32):
        x = np.random.default_rng(t).standard_normal((1, 2, t)).astype(np.float32)
        np.testing.assert_array_equal(next(iter(ctx.run({"x": x}).values())), sess.run(None, {"x": x})[0])


# ---- constant mode: the torch tactic, its geometry kept per (input shape, pads, axes) ------------------------------

def _np_constant(x: np.ndarray, pads: list[int], axes: list[int] | None, value: float) -> np.ndarray:
    rank = x.ndim
    ax = [a % rank for a in axes] if axes is not None else list(range(rank))
    begins, ends = [0] * rank, [0] * rank
    for i, a in enumerate(ax):
        begins[a], ends[a] = pads[i], pads[i + len(ax)]
    crop = tuple(slice(max(0, -b), x.shape[i] - max(0, -e)) for i, (b, e) in enumerate(zip(begins, ends)))
    return np.pad(x[crop], [(max(0, b), max(0, e)) for b, e in zip(begins, ends)], constant_values=value)


@pytest.mark.parametrize("shape,pads,axes", CASES + [((2, 3), [0, 0, 0, 0], None), ((2, 3), [0, -1, 0, 0], None)])
def test_constant_matches_numpy(shape, pads, axes):
    """Tensor pads and axes, a value tensor or none, static pads from attrs; twice each (made, then kept), on two
    input layouts, and on meta tensors."""
    g = torch.Generator().manual_seed(len(shape) + sum(pads))
    x = torch.randn(shape, generator=g)
    p, a = torch.tensor(pads), (torch.tensor(axes) if axes is not None else None)
    with_tensors = conv.make_padding({"mode": "constant"}, CPU)
    from_attrs = conv.make_padding({"mode": "constant", "pads": pads, "value": -2.5}, CPU)
    for x_in in (x, x.t().contiguous().t() if x.dim() == 2 else x[..., :]):
        for _ in range(2):
            np.testing.assert_array_equal(with_tensors(x_in, p, None, a)[0].numpy(), _np_constant(x.numpy(), pads,
                                                                                                 axes, 0.0))
            np.testing.assert_array_equal(with_tensors(x_in, p, torch.tensor([1.5]), a)[0].numpy(),
                                          _np_constant(x.numpy(), pads, axes, 1.5))
            if axes is None:
                np.testing.assert_array_equal(from_attrs(x_in)[0].numpy(), _np_constant(x.numpy(), pads, None, -2.5))
    want = _np_constant(x.numpy(), pads, axes, 0.0)
    assert with_tensors(x.to("meta"), p, None, a)[0].shape == want.shape
    out = with_tensors(x, p, None, a)[0]
    if out.shape == x.shape:
        assert out.data_ptr() != x.data_ptr()       # a copy, never the input itself


def test_constant_geometry_is_kept_per_shape_pads_and_axes(monkeypatch):
    """The pads are worked out once per (input shape, pads values, axes); other values, shapes and more than
    MAX_PAD_PLANS geometries still pad as numpy does."""
    made = []
    real = conv._torch_pad
    monkeypatch.setattr(conv, "_torch_pad", lambda b, e: (made.append(1), real(b, e))[1])
    run = conv.make_padding({"mode": "constant"}, CPU)
    pads = torch.tensor([0, 1, 0, 2])
    for n in (5, 5, 7, 5, 7):
        x = torch.randn(2, n)
        np.testing.assert_array_equal(run(x, pads)[0].numpy(), np.pad(x.numpy(), [(0, 0), (1, 2)]))
    assert len(made) == 2
    x = torch.randn(2, 5)
    np.testing.assert_array_equal(run(x, torch.tensor([0, 2, 0, 1]))[0].numpy(), np.pad(x.numpy(), [(0, 0), (2, 1)]))
    np.testing.assert_array_equal(run(x, torch.tensor([1, 2]), None, torch.tensor([0]))[0].numpy(),
                                  np.pad(x.numpy(), [(1, 2), (0, 0)]))
    assert len(made) == 4
    for n in range(1, conv.MAX_PAD_PLANS + 3):          # past the bound: it starts afresh and stays right
        x = torch.randn(n, 3)
        np.testing.assert_array_equal(run(x, pads, torch.tensor(float(n)))[0].numpy(),
                                      np.pad(x.numpy(), [(0, 0), (1, 2)], constant_values=float(n)))
