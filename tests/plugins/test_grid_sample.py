"""GridSample and AffineGrid plugins against ONNX Runtime (opsets 16/20) and torch.nn.functional."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kiln.errors import PluginError
from kiln.plugins import TensorDesc, registry
from kiln.plugins.builtin.grid_sample import AffineGrid, GridSample, grid_sample_fields

TACTICS = ("torch", "triton")


def _inputs(seed=0, n=2, c=3, h=5, w=6, ho=4, wo=7):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, c, h, w)).astype(np.float32)
    grid = g.uniform(-1.6, 1.6, (n, ho, wo, 2)).astype(np.float32)   # reaches outside: exercises padding
    # Exact corners, centers and half-pixel ties (nearest rounds half to even).
    grid[0, 0, :4] = [[-1, -1], [1, 1], [0, 0], [-1, 1]]
    grid[0, 1, :3, 0] = [(2 * 1.5 + 1) / w - 1, (2 * 2.5 + 1) / w - 1, 2 * 2.5 / (w - 1) - 1]
    return x, grid


@pytest.mark.parametrize("tactic", TACTICS)
@pytest.mark.parametrize("align", (0, 1))
@pytest.mark.parametrize("padding", ("zeros", "border", "reflection"))
@pytest.mark.parametrize("mode,opset", [("bilinear", 16), ("nearest", 16), ("linear", 20), ("cubic", 20),
                                        ("bicubic", 16)])
def test_grid_sample_matches_onnxruntime(ref, tactic, mode, opset, padding, align):
    x, grid = _inputs()
    attrs = dict(mode=mode, padding_mode=padding, align_corners=align)
    (want,) = ref.onnx("GridSample", opset, [("X", x), ("grid", grid)], ["Y"], **attrs)
    plugin = GridSample(**GridSample.onnx_fields(attrs, opset))
    (got,) = ref.run(plugin, ref.dev(x, grid), tactic)
    tol = 1e-4 if "cubic" in mode else 1e-5
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("tactic", TACTICS)
@pytest.mark.parametrize("align", (0, 1))
@pytest.mark.parametrize("padding", ("zeros", "border", "reflection"))
@pytest.mark.parametrize("mode", ("bilinear", "nearest", "bicubic"))
def test_grid_sample_matches_torch(ref, tactic, mode, padding, align):
    x, grid = _inputs(1, n=1, c=9, h=4, w=9, ho=3, wo=5)    # C=9: a partial channel block
    xs, gs = ref.dev(x, grid)
    want = F.grid_sample(xs, gs, mode=mode, padding_mode=padding, align_corners=bool(align))
    (got,) = ref.run(GridSample(mode=mode, padding_mode=padding, align_corners=align), [xs, gs], tactic)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tactic", TACTICS)
def test_grid_sample_strided_grid_and_float16(ref, tactic):
    x, grid = _inputs(2)
    xs, gs = ref.dev(x, grid)
    gs_t = gs.transpose(1, 2).contiguous().transpose(1, 2)           # same values, other strides
    want = F.grid_sample(xs, gs, align_corners=False)
    (got,) = ref.run(GridSample(), [xs, gs_t], tactic)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (half,) = ref.run(GridSample(), [xs.half(), gs.half()], tactic)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tactic", TACTICS)
@pytest.mark.parametrize("align", (0, 1))
@pytest.mark.parametrize("size", ([2, 3, 4, 5], [2, 1, 1, 3], [2, 1, 6, 1]))
def test_affine_grid_matches_onnxruntime_and_torch(ref, tactic, align, size):
    g = np.random.default_rng(3)
    theta = g.standard_normal((2, 2, 3)).astype(np.float32)
    (want,) = ref.onnx("AffineGrid", 20, [("theta", theta), ("size", np.array(size, np.int64))], ["grid"],
                       align_corners=align)
    plugin = AffineGrid(**AffineGrid.onnx_fields({"align_corners": align, "size": size}, 20))
    (got,) = ref.run(plugin, ref.dev(theta), tactic)
    assert tuple(got.shape) == (2, size[2], size[3], 2)
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-5)
    if not (align and 1 in size[2:]):   # torch (since 1.3) puts a unit axis at 0, ONNX Runtime at +1
        (th,) = ref.dev(theta)
        torch.testing.assert_close(got, F.affine_grid(th, size, align_corners=bool(align)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tactic", TACTICS)
def test_spatial_transformer_pair(ref, tactic):
    """AffineGrid feeding GridSample, as an STN does, against torch end to end."""
    g = np.random.default_rng(4)
    x = g.standard_normal((2, 4, 8, 8)).astype(np.float32)
    theta = (np.eye(2, 3)[None] + 0.2 * g.standard_normal((2, 2, 3))).astype(np.float32)
    xs, th = ref.dev(x, theta)
    (grid,) = ref.run(AffineGrid(size=[2, 4, 6, 6]), [th], tactic)
    (got,) = ref.run(GridSample(), [xs, grid], tactic)
    want = F.grid_sample(xs, F.affine_grid(th, [2, 4, 6, 6], align_corners=False), align_corners=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_affine_grid_size_from_input_tensor(ref):
    theta = torch.eye(2, 3)[None].repeat(3, 1, 1)
    plugin = AffineGrid()
    (d,) = plugin.output_descs([TensorDesc(("N", 2, 3), "float32"), TensorDesc((4,), "int64")])
    assert d.shape == ("N", None, None, 2)
    out = torch.empty(3, 2, 4, 2)
    plugin.forward([theta, torch.tensor([3, 1, 2, 4])], [out], None, "torch")
    torch.testing.assert_close(out, F.affine_grid(theta, [3, 1, 2, 4], align_corners=False))
    with pytest.raises(PluginError, match="size"):
        plugin.forward([theta], [out], None, "torch")


def test_fields_and_descs():
    assert grid_sample_fields({}, 16)["mode"] == "bilinear"
    assert grid_sample_fields({"mode": b"cubic"}, 20)["mode"] == "bicubic"
    assert grid_sample_fields({"mode": "linear"}, 20)["mode"] == "bilinear"
    p = GridSample(**grid_sample_fields({"padding_mode": "border", "align_corners": 1}, 16))
    (d,) = p.output_descs([TensorDesc(("N", 3, "H", "W"), "float16"), TensorDesc(("N", 8, None, 2), "float16")])
    assert d.shape == ("N", 3, 8, None) and d.dtype == "float16"
    with pytest.raises(PluginError, match="4-D"):
        p.output_descs([TensorDesc((1, 1, 2, 2, 2), "float32"), TensorDesc((1, 2, 2, 2), "float32")])  # ranks differ
    a = AffineGrid(size=[1, 3, 16, 20])
    assert a.output_descs([TensorDesc(("N", 2, 3), "float32")])[0].shape == ("N", 16, 20, 2)
    assert registry.get("GridSample", "kiln", "1") is GridSample and registry.get("AffineGrid", "kiln") is AffineGrid


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_cuda_large_against_torch(ref, dtype):
    x = torch.randn(2, 64, 40, 48, device="cuda", dtype=dtype)
    grid = (torch.rand(2, 33, 37, 2, device="cuda", dtype=dtype) * 2.4 - 1.2)
    for mode in ("bilinear", "nearest", "bicubic"):
        want = F.grid_sample(x.float(), grid.float(), mode=mode, padding_mode="reflection", align_corners=False)
        (got,) = ref.run(GridSample(mode=mode, padding_mode="reflection"), [x, grid], "triton")
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
