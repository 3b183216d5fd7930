"""Volumetric GridSample (5-D) and AffineGrid (3-D) against torch.nn.functional and ONNX Runtime.

Without a GPU the 'triton' tactic runs in Triton's interpreter (tests/plugins/conftest.py sets
TRITON_INTERPRET=1), so shapes stay tiny; the ``gpu`` cases repeat the checks at a realistic size.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

import kiln
from kiln.errors import PluginError
from kiln.plugins import TensorDesc
from kiln.plugins.builtin import grid_sample as gs
from kiln.plugins.builtin.grid_sample import AffineGrid, GridSample

TACTICS = ("torch", "triton")
PADDINGS = ("zeros", "border", "reflection")


def _volume(seed=0, n=1, c=2, d=3, h=4, w=5, do=2, ho=3, wo=4):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, c, d, h, w)).astype(np.float32)
    grid = g.uniform(-1.6, 1.6, (n, do, ho, wo, 3)).astype(np.float32)   # reaches outside: exercises padding
    # Corners, the center, and half-voxel ties on every axis (nearest rounds half to even).
    grid[0, 0, 0, :4] = [[-1, -1, -1], [1, 1, 1], [0, 0, 0], [-1, 1, -1]]
    grid[0, 0, 1, 0] = [(2 * 1.5 + 1) / w - 1, (2 * 0.5 + 1) / h - 1, (2 * 1.5 + 1) / d - 1]   # ties, align 0
    grid[0, 0, 1, 1] = [2 * 2.5 / (w - 1) - 1, 2 * 1.5 / (h - 1) - 1, 2 * 0.5 / (d - 1) - 1]   # ties, align 1
    return x, grid


@pytest.mark.parametrize("tactic", TACTICS)
@pytest.mark.parametrize("align", (0, 1))
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", ("bilinear", "nearest"))
def test_grid_sample_5d_matches_torch(ref, tactic, mode, padding, align):
    xs, gs_ = ref.dev(*_volume())
    want = F.grid_sample(xs, gs_, mode=mode, padding_mode=padding, align_corners=bool(align))
    (got,) = ref.run(GridSample(mode=mode, padding_mode=padding, align_corners=align), [xs, gs_], tactic)
    assert got.shape == (1, 2, 2, 3, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tactic", TACTICS)
@pytest.mark.parametrize("align", (0, 1))
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", ("linear", "nearest"))
def test_grid_sample_5d_matches_onnxruntime(ref, tactic, mode, padding, align):
    x, grid = _volume(1, n=2, c=3, d=4, h=3, w=5, do=3, ho=2, wo=4)
    attrs = dict(mode=mode, padding_mode=padding, align_corners=align)
    (want,) = ref.onnx("GridSample", 20, [("X", x), ("grid", grid)], ["Y"], **attrs)
    (got,) = ref.run(GridSample(**GridSample.onnx_fields(attrs, 20)), ref.dev(x, grid), tactic)
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ("bilinear", "nearest"))
def test_grid_sample_5d_triton_channel_blocks_strides_and_float16(ref, mode):
    """Launch configs with partial channel blocks and chunks, a non-contiguous grid, float16."""
    x, grid = _volume(2, n=2, c=9)
    xs, gs_ = ref.dev(x, grid)
    want = F.grid_sample(xs, gs_, mode=mode, padding_mode="border", align_corners=False)
    p = GridSample(mode=mode, padding_mode="border")
    for config in ((2, 16, 5, 2), (1, 8, 4, 1), (2, 32, 9, 2)):     # (BLOCK_C, BLOCK_P, C_CHUNK, warps)
        out = torch.full_like(want, 7.0)
        gs._grid_sample_triton(p, xs, gs_, out, config)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    strided = gs_.permute(0, 3, 1, 2, 4).contiguous().permute(0, 2, 3, 1, 4)   # same values, other strides
    (got,) = ref.run(p, [xs, strided], "triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (half,) = ref.run(p, [xs.half(), gs_.half()], "triton")
    assert half.dtype == torch.float16
    want = F.grid_sample(xs.half().float(), gs_.half().float(), mode=mode, padding_mode="border", align_corners=False)
    torch.testing.assert_close(half.float(), want, rtol=2e-3, atol=2e-3)   # same (rounded) grid as the reference


@pytest.mark.parametrize("tactic", ("triton",))
def test_grid_sample_5d_empty_volume_reads_zeros(ref, tactic):
    x = torch.zeros(1, 2, 0, 3, 3, device=ref.device)
    grid = torch.zeros(1, 2, 2, 2, 3, device=ref.device)
    (got,) = ref.run(GridSample(), [x, grid], tactic)
    assert got.shape == (1, 2, 2, 2, 2) and not got.any()


@pytest.mark.parametrize("tactic", TACTICS)
@pytest.mark.parametrize("align", (0, 1))
@pytest.mark.parametrize("size", ([2, 3, 3, 4, 5], [2, 1, 1, 3, 4], [2, 1, 3, 1, 1]))
def test_affine_grid_3d_matches_onnxruntime_and_torch(ref, tactic, align, size):
    theta = np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32)
    (want,) = ref.onnx("AffineGrid", 20, [("theta", theta), ("size", np.array(size, np.int64))], ["grid"],
                       align_corners=align)
    plugin = AffineGrid(**AffineGrid.onnx_fields({"align_corners": align, "size": size}, 20))
    (got,) = ref.run(plugin, ref.dev(theta), tactic)
    assert tuple(got.shape) == (2, *size[2:], 3)
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-5)
    if not (align and 1 in size[2:]):   # torch (since 1.3) puts a unit axis at 0, ONNX Runtime at +1
        (th,) = ref.dev(theta)
        torch.testing.assert_close(got, F.affine_grid(th, size, align_corners=bool(align)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tactic", TACTICS)
def test_volumetric_spatial_transformer_pair(ref, tactic):
    """AffineGrid [N,3,4] feeding 5-D GridSample, against torch end to end."""
    g = np.random.default_rng(4)
    x = g.standard_normal((2, 2, 3, 4, 5)).astype(np.float32)
    theta = (np.eye(3, 4)[None] + 0.2 * g.standard_normal((2, 3, 4))).astype(np.float32)
    xs, th = ref.dev(x, theta)
    size = [2, 2, 2, 3, 4]
    for align in (0, 1):
        (grid,) = ref.run(AffineGrid(size=size, align_corners=align), [th], tactic)
        (got,) = ref.run(GridSample(align_corners=align), [xs, grid], tactic)
        want = F.grid_sample(xs, F.affine_grid(th, size, align_corners=bool(align)), align_corners=bool(align))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tactic", TACTICS)
def test_affine_grid_3d_size_from_input_tensor(ref, tactic):
    """Without the size field the output shape follows the size input's values (data-dependent)."""
    plugin = AffineGrid(align_corners=1)
    assert plugin.data_dependent_shapes and not AffineGrid(size=[1, 1, 2, 3, 4]).data_dependent_shapes
    (d,) = plugin.output_descs([TensorDesc(("N", 3, 4), "float32"), TensorDesc((5,), "int64")])
    assert d.shape == ("N", None, None, None, 3)
    theta = torch.randn(3, 3, 4, device=ref.device)
    size = torch.tensor([3, 1, 2, 3, 4], device=ref.device)
    (got,) = ref.run(plugin, [theta, size], tactic)
    torch.testing.assert_close(got, F.affine_grid(theta, [3, 1, 2, 3, 4], align_corners=True), rtol=1e-5, atol=1e-5)


