"""RoiAlign plugin against ONNX Runtime (opset 10 and 16) and torchvision, both tactics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.plugins import TensorDesc, registry
from kiln.plugins.builtin.roi_align import RoiAlign, roi_align_fields

TACTICS = ("torch", "triton")


def _inputs(seed: int = 0, n: int = 2, c: int = 5, h: int = 10, w: int = 12, r: int = 7):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, c, h, w)).astype(np.float32)
    # Boxes in input-image coordinates (spatial_scale 0.5): some inside, some hanging over
    # the border, one tiny (malformed-size handling), one inverted.
    x1 = g.uniform(-6, 20, r)
    y1 = g.uniform(-6, 16, r)
    rois = np.stack([x1, y1, x1 + g.uniform(0.5, 18, r), y1 + g.uniform(0.5, 14, r)], 1).astype(np.float32)
    rois[0] = [3.0, 4.0, 3.4, 4.3]
    rois[1] = [10.0, 9.0, 6.0, 2.0]
    rois[2] = [-30.0, -30.0, 60.0, 50.0]
    bidx = g.integers(0, n, r).astype(np.int64)
    return x, rois, bidx


CASES = [(mode, ctm, sr, opset)
         for mode in ("avg", "max")
         for sr in (0, 2)
         for ctm, opset in (("output_half_pixel", 10), ("output_half_pixel", 16), ("half_pixel", 16))]


@pytest.mark.parametrize("tactic", TACTICS)
@pytest.mark.parametrize("mode,ctm,sr,opset", CASES)
def test_matches_onnxruntime(ref, tactic, mode, ctm, sr, opset):
    x, rois, bidx = _inputs()
    attrs = dict(mode=mode, output_height=3, output_width=4, sampling_ratio=sr, spatial_scale=0.5)
    if opset >= 16:
        attrs["coordinate_transformation_mode"] = ctm
    (expected,) = ref.onnx("RoiAlign", opset, [("X", x), ("rois", rois), ("batch_indices", bidx)], ["Y"], **attrs)
    plugin = RoiAlign(**RoiAlign.onnx_fields(attrs, opset))
    assert plugin.coordinate_transformation_mode == ctm
    (got,) = ref.run(plugin, ref.dev(x, rois, bidx), tactic)
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_triton_tactic_really_runs_triton(ref, monkeypatch):
    from kiln.plugins.builtin import roi_align as mod

    kernel = mod._roi_align_kernel
    if ref.device == "cpu":
        assert type(kernel).__name__ == "InterpretedFunction"   # CPU tensors run only through the interpreter
    grids = []

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]
    monkeypatch.setattr(mod, "_roi_align_kernel", Spy())
    x, rois, bidx = _inputs(1)
    plugin = RoiAlign(output_height=2, output_width=2, sampling_ratio=1)
    (got,) = ref.run(plugin, ref.dev(x, rois, bidx), "triton")
    assert grids == [(7, 1)]
    (want,) = ref.run(plugin, ref.dev(x, rois, bidx), "torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tactic", TACTICS)
def test_float16_input(ref, tactic):
    x, rois, bidx = _inputs(2)
    plugin = RoiAlign(output_height=2, output_width=3, spatial_scale=0.5, mode="avg")
    xs, rs, bs = ref.dev(x, rois, bidx)
    (want,) = ref.run(plugin, [xs, rs, bs], "torch")
    (got,) = ref.run(plugin, [xs.half(), rs.half(), bs], tactic)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tactic", TACTICS)
def test_no_rois(ref, tactic):
    x, _, _ = _inputs()
    plugin = RoiAlign(output_height=2, output_width=2)
    xs, rs, bs = ref.dev(x, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    (got,) = ref.run(plugin, [xs, rs, bs], tactic)
    assert got.shape == (0, 5, 2, 2)


@pytest.mark.parametrize("tactic", TACTICS)
@pytest.mark.parametrize("aligned", (False, True))
@pytest.mark.parametrize("sr", (0, 2))
def test_matches_torchvision(ref, tactic, aligned, sr):
    tv = pytest.importorskip("torchvision")
    x, rois, bidx = _inputs(3)
    xs, rs, bs = ref.dev(x, rois, bidx)
    boxes = torch.cat([bs.float()[:, None], rs], 1)
    want = tv.ops.roi_align(xs, boxes, (3, 4), spatial_scale=0.5, sampling_ratio=sr, aligned=aligned)
    plugin = RoiAlign(output_height=3, output_width=4, spatial_scale=0.5, sampling_ratio=sr,
                      coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel")
    (got,) = ref.run(plugin, [xs, rs, bs], tactic)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_onnx_fields_defaults_follow_opset():
    assert roi_align_fields({}, 10)["coordinate_transformation_mode"] == "output_half_pixel"
    assert roi_align_fields({}, 16)["coordinate_transformation_mode"] == "half_pixel"
    f = RoiAlign.onnx_fields({"mode": b"max", "output_height": 7, "output_width": 7, "spatial_scale": 1}, 16)
    p = RoiAlign(**f)
    assert (p.mode, p.output_height, p.sampling_ratio, p.spatial_scale) == ("max", 7, 0, 1.0)


def test_output_descs_pass_symbolic_dims():
    p = RoiAlign(output_height=7, output_width=7)
    (d,) = p.output_descs([TensorDesc(("N", 256, "H", None), "float16"), TensorDesc(("R", 4), "float16"),
                           TensorDesc(("R",), "int64")])
    assert d.shape == ("R", 256, 7, 7) and d.dtype == "float16"
    assert p.supports(2, TensorDesc(("R",), "int64"), 3) and not p.supports(0, TensorDesc((1,), "int64"), 3)


def test_registered_under_kiln_namespace():
    assert registry.get("RoiAlign", "kiln", "1") is RoiAlign
    assert RoiAlign.tactics["cuda"][0] == "triton" and "torch" in RoiAlign.tactics["cpu"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_cuda_triton_matches_torch(ref, dtype):
    x, rois, bidx = _inputs(4, n=2, c=64, h=40, w=52, r=50)
    args = [torch.from_numpy(x).cuda().to(dtype), torch.from_numpy(rois).cuda().to(dtype), torch.from_numpy(bidx).cuda()]
    plugin = RoiAlign(output_height=7, output_width=7, sampling_ratio=2, spatial_scale=0.5)
    (got,) = ref.run(plugin, args, "triton")
    (want,) = ref.run(plugin, args, "torch")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
