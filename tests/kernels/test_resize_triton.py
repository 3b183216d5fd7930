"""Nearest upsampling of channels-last maps (YOLO/FPN necks) through Triton's interpreter on the
CPU, against torch's F.interpolate, and the fall-back to the general Resize for everything else."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from kiln.kernels.registry import KernelContext, tactics_for  # noqa: E402
from kiln.kernels.resize_triton import make_resize_nearest_nhwc, upsample_nearest_nhwc  # noqa: E402

YOLO = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}


def _cl(*shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(sum(shape))
    return torch.randn(*shape, generator=g).to(dtype).to(DEV).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape,sh,sw", [((2, 12, 3, 5), 2, 2), ((1, 200, 2, 3), 3, 1), ((2, 5, 4, 4), 1, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_interpolate(shape, sh, sw, dtype) -> None:
    x = _cl(*shape, dtype=dtype)
    y = upsample_nearest_nhwc(x, sh, sw)
    want = F.interpolate(x.float(), scale_factor=(sh, sw), mode="nearest")
    assert y.shape == want.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.float(), want)


def test_tactic_takes_the_onnx_upsample_and_falls_back_otherwise() -> None:
    run = make_resize_nearest_nhwc(YOLO, KernelContext(device=DEV))
    scales = torch.tensor([1.0, 1.0, 2.0, 2.0])
    x = _cl(2, 8, 3, 4)
    (y,) = run(x, None, scales)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, F.interpolate(x, scale_factor=2, mode="nearest"))
    # NCHW input, a fractional scale, a resized channel axis: the general Resize, same answers as torch's
    xn = x.contiguous()
    assert torch.equal(run(xn, None, scales)[0], F.interpolate(xn, scale_factor=2, mode="nearest"))
    (z,) = run(x, None, torch.tensor([1.0, 1.0, 1.5, 2.0]))
    assert z.shape == (2, 8, 4, 8)
    (c,) = run(x, None, torch.tensor([1.0, 2.0, 1.0, 1.0]))
    assert c.shape == (2, 16, 3, 4) and torch.equal(c[:, ::2], x) and torch.equal(c[:, 1::2], x)


def test_offered_only_for_floor_asymmetric_nearest() -> None:
    def offered(attrs):
        return "triton_nearest_nhwc" in [t.name for t in tactics_for("Resize", attrs, KernelContext(device="cuda"))]
    assert offered(YOLO)
    assert not offered({**YOLO, "coordinate_transformation_mode": "half_pixel"})
    assert not offered({**YOLO, "mode": "linear"})
    assert not offered({**YOLO, "nearest_mode": "round_prefer_floor"})
    assert "triton_nearest_nhwc" not in [t.name for t in tactics_for("Resize", YOLO, KernelContext(device="cpu"))]