def test_output_descs_and_supports():
    p = GridSample(mode="nearest")
    (d,) = p.output_descs([TensorDesc(("N", 3, "D", "H", "W"), "float16"), TensorDesc(("N", 2, None, 4, 3), "float16")])
    assert d.shape == ("N", 3, 2, None, 4) and d.dtype == "float16"
    (d,) = p.output_descs([TensorDesc((1, 3, 8, 8, 8), "float32"), TensorDesc((1, 2, 3, 4, None), "float32")])
    assert d.shape == (1, 3, 2, 3, 4)
    assert p.supports(1, TensorDesc((1, 2, 3, 4, 3), "float32"), 2)
    assert not p.supports(1, TensorDesc((1, 2, 3), "float32"), 2)
    a = AffineGrid(size=[-1, -1, 16, 20, 24])       # N and C unknown (folded from a Shape): only D, H, W count
    assert a.output_descs([TensorDesc(("N", 3, 4), "float32")])[0].shape == ("N", 16, 20, 24, 3)
    assert AffineGrid().output_descs([TensorDesc(("N", 3, 4), "float32")])[0].shape == ("N", None, None, None, 3)
    assert AffineGrid().output_descs([TensorDesc(("N", 2, 3), "float32")])[0].shape == ("N", None, None, 2)
    assert AffineGrid().output_descs([TensorDesc(("N", None, None), "float32"),
                                      TensorDesc((5,), "int64")])[0].shape == ("N", None, None, None, 3)


