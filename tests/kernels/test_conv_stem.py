"""The stem kernel (kernels/conv_stem.py): first convolution read straight from NCHW (FP32 or FP16),
bias + activation fused, optionally ResNet's 3×3/2 max pool too; through Triton's interpreter on
the CPU (compiled on a GPU), against torch's conv2d + activation + max_pool2d in FP32."""
from __future__ import annotations

import os
import textwrap

import pytest

from _sm90_probe import run_probe
import torch
import torch.nn.functional as F

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from kiln.errors import BuildError  # noqa: E402
from kiln.kernels.conv_stem import arrange_stem_weight, conv_stem  # noqa: E402
from kiln.kernels.registry import KernelContext, get_tactic, tactics_for  # noqa: E402

CL = torch.channels_last
ACT = {"relu": F.relu, "silu": F.silu, "hard_swish": F.hardswish, "none": lambda v: v}


def _case(n, c, h, w, cout, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(DEV, dtype)
    wt = (torch.randn(cout, c, k, k, generator=g) / (c * k * k) ** 0.5).to(DEV, torch.float16)
    b = torch.randn(cout, generator=g).to(DEV, torch.float16)
    return x, wt, b


def _ref(x, w, b, stride, pads, act, pool):
    v = F.conv2d(F.pad(x.float(), (pads[1], pads[3], pads[0], pads[2])), w.float(), b.float(), stride)
    v = ACT[act](v)
    return F.max_pool2d(v, 3, 2, 1) if pool else v


# name: (N, C, H, W, Cout, k, stride, pads, activation, pool)
CASES = {
    # ResNet's stem, pooled, over several 7×7-output tiles with a ragged last row and column of tiles
    "resnet_pool": (2, 3, 62, 70, 16, 7, 2, (3, 3, 3, 3), "relu", True),
    "resnet_nopool": (1, 3, 21, 18, 16, 7, 2, (3, 3, 3, 3), "relu", False),
    "yolo_6x6": (2, 3, 20, 20, 24, 6, 2, (2, 2, 2, 2), "silu", False),
    "mobilenet_3x3": (1, 3, 17, 15, 16, 3, 2, (1, 1, 1, 1), "hard_swish", False),
    "one_channel_asym": (1, 1, 13, 11, 8, 5, 2, (1, 2, 2, 1), "none", False),
    "pool_no_act": (1, 4, 30, 30, 8, 3, 2, (1, 1, 1, 1), "none", True),   # negative maxima: the pool pads with -inf
}


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(case, in_dtype, layout):
    n, c, h, w, cout, k, s, pads, act, pool = CASES[case]
    x, wt, b = _case(n, c, h, w, cout, k, seed=len(case), dtype=in_dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=CL)
    y = conv_stem(x, arrange_stem_weight(wt), b, (k, k), (s, s), pads, act, pool=pool)
    ref = _ref(x, wt, b, (s, s), pads, act, pool)
    assert y.shape == ref.shape and y.dtype == torch.float16 and y.is_contiguous(memory_format=CL)
    err = float((y.float() - ref).norm() / ref.norm())
    assert err < 2e-3, err


def test_writes_pooled_map_into_a_concatenation_slice():
    x, w, b = _case(1, 3, 30, 26, 8, 7)
    buf = torch.full((1, 8, 7, 13), 5.0, device=DEV, dtype=torch.float16).permute(0, 3, 1, 2)
    y = conv_stem(x, arrange_stem_weight(w), b, (7, 7), (2, 2), (3, 3, 3, 3), "relu", pool=True,
                  out=lambda shape, dtype, device: buf[:, 2:2 + shape[1]])
    assert y.data_ptr() == buf[:, 2:].data_ptr()
    ref = _ref(x, w, b, (2, 2), (3, 3, 3, 3), "relu", True)
    torch.testing.assert_close(buf[:, 2:10].float(), ref, rtol=2e-3, atol=2e-3)
    assert bool((buf[:, :2] == 5).all()) and bool((buf[:, 10:] == 5).all())


def _attrs(**kw):
    a = {"stride": [2, 2], "pads": [3, 3, 3, 3], "dilation": [1, 1], "groups": 1, "activation": "relu",
         "alpha": 0.0, "beta": 0.0}
    a.update(kw)
    return a


def test_tactic_fp32_input_pool_bias_free_and_meta():
    """Through the registry as the builder runs it: the FP32 engine input (its cast moved into the
    stem), no bias, a fused pool; on meta tensors for shape inference; wide inputs refused."""
    pool = {"kernel": [3, 3], "stride": [2, 2], "pads": [1, 1, 1, 1]}
    run = get_tactic("Convolution", "triton_stem").make(_attrs(pool=pool), KernelContext(device=DEV, precision="fp16"))
    x, w, _ = _case(2, 3, 33, 35, 16, 7, seed=4)
    (y,) = run(x, w)
    ref = _ref(x, w, torch.zeros(16, device=DEV), (2, 2), (3, 3, 3, 3), "relu", True)
    torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=2e-3)
    (m,) = run(x.to("meta"), w.to("meta"))
    assert m.is_meta and m.shape == ref.shape and m.dtype == torch.float16
    wide, ww, _ = _case(1, 16, 9, 9, 8, 3)
    with pytest.raises(BuildError, match="at most 4 input channels"):
        run(wide, ww)


