"""Stem convolutions rewritten as space-to-depth + stride-1 conv compute what the strided conv does
(torch's F.conv2d is the reference), for the stems of YOLOv5, ResNet and odd sizes and pads."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():                 # the regrouping kernel runs in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kiln.errors import BuildError
from kiln.kernels.conv_s2d import make_conv_space_to_depth, s2d_input
from kiln.kernels.registry import KernelContext, tactics_for

CASES = [  # (C, O, k, s, pads (t, l, b, r), H, W)
    (3, 16, 6, 2, (2, 2, 2, 2), 20, 20),     # YOLOv5 v6 stem
    (3, 8, 7, 2, (3, 3, 3, 3), 17, 15),      # ResNet stem, odd sizes
    (3, 8, 3, 2, (1, 1, 1, 1), 9, 12),       # kernel not a multiple of the stride
    (4, 8, 4, 4, (0, 0, 1, 1), 13, 11),      # patchify stride 4, asymmetric pads
    (2, 8, 5, 3, (0, 2, 1, 0), 16, 10),      # stride 3
    (3, 8, 8, 8, (0, 0, 0, 0), 16, 24),      # patchify (ViT's 16x16/16 at a smaller size): 192 channels, a GEMM
]


def _ref(x, w, b, k, s, pads):
    xp = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    return F.conv2d(xp, w, b, s)


@pytest.mark.parametrize("case", CASES, ids=[f"c{c[0]}k{c[2]}s{c[3]}" for c in CASES])
def test_matches_strided_conv(case) -> None:
    c, o, k, s, pads, h, w_ = case
    g = torch.Generator().manual_seed(k * 10 + s)
    x = torch.randn(2, c, h, w_, generator=g, dtype=torch.float64)
    w = torch.randn(o, c, k, k, generator=g, dtype=torch.float64)
    b = torch.randn(o, generator=g, dtype=torch.float64)
    attrs = {"stride": [s, s], "pads": list(pads), "dilation": [1, 1], "groups": 1}
    (y,) = make_conv_space_to_depth(attrs, KernelContext())(x, w, b)
    want = _ref(x, w, b, k, s, pads)
    assert y.shape == want.shape
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("after", [False, True])
def test_activation_and_residual(after) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 12, 12, generator=g, dtype=torch.float64)
    w = torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64)
    r = torch.randn(1, 8, 6, 6, generator=g, dtype=torch.float64)
    attrs = {"stride": [2, 2], "pads": [2, 2, 2, 2], "dilation": [1, 1], "groups": 1, "activation": "silu",
             "residual_after_activation": after}
    (y,) = make_conv_space_to_depth(attrs, KernelContext())(x, w, None, r)
    z = _ref(x, w, None, 6, 2, [2] * 4)
    want = F.silu(z) + r if after else F.silu(z + r)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)


def test_wide_inputs_are_refused() -> None:
    attrs = {"stride": [2, 2], "pads": [0, 0, 0, 0], "dilation": [1, 1], "groups": 1}
    run = make_conv_space_to_depth(attrs, KernelContext(layer_name="down"))
    with pytest.raises(BuildError, match="space-to-depth.*'down'|'down'.*space-to-depth"):
        run(torch.randn(1, 32, 8, 8), torch.randn(8, 32, 1, 1))


def test_offered_for_strided_dense_convs_on_the_gpu_only() -> None:
    def names(attrs, device):
        return [t.name for t in tactics_for("Convolution", attrs, KernelContext(device=device, precision="fp16"))]
    base = {"stride": [2, 2], "pads": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1}
    assert "space_to_depth" in names(base, "cuda")
    assert "space_to_depth" not in names(base, "cpu")
    assert "space_to_depth" not in names({**base, "stride": [1, 1]}, "cuda")
    assert "space_to_depth" not in names({**base, "groups": 2}, "cuda")
    assert "space_to_depth" not in names({**base, "dilation": [2, 2]}, "cuda")
    # the direct convolution stays first where nothing is timed (CPU builds, optimization level 0)
    assert names(base, "cuda")[0] != "space_to_depth"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_epilogue_path(dtype) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 64, 64, generator=g).to("cuda", dtype)
    w = (0.1 * torch.randn(32, 3, 6, 6, generator=g)).to("cuda", dtype)
    b = torch.randn(32, generator=g).to("cuda", dtype)
    attrs = {"stride": [2, 2], "pads": [2, 2, 2, 2], "dilation": [1, 1], "groups": 1, "activation": "silu"}
    (y,) = make_conv_space_to_depth(attrs, KernelContext(device="cuda", precision="fp16"))(x, w, b)
    want = F.silu(F.conv2d(x.float(), w.float(), b.float(), 2, 2))
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert float((y.float() - want).norm() / want.norm()) < (3e-3 if dtype == torch.float16 else 1e-2)


@pytest.mark.parametrize("case", CASES, ids=[f"c{c[0]}k{c[2]}s{c[3]}" for c in CASES])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_regrouping_matches_torch(case, layout) -> None:
    pytest.importorskip("triton")
    c, _, k, s, pads, h, w_ = case
    x = torch.randn(2, c, h, w_, generator=torch.Generator().manual_seed(s))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    got = s2d_input(x.to(dev), s, k, k, list(pads), use_triton=True).cpu()
    want = s2d_input(x, s, k, k, list(pads), use_triton=False)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want)