@pytest.mark.parametrize("make,inputs,match", [
    (lambda: AffineGrid(size=[1, 1, 2, 3, 4]), [TensorDesc((1, 2, 4), "float32")], r"theta of shape \[N, 2, 3\]"),
    (lambda: AffineGrid(size=[1, 1, 2, 3, 4]), [TensorDesc((1, 3, 4, 1), "float32")], r"\[N, 3, 4\] \(3-D\), got"),
    (lambda: AffineGrid(size=[1, 1, 2, 3, 4]), [TensorDesc((1, 2, 3), "float32")], r"theta must be \[N, 3, 4\]"),
    (lambda: AffineGrid(size=[1, 1, 3, 4]), [TensorDesc((1, 3, 4), "float32")], r"theta must be \[N, 2, 3\]"),
    (lambda: AffineGrid(size=[1, 1, 2, 3, 4, 5]), [TensorDesc((1, 3, 4), "float32")], "4 elements"),
    (lambda: AffineGrid(size=[1, 1, 2, -3, 4]), [TensorDesc((1, 3, 4), "float32")], "negative"),
    (lambda: AffineGrid(), [TensorDesc((1, 3, 4), "float32"), TensorDesc((6,), "int64")], "input 'size'"),
    (lambda: GridSample(), [TensorDesc((1, 2, 3, 4, 5), "float32"), TensorDesc((1, 2, 3, 4, 2), "float32")],
     r"last dim is 3 \(x, y, z\)"),
    (lambda: GridSample(), [TensorDesc((1, 2, 3, 4), "float32"), TensorDesc((1, 2, 3, 3), "float32")],
     r"last dim is 2 \(x, y\)"),
    (lambda: GridSample(), [TensorDesc((1, 2, 3, 4, 5), "float32"), TensorDesc((1, 2, 3, 3), "float32")],
     r"\(5-D\); got X"),
    (lambda: GridSample(mode="bicubic"),
     [TensorDesc((1, 2, 3, 4, 5), "float32"), TensorDesc((1, 2, 3, 3, 3), "float32")], "use mode 'bilinear'"),
])
def test_bad_input_is_one_line_plugin_error(make, inputs, match):
    with pytest.raises(PluginError, match=match) as err:
        make().output_descs(inputs)
    assert "\n" not in str(err.value)


def test_bad_input_at_forward_and_parse():
    theta = torch.randn(1, 2, 3)
    with pytest.raises(PluginError, match="theta must be"):
        AffineGrid().forward([theta, torch.tensor([1, 1, 2, 3, 4])], None, None, "torch")
    with pytest.raises(PluginError, match="input 'size'"):
        AffineGrid().forward([theta, torch.tensor([1, 1, 3])], None, None, "torch")
    x, grid = torch.randn(1, 1, 2, 2, 2), torch.zeros(1, 1, 1, 1, 2)
    with pytest.raises(PluginError, match="last dim is 3"):
        GridSample().forward([x, grid], [torch.empty(1, 1, 1, 1, 1)], None, "torch")
    # through the ONNX parser, still one line
    node = helper.make_node("GridSample", ["x", "grid"], ["y"], name="warp", mode="cubic")
    model = _model([node], [_vi("x", [1, 2, 3, 4, 5]), _vi("grid", [1, 2, 3, 4, 3])], [], [1, 2, 2, 3, 4])
    with pytest.raises(PluginError, match=r"'bicubic' \(ONNX 'cubic'\).*5-D") as err:
        kiln.onnx.parse(model)
    assert "\n" not in str(err.value)


