"""Shape-derived constants (passes/shape_constants.py, runtime/shape_cache.py): in a range engine the layers
that compute from shapes alone (a grid made with Range over a feature map's size) become one ShapeConstant
layer, computed once per input shape; the arithmetic reading it fuses as in the static engine, and the
outputs match numpy across the range. The engine file keeps the layer kind (schema-checked)."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

import kiln
from kiln.errors import EngineFormatError
from kiln.passes.shape_constants import FoldShapeConstants
from test_symbolic_shapes import _build, _same_layers

RANGE = {"x": ((1, 2, 3, 3), (2, 2, 5, 7), (2, 2, 9, 9))}
SHAPES = [(1, 2, 3, 3), (2, 2, 5, 7), (1, 2, 9, 4), (2, 2, 9, 9)]


class _Grid(torch.nn.Module):
    """YOLO's box decode on a grid made from the input's own size: ``(2·sigmoid(x) + grid - 0.5)·4``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        yv, xv = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        grid = torch.stack((xv, yv), 0).unsqueeze(0) - 0.5
        return (x.sigmoid() * 2 + grid) * 4


def _reference(x: np.ndarray) -> np.ndarray:
    """numpy, in float64: the grid from np.indices."""
    iy, ix = np.indices(x.shape[2:], dtype=np.float64)
    grid = np.stack((ix, iy))[None] - 0.5
    return (2 / (1 + np.exp(-x.astype(np.float64))) + grid) * 4


@pytest.fixture(scope="module")
def model() -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Grid(), (torch.randn(1, 2, 5, 7),), f, input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False, dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
    return f.getvalue()


@pytest.fixture(scope="module")
def engine(model):
    return _build(model, RANGE)


def _shape_steps(ctx) -> list:
    return [s for s in ctx.program.steps if s.kind == "ShapeConstant"]


def test_the_grid_is_one_shape_constant_read_by_the_fused_decode(model, engine):
    kinds = [layer["kind"] for layer in engine.layers]
    assert kinds.count("ShapeConstant") == 1 and not {"Shape", "Range", "Expand", "Concatenation"} & set(kinds)
    grid = next(layer for layer in engine.layers if layer["kind"] == "ShapeConstant")["outputs"]
    fused = [layer for layer in engine.layers if layer["kind"] == "Pointwise"]
    assert len(fused) == 1 and set(grid) <= set(fused[0]["inputs"])
    _same_layers(engine, _build(model, {"x": (2, 2, 5, 7)}))


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_numpy_across_the_range(engine, shape):
    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    got = engine.context().run({"x": x})["y"]
    # |y| <= 4·(2 + 9) = 44; float32 rounding of sigmoid, one add and one multiply stays far below 1e-5 of it
    np.testing.assert_allclose(got, _reference(x), rtol=0, atol=44 * 1e-6)


def test_computed_once_per_shape(engine):
    ctx = engine.context()
    (step,) = _shape_steps(ctx)
    calls = []
    body = step.fn.fn

    def counted(*xs):
        calls.append(tuple(xs[0].shape))       # the input whose shape it reads (the constants it reads follow)
        return body(*xs)
    step.fn.fn = counted
    a, b = (np.ones(s, np.float32) for s in ((1, 2, 3, 3), (2, 2, 5, 7)))
    first = ctx.run({"x": a})["y"]
    for _ in range(3):
        np.testing.assert_array_equal(ctx.run({"x": a})["y"], first)
    assert len(calls) == 1
    ctx.run({"x": b})
    ctx.run({"x": b * 0})       # the same shape, other values: nothing to compute
    assert calls == [(1, 2, 3, 3), (2, 2, 5, 7)]
    np.testing.assert_array_equal(ctx.run({"x": a})["y"], first)
    assert len(calls) == 2


def test_the_context_bounds_the_kept_shapes(engine):
    ctx = engine.context(graph_cache=2)
    (step,) = _shape_steps(ctx)
    for shape in [(1, 2, 3, 3), (1, 2, 4, 4), (1, 2, 5, 5), (1, 2, 5, 5), (1, 2, 3, 3)]:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(ctx.run({"x": x})["y"], _reference(x), rtol=0, atol=44 * 1e-6)
        assert len(step.fn.entries) <= 2
    assert step.fn.computed == 4          # 3x3 again after 4x4 and 5x5 pushed it out


