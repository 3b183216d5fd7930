"""ModulatedDeformConv2d (DCNv2) against ONNX Runtime's DeformConv (opset 19) and torchvision."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.errors import PluginError
from kiln.plugins import TensorDesc, registry
from kiln.plugins.builtin.deform_conv import ModulatedDeformConv2d, deform_conv_fields

TACTICS = ("torch", "triton", "triton_fused")


def _case(seed, n, c, h, w, oc, k, group=1, og=1, stride=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), bias=True,
          mask=True, scale=1.5):
    g = np.random.default_rng(seed)
    kh, kw = k
    oh = (h + pads[0] + pads[2] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + pads[1] + pads[3] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    arrays = {
        "X": g.standard_normal((n, c, h, w)).astype(np.float32),
        "W": (g.standard_normal((oc, c // group, kh, kw)) * 0.3).astype(np.float32),
        # offsets large enough to leave the image and cross pixel borders
        "offset": (g.standard_normal((n, og * kh * kw * 2, oh, ow)) * scale).astype(np.float32),
        "B": g.standard_normal(oc).astype(np.float32) if bias else None,
        "mask": g.uniform(0, 1, (n, og * kh * kw, oh, ow)).astype(np.float32) if mask else None,
    }
    attrs = dict(dilations=list(dil), group=group, kernel_shape=[kh, kw], offset_group=og, pads=list(pads),
                 strides=list(stride))
    return arrays, attrs


CASES = {
    "3x3-pad1-bias-mask": dict(seed=0, n=2, c=4, h=6, w=7, oc=6, k=(3, 3)),
    "stride2-dil2-asym-pads-plain": dict(seed=1, n=1, c=3, h=8, w=9, oc=5, k=(3, 3), stride=(2, 2),
                                         pads=(1, 0, 2, 1), dil=(2, 2), bias=False, mask=False),
    "groups-offset-groups-mask-no-bias": dict(seed=2, n=2, c=4, h=5, w=5, oc=4, k=(3, 3), group=2, og=2,
                                              bias=False),
    "2x3-kernel-stride-1x2": dict(seed=3, n=1, c=2, h=6, w=8, oc=3, k=(2, 3), stride=(1, 2), pads=(0, 1, 1, 0)),
    "fusable-32ch": dict(seed=4, n=2, c=32, h=5, w=4, oc=16, k=(3, 3)),
    "fusable-32ch-2-offset-groups": dict(seed=5, n=1, c=32, h=4, w=5, oc=20, k=(3, 3), og=2, scale=3.0),
    # conv groups of 2 channels against offset groups of 3: group 1 straddles two offset groups
    "groups-straddle-offset-groups-dil2": dict(seed=7, n=1, c=6, h=5, w=6, oc=6, k=(3, 3), group=3, og=2,
                                               dil=(2, 1), pads=(2, 1, 2, 1)),
}


def _onnx_inputs(arrays):
    names = ["X", "W", "offset", "B", "mask"]
    while arrays[names[-1]] is None:
        names.pop()
    return [(nm if arrays[nm] is not None else "", arrays[nm]) for nm in names]


@pytest.mark.parametrize("tactic", TACTICS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_onnxruntime(ref, case, tactic):
    arrays, attrs = _case(**CASES[case])
    (want,) = ref.onnx("DeformConv", 19, _onnx_inputs(arrays), ["Y"], **attrs)
    plugin = ModulatedDeformConv2d(**ModulatedDeformConv2d.onnx_fields(attrs, 19))
    ins = ref.dev(arrays["X"], arrays["W"], arrays["offset"], arrays["B"], arrays["mask"])
    (got,) = ref.run(plugin, ins, tactic)
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tactic", TACTICS)
@pytest.mark.parametrize("case", ["3x3-pad1-bias-mask", "groups-offset-groups-mask-no-bias", "fusable-32ch"])
def test_matches_torchvision(ref, case, tactic):
    tv = pytest.importorskip("torchvision")
    arrays, attrs = _case(**CASES[case])
    x, w, off, b, m = ref.dev(arrays["X"], arrays["W"], arrays["offset"], arrays["B"], arrays["mask"])
    want = tv.ops.deform_conv2d(x, off, w, b, stride=attrs["strides"], padding=attrs["pads"][:2],
                                dilation=attrs["dilations"], mask=m)
    (got,) = ref.run(ModulatedDeformConv2d(**deform_conv_fields(attrs, 19)), [x, w, off, b, m], tactic)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tactic", ("triton", "triton_fused"))
def test_float16(ref, tactic):
    arrays, attrs = _case(**CASES["fusable-32ch"])
    ins = ref.dev(arrays["X"], arrays["W"], arrays["offset"], arrays["B"], arrays["mask"])
    plugin = ModulatedDeformConv2d(**deform_conv_fields(attrs, 19))
    (want,) = ref.run(plugin, ins, "torch")
    (got,) = ref.run(plugin, [t.half() for t in ins], tactic)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


# The implicit GEMM with explicit (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): several pixel and
# channel tiles (partial ones, a partial GROUP_M band), offset-group segments aligned or not with the
# conv groups and BLOCK_K, chunks masked where channels do not fill BLOCK_K.
FUSED_CONFIG_CASES = {
    "2-offset-groups-even-chunks": (dict(seed=8, n=2, c=32, h=5, w=6, oc=24, k=(3, 3), og=2, scale=3.0),
                                    (16, 16, 16, 4, 1)),
    "groups-straddle-offset-groups": (dict(seed=9, n=1, c=24, h=6, w=5, oc=12, k=(3, 3), group=2, og=3, bias=False),
                                      (32, 16, 16, 4, 1)),
    "4-groups-stride2-dil2-plain": (dict(seed=10, n=2, c=32, h=9, w=8, oc=16, k=(3, 3), group=4, og=2, stride=(2, 2),
                                         dil=(2, 2), pads=(2, 2, 2, 2), bias=False, mask=False), (16, 16, 16, 4, 2)),
    "12-pixel-tiles-3-channel-tiles": (dict(seed=11, n=3, c=16, h=7, w=9, oc=40, k=(3, 3), mask=False),
                                       (16, 16, 16, 4, 1)),
    "2-chunks-of-32": (dict(seed=12, n=1, c=64, h=6, w=6, oc=32, k=(3, 3), dil=(2, 2), pads=(2, 2, 2, 2)),
                       (32, 32, 32, 4, 3)),
}


def _fused(plugin, ins, config):
    from kiln.plugins.builtin import deform_conv as dcn

    x, w, off, b, m = ins
    geo = dcn._Geo(plugin, x, w, off, m, w.shape[2], w.shape[3])
    out = torch.full((geo.n, geo.oc, geo.oh, geo.ow), 7.0, dtype=x.dtype, device=x.device)
    dcn._implicit_gemm(plugin, x, w, off, b, m, out, None, geo, config)
    return out


@pytest.mark.parametrize("case", list(FUSED_CONFIG_CASES))
def test_fused_configs_against_torch(ref, case):
    kwargs, config = FUSED_CONFIG_CASES[case]
    arrays, attrs = _case(**kwargs)
    ins = ref.dev(arrays["X"], arrays["W"], arrays["offset"], arrays["B"], arrays["mask"])
    plugin = ModulatedDeformConv2d(**deform_conv_fields(attrs, 19))
    (want,) = ref.run(plugin, ins, "torch")
    torch.testing.assert_close(_fused(plugin, ins, config), want, rtol=1e-4, atol=1e-4)


def test_fused_float16_config(ref):
    kwargs, config = FUSED_CONFIG_CASES["2-offset-groups-even-chunks"]
    arrays, attrs = _case(**kwargs)
    ins = ref.dev(arrays["X"], arrays["W"], arrays["offset"], arrays["B"], arrays["mask"])
    plugin = ModulatedDeformConv2d(**deform_conv_fields(attrs, 19))
    (want,) = ref.run(plugin, ins, "torch")
    got = _fused(plugin, [t.half() for t in ins], config)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("tactic", ("triton", "triton_fused"))
def test_x_and_w_layouts(ref, tactic):
    """X channels-last (used in place), X whose H and W strides do not merge (a crop: torch copies it
    to channels-last), W not contiguous (torch rearranges it)."""
    arrays, attrs = _case(**CASES["fusable-32ch"])
    x, w, off, b, m = ref.dev(arrays["X"], arrays["W"], arrays["offset"], arrays["B"], arrays["mask"])
    plugin = ModulatedDeformConv2d(**deform_conv_fields(attrs, 19))
    (want,) = ref.run(plugin, [x, w, off, b, m], "torch")
    wide = torch.zeros(*x.shape[:3], x.shape[3] + 3, device=x.device)
    wide[..., :x.shape[3]] = x
    w_strided = w.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    for xs, ws in ((x.contiguous(memory_format=torch.channels_last), w), (wide[..., :x.shape[3]], w_strided)):
        (got,) = ref.run(plugin, [xs, ws, off, b, m], tactic)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_workspace_holds_x_copy_and_tap_major_weights(ref):
    """With a 1x1 output the im2col columns are smaller than the rearranged weights, which must still fit."""
    from kiln.plugins.builtin._util import aligned

    plugin = ModulatedDeformConv2d()
    descs = [TensorDesc((1, 16, 3, 3), "float32"), TensorDesc((64, 16, 3, 3), "float32"),
             TensorDesc((1, 18, 1, 1), "float32")]
    assert plugin.workspace_size(descs) >= aligned(16 * 9 * 4) + aligned(64 * 16 * 9 * 4)


def test_small_workspace_processes_images_in_chunks(ref):
    arrays, attrs = _case(**CASES["3x3-pad1-bias-mask"])
    ins = ref.dev(arrays["X"], arrays["W"], arrays["offset"], arrays["B"], arrays["mask"])
    plugin = ModulatedDeformConv2d(**deform_conv_fields(attrs, 19))
    descs = [ref.desc(t) for t in ins]
    full = plugin.workspace_size(descs)
    one_image = 4 * 9 * 6 * 7 * 4
    assert full >= 2 * one_image
    out = torch.empty(2, 6, 6, 7, device=ins[0].device)
    from kiln.plugins.builtin._util import aligned
    x_copy = aligned(ins[0].numel() * 4)           # the channels-last copy of X comes first
    plugin.forward(ins, [out], torch.empty(x_copy + one_image, dtype=torch.uint8, device=ins[0].device), "triton")
    (want,) = ref.run(plugin, ins, "torch")
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_fields_descs_and_errors():
    f = ModulatedDeformConv2d.onnx_fields({"pads": (1, 1, 1, 1), "group": 1}, 19)
    assert f == {"dilations": [1, 1], "group": 1, "kernel_shape": [], "offset_group": 1, "pads": [1, 1, 1, 1],
                 "strides": [1, 1]}
    p = ModulatedDeformConv2d(**f)
    (d,) = p.output_descs([TensorDesc(("N", 256, "H", "W"), "float16"), TensorDesc((128, 256, 3, 3), "float16"),
                           TensorDesc(("N", 18, "H", "W"), "float16")])
    assert d.shape == ("N", 128, "H", "W")
    (d,) = ModulatedDeformConv2d(strides=[2, 2], pads=[1, 1, 1, 1]).output_descs(
        [TensorDesc((1, 8, 64, 64), "float32"), TensorDesc((8, 8, 3, 3), "float32"),
         TensorDesc((1, 18, None, None), "float32")])
    assert d.shape == (1, 8, 32, 32)
    with pytest.raises(PluginError, match="concrete"):
        p.workspace_size([TensorDesc(("N", 256, "H", "W"), "float16"), TensorDesc((128, 256, 3, 3), "float16"),
                          TensorDesc(("N", 18, "H", "W"), "float16")])
    with pytest.raises(PluginError, match="offset needs 18 channels"):
        x = torch.zeros(1, 2, 4, 4)
        p.forward([x, torch.zeros(2, 2, 3, 3), torch.zeros(1, 9, 4, 4)], [torch.zeros(1, 2, 4, 4)], None, "torch")
    assert registry.get("ModulatedDeformConv2d", "kiln", "1") is ModulatedDeformConv2d


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("tactic", ("triton", "triton_fused"))
def test_cuda_realistic_against_torch(ref, dtype, tactic):
    arrays, attrs = _case(seed=6, n=2, c=64, h=24, w=20, oc=64, k=(3, 3), og=2)
    ins = [t.to(dtype) for t in ref.dev(arrays["X"], arrays["W"], arrays["offset"], arrays["B"], arrays["mask"])]
    plugin = ModulatedDeformConv2d(**deform_conv_fields(attrs, 19))
    (want,) = ref.run(plugin, [t.float() for t in ins], "torch")
    (got,) = ref.run(plugin, ins, tactic)
    tol = 2e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