# ---- ONNX models through kiln.build, against ONNX Runtime --------------------------------------------

def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _model(nodes, inputs, inits, out_shape):
    graph = helper.make_graph(nodes, "stn3d", inputs, [_vi("y", out_shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = min(model.ir_version, 10)
    return model


def _stn_model(size_from: str, align: int, mode: str, padding: str, batch="N"):
    """x [N,2,3,4,5], theta [N,3,4] -> AffineGrid(size) -> GridSample(x, grid) -> y [N,2,2,3,4]."""
    inputs = [_vi("x", [batch, 2, 3, 4, 5]), _vi("theta", [batch, 3, 4])]
    nodes, inits = [], []
    if size_from == "constant":
        inits.append(helper.make_tensor("size", TensorProto.INT64, [5], [2, 2, 2, 3, 4]))
    elif size_from == "input":
        inputs.append(_vi("size", [5], TensorProto.INT64))
    else:                                   # the Shape of a tensor with static D, H, W (torch's export)
        inputs.append(_vi("like", [batch, 1, 2, 3, 4]))
        nodes.append(helper.make_node("Shape", ["like"], ["size"]))
    nodes += [helper.make_node("AffineGrid", ["theta", "size"], ["grid"], align_corners=align),
              helper.make_node("GridSample", ["x", "grid"], ["y"], mode=mode, padding_mode=padding,
                               align_corners=align)]
    return _model(nodes, inputs, inits, [batch, 2, 2, 3, 4])


def _ort(model, feeds):
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y"], feeds)[0]


@pytest.mark.parametrize("size_from", ("constant", "shape", "input"))
@pytest.mark.parametrize("mode,padding,align", [("linear", "zeros", 0), ("nearest", "border", 1),
                                                ("linear", "reflection", 1)])
def test_onnx_model_builds_and_matches_onnxruntime(tmp_path, size_from, mode, padding, align):
    g = np.random.default_rng(5)
    feeds = {"x": g.standard_normal((2, 2, 3, 4, 5)).astype(np.float32),
             "theta": (np.eye(3, 4)[None] * 1.3 + 0.3 * g.standard_normal((2, 3, 4))).astype(np.float32)}
    if size_from == "input":
        feeds["size"] = np.array([2, 2, 2, 3, 4], np.int64)
    elif size_from == "shape":
        feeds["like"] = np.zeros((2, 1, 2, 3, 4), np.float32)
    model = _stn_model(size_from, align, mode, padding, batch=2 if size_from == "input" else "N")
    onnx.checker.check_model(model)
    want = _ort(model, feeds)
    net = kiln.onnx.parse(model)
    (affine,) = [layer.attrs["plugin"] for layer in net.layers if isinstance(layer.attrs.get("plugin"), AffineGrid)]
    assert affine.data_dependent_shapes == (size_from == "input")       # constant and Shape sizes fold
    profiles = None if size_from == "input" else {n: [(1, *a.shape[1:]), a.shape, (3, *a.shape[1:])]
                                                  for n, a in feeds.items() if n != "size"}
    engine = kiln.build(net, kiln.BuildConfig(device="cpu", profiles=profiles))
    got = engine.context().run(feeds)["y"]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    engine.save(str(tmp_path / "stn3d.kiln"))
    again = kiln.load(str(tmp_path / "stn3d.kiln")).context().run(feeds)["y"]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(got))


# ---- the compiled kernels, without a GPU ---------------------------------------------------------------

_SM90 = """
import sys, torch
sys.path.insert(0, {here!r})
from sm90_compile import compile_sm90, forward, record
from kiln.plugins.builtin.grid_sample import AffineGrid, GridSample
cases = []
for i, (mode, pad) in enumerate((m, p) for m in ("bilinear", "nearest") for p in ("zeros", "border", "reflection")):
    g = GridSample(mode=mode, padding_mode=pad, align_corners=i % 2)
    cases.append(lambda g=g: forward(g, [torch.randn(2, 16, 5, 9, 10), torch.rand(2, 3, 5, 6, 3) * 2 - 1]))
cases.append(lambda: forward(GridSample(), [torch.randn(2, 16, 5, 9, 10).half(), torch.rand(2, 3, 5, 6, 3).half()]))
for align in (0, 1):
    cases.append(lambda a=AffineGrid(size=[2, 3, 4, 7, 9], align_corners=align): forward(a, [torch.randn(2, 3, 4)]))
names = []
for case in cases:
    for fn, grid, args, kwargs in record("grid_sample", case):
        assert "cubin" in compile_sm90(fn, args, kwargs).asm
        names.append(fn.__name__)
print("compiled", len(names), sorted(set(names)))
"""


def test_volumetric_kernels_compile_for_sm90():
    """The interpreter forgives what the compiler rejects: compile the 5-D/3-D launches to cubins
    (tests/plugins/sm90_compile.py's machinery, in a process without TRITON_INTERPRET)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SM90.format(here=str(Path(__file__).parent))],
                          capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and ("ptxas" in out and "No such file" in out):
        pytest.skip("Triton's bundled ptxas is unavailable here")
    assert proc.returncode == 0, out[-4000:]
    assert "compiled 9 ['_affine_grid_3d_kernel', '_grid_sample_3d_kernel']" in proc.stdout


# ---- GPU: the compiled Triton kernels at a realistic size ---------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("mode", ("bilinear", "nearest"))
def test_cuda_5d_grid_sample_against_torch(mode, dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 16, 32, 32, device="cuda", dtype=dtype)
    grid = torch.rand(2, 12, 20, 24, 3, device="cuda", dtype=dtype) * 2.4 - 1.2
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for padding, align in itertools.product(PADDINGS, (0, 1)):
        want = F.grid_sample(x.float(), grid.float(), mode=mode, padding_mode=padding, align_corners=bool(align))
        out = torch.empty(want.shape, device="cuda", dtype=dtype)
        GridSample(mode=mode, padding_mode=padding, align_corners=align).forward([x, grid], [out], None, "triton")
        if mode == "nearest":
            # a coordinate within an ulp of a rounding tie may pick the other voxel (fma contraction differs
            # between compilers); a kernel bug moves far more than 0.01% of outputs
            assert (out.float() - want).abs().gt(tol).float().mean().item() < 1e-4, (padding, align)
        else:
            torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_cuda_3d_affine_grid_and_engine():
    torch.manual_seed(1)
    theta = torch.eye(3, 4, device="cuda")[None] + 0.1 * torch.randn(2, 3, 4, device="cuda")
    size = [2, 16, 16, 32, 32]
    for align in (0, 1):
        out = torch.empty(2, 16, 32, 32, 3, device="cuda")
        AffineGrid(size=size, align_corners=align).forward([theta], [out], None, "triton")
        torch.testing.assert_close(out, F.affine_grid(theta, size, align_corners=bool(align)), rtol=1e-5, atol=1e-5)
    model = _stn_model("shape", 0, "linear", "zeros")
    g = np.random.default_rng(6)
    feeds = {"x": g.standard_normal((2, 2, 3, 4, 5)).astype(np.float32),
             "theta": (np.eye(3, 4)[None] + 0.2 * g.standard_normal((2, 3, 4))).astype(np.float32),
             "like": np.zeros((2, 1, 2, 3, 4), np.float32)}
    engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(
        device="cuda", profiles={n: [a.shape] * 3 for n, a in feeds.items()}))
    got = engine.context().run({k: torch.from_numpy(v).cuda() for k, v in feeds.items()})["y"]
    np.testing.assert_allclose(torch.as_tensor(got).cpu().numpy(), _ort(model, feeds), rtol=1e-5, atol=1e-5)