def test_the_engine_file_keeps_the_layer(engine, tmp_path):
    path = tmp_path / "grid.kiln"
    engine.save(path)
    loaded = kiln.load(path)
    assert [layer["kind"] for layer in loaded.layers] == [layer["kind"] for layer in engine.layers]
    for shape in SHAPES[1:3]:
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(loaded.context().run({"x": x})["y"], engine.context().run({"x": x})["y"])


@pytest.mark.parametrize("edit,why", [
    (lambda sc: sc["attrs"]["body"]["__graph__"]["outputs"].pop(), "body takes 1 inputs and gives 0 outputs"),
    (lambda sc: sc["attrs"].update(shapes=[1]), "unknown attribute 'shapes'"),
    (lambda sc: sc["attrs"]["body"]["__graph__"]["layers"][0].update(kind="Bogus"), "unknown kind 'Bogus'"),
])
def test_a_forged_shape_constant_is_refused(engine, tmp_path, edit, why):
    from kiln.engine.format import read_engine, write_engine
    engine.save(tmp_path / "ok.kiln")
    header, weights = read_engine(str(tmp_path / "ok.kiln"))
    header = {k: v for k, v in header.items() if k != "weights"}
    edit(next(layer for layer in header["plan"]["layers"] if layer["kind"] == "ShapeConstant"))
    write_engine(str(tmp_path / "bad.kiln"), header, weights)
    with pytest.raises(EngineFormatError) as info:
        kiln.load(tmp_path / "bad.kiln")
    msg = str(info.value)
    assert "\n" not in msg and why in msg and "kiln build" in msg, msg


def test_a_static_network_is_left_as_it_is():
    """With static inputs, a shape still computed at run time is a data-dependent one (here NonZero's)."""
    net = kiln.Network("static")
    x = net.add_input("x", "float32", (4,))
    nz = net.add_layer("NonZero", [x], output_dtypes=["int64"])
    shape = net.add_layer("Shape", [nz.outputs[0]], {"start": 1}, output_dtypes=["int64"])
    ramp = net.add_layer("Range", [net.add_constant(np.int64(0)), net.add_layer(
        "Squeeze", [shape.outputs[0]], {"axes": [0]}, output_dtypes=["int64"]).outputs[0], net.add_constant(np.int64(1))],
        output_dtypes=["int64"])
    y = net.add_layer("ElementWise", [nz.outputs[0], ramp.outputs[0]], {"op": "sum"}, output_dtypes=["int64"])
    net.mark_output(y.outputs[0], "y")
    assert not FoldShapeConstants()(net).modified
    x.shape = ("n",)
    assert FoldShapeConstants()(net).modified        # the same layers in a range build
    assert [layer.kind for layer in net.layers] == ["NonZero", "ShapeConstant", "ElementWise"]


def _ramp_net(later: bool) -> tuple[kiln.Network, object]:
    """``y = x + arange(n)`` and ``z = expand(b, [n, len(b)])``: one group reads the shapes of ``x`` and of
    ``b``; with ``later``, ``b = relu(x)`` is made after ``y``, the group's first reader, else ``b = relu(y)``
    (read on the way to ``b``: no one layer can hold the group)."""
    net = kiln.Network("ramp")
    x = net.add_input("x", "float32", ("n",))
    shape_x = net.add_layer("Shape", [x], output_dtypes=["int64"])
    n = net.add_layer("Cast", [shape_x.outputs[0]], {"to": "float32"}, output_dtypes=["float32"])
    r = net.add_layer("Range", [net.add_constant(np.float32(0)), net.add_layer(
        "Squeeze", [n.outputs[0]], {"axes": [0]}).outputs[0], net.add_constant(np.float32(1))])
    y = net.add_layer("ElementWise", [x, r.outputs[0]], {"op": "sum"})
    b = net.add_layer("Activation", [x if later else y.outputs[0]], {"type": "relu"})
    shape_b = net.add_layer("Shape", [b.outputs[0]], output_dtypes=["int64"])
    both = net.add_layer("Concatenation", [shape_x.outputs[0], shape_b.outputs[0]], {"axis": 0},
                         output_dtypes=["int64"])
    z = net.add_layer("Expand", [b.outputs[0], both.outputs[0]])
    net.mark_output(y.outputs[0], "y")
    net.mark_output(z.outputs[0], "z")
    return net, x