@pytest.mark.parametrize("name", ["torch", "cudnn_fused", "triton_epilogue", "space_to_depth", "triton_stem"])
def test_every_tactic_reads_fp32_and_pools(name):
    """Whatever tactic the builder picks for a pooled stem fed the FP32 input gives the same values
    (the igemm tactic refuses 3 channels, not a multiple of 8; tested in test_conv_triton.py)."""
    if DEV == "cpu" and name in ("cudnn_fused", "triton_epilogue"):
        pytest.skip("cuDNN tactics need a GPU")
    pool = {"kernel": [3, 3], "stride": [2, 2], "pads": [1, 1, 1, 1]}
    fn = get_tactic("Convolution", name).make(_attrs(pool=pool), KernelContext(device=DEV, precision="fp16"))
    x, w, b = _case(1, 3, 30, 30, 16, 7, seed=5)
    (y,) = fn(x, w, b)
    ref = _ref(x, w, b, (2, 2), (3, 3, 3, 3), "relu", True)
    assert y.shape == ref.shape and y.dtype == torch.float16
    torch.testing.assert_close(y.float(), ref, rtol=3e-3, atol=3e-3)


def test_offered_for_half_precision_2d_convs_on_the_gpu():
    ctx = KernelContext(device="cuda", precision="fp16")
    names = {t.name for t in tactics_for("Convolution", _attrs(), ctx)}
    assert "triton_stem" in names
    assert "triton_stem" not in {t.name for t in tactics_for("Convolution", _attrs(), KernelContext(
        device="cuda", precision="fp32"))}
    assert "triton_stem" not in {t.name for t in tactics_for("Convolution", _attrs(residual=True), ctx)}
    odd_pool = {"kernel": [2, 2], "stride": [2, 2], "pads": [0, 0, 0, 0]}
    assert "triton_stem" not in {t.name for t in tactics_for("Convolution", _attrs(pool=odd_pool), ctx)}


_SM90_PROBE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from sm90_compile import Recorder, compile_sm90
    import kiln.kernels.conv_stem as cs
    log = []
    for name in ("_stem_kernel", "_stem_pool_kernel", "_stem_pad_kernel"):
        setattr(cs, name, Recorder(getattr(cs, name), log))
    for dtype in (torch.float32, torch.float16):
        for pool in (True, False):
            x = torch.zeros(2, 3, 224, 224, dtype=dtype)
            w = torch.zeros(64, 3, 7, 7, dtype=torch.float16)
            cs.conv_stem(x, cs.arrange_stem_weight(w), torch.zeros(64, dtype=torch.float16), (7, 7), (2, 2),
                         (3, 3, 3, 3), "relu", pool=pool)
    out = []
    for fn, grid, args, kwargs in log:
        ptx = compile_sm90(fn, args, kwargs).asm["ptx"]
        out.append({"wgmma": "wgmma.mma_async" in ptx, "st": "st.global" in ptx, "v16": "ld.global.v4" in ptx or "cp.async.cg" in ptx})
    print(json.dumps(out))
""")


def test_kernels_compile_for_sm90_with_wgmma():
    out = run_probe(_SM90_PROBE)
    # the padded input's kernel-row runs load as 16-byte vectors (the point of the padded copy)
    assert len(out) == 8 and all(o["st"] for o in out), out
    assert [o["wgmma"] for o in out] == [False, True] * 4 and all(o["v16"] for o in out[1::2]), out


@pytest.mark.gpu
@pytest.mark.parametrize("pool", [True, False])
def test_gpu_resnet_stem_full_size(pool):
    x, w, b = _case(8, 3, 224, 224, 64, 7, seed=9)
    y = conv_stem(x, arrange_stem_weight(w), b, (7, 7), (2, 2), (3, 3, 3, 3), "relu", pool=pool)
    ref = _ref(x, w, b, (2, 2), (3, 3, 3, 3), "relu", pool)
    err = float((y.float() - ref).norm() / ref.norm())
    assert y.shape == ref.shape and err < 2e-3, err


def test_wide_pool_tiles_match_torch():
    """16×32 convolution patches per program (7×15 pooled outputs, less halo recomputed)."""
    from kiln.kernels.conv_stem import StemConfig
    x, w, b = _case(1, 3, 70, 90, 16, 7, seed=11)
    y = conv_stem(x, arrange_stem_weight(w), b, (7, 7), (2, 2), (3, 3, 3, 3), "relu", pool=True,
                  config=StemConfig(tile_w=32))
    ref = _ref(x, w, b, (2, 2), (3, 3, 3, 3), "relu", True)
    assert y.shape == ref.shape and float((y.float() - ref).norm() / ref.norm()) < 2e-3