def test_a_group_reading_a_shape_made_after_its_first_reader():
    net, _ = _ramp_net(later=True)
    assert FoldShapeConstants()(net).modified
    assert [layer.kind for layer in net.layers] == ["Activation", "ShapeConstant", "ElementWise", "Expand"]
    engine = kiln.build(net, kiln.BuildConfig(device="cpu", profiles={"x": ((1,), (4,), (8,))}))
    for size in (1, 3, 8):
        x = np.random.default_rng(size).standard_normal(size).astype(np.float32)
        out = engine.context().run({"x": x})
        np.testing.assert_array_equal(out["y"], x + np.arange(size, dtype=np.float32))
        np.testing.assert_array_equal(out["z"], np.broadcast_to(np.maximum(x, 0), (size, size)))


def test_a_group_that_would_close_a_cycle_stays():
    net, _ = _ramp_net(later=False)
    before = [layer.kind for layer in net.layers]
    assert not FoldShapeConstants()(net).modified
    assert [layer.kind for layer in net.layers] == before


@pytest.mark.gpu
def test_recorded_graphs_read_the_kept_grids_after_the_cache_drops_them(model):
    """On the GPU each shape's run is recorded once and replayed: the grid is computed at the recording and
    the graph reads it where it is, also after the shape cache (bounded at 1 here) has dropped it."""
    engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cuda", profiles=RANGE))
    ctx = engine.context()
    (step,) = _shape_steps(ctx)
    step.fn.size = 1
    rng = np.random.default_rng(0)
    for shape in [(1, 2, 3, 3), (2, 2, 5, 7), (1, 2, 3, 3), (2, 2, 5, 7), (1, 2, 9, 4)] * 2:
        x = rng.standard_normal(shape).astype(np.float32)
        torch.cuda.empty_cache()
        junk = torch.full((1 << 20,), 1e9, device="cuda")     # reuses freed memory a graph might still read
        np.testing.assert_allclose(ctx.run({"x": x})["y"], _reference(x), rtol=0, atol=44 * 1e-6)
        del junk
    assert ctx.graphs is not None and ctx.graph_error is None and len(ctx.graphs.graphs) == 3


def test_profile_corners_tell_the_symbols_apart():
    from kiln.builder.shapes import profile_bindings
    ranges = {"b": [1, 2], "h": [64, 128], "w": [64, 128], "s": [8, 512]}
    bindings = profile_bindings(ranges, sorted(ranges))
    columns = {s: tuple(b[s] for b in bindings) for s in ranges}
    assert len(set(columns.values())) == 4
    assert all(set(col) == set(ranges[s]) for s, col in columns.items())       # only the profile's own ends
    assert profile_bindings({"h": [64, 64], "w": [8, 16]}, ["h", "w"]) is None      # h is no symbol there


class _Stride4(torch.nn.Module):
    """A map downsampled by 4, upsampled back and joined with the input: it runs only at multiples of 4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.interpolate(self.conv(x), scale_factor=4.0, mode="nearest")
        return torch.cat([x, y], 1) * 2 + 1


def test_shapes_are_inferred_at_the_profile_corners_where_generic_sizes_fail():
    from kiln.builder.build import prepare
    torch.manual_seed(0)
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Stride4(), (torch.randn(1, 2, 8, 8),), f, input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False, dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
    profile = {"x": ((1, 2, 8, 8), (2, 2, 16, 12), (2, 2, 32, 32))}
    net = prepare(kiln.onnx.parse(f.getvalue()), kiln.BuildConfig(device="cpu", profiles=profile)).net
    assert [(layer.kind, o.shape) for layer in net.layers for o in layer.outputs if o.shape is None] == []
    assert net.outputs[0].shape == ("b", 4, "h", "w")
