"""The implicit-GEMM convolution with its fused epilogue (kernels/conv_triton.py), through Triton's
interpreter on the CPU (compiled on a GPU), against torch's conv2d + bias + activation (+ residual).

The interpreter multiplies FP32 and FP16 tiles but not BF16 ones, so BF16 is covered by the sm_90
compile check and the GPU tests only.
"""
from __future__ import annotations

import os
import textwrap

import pytest

from _sm90_probe import run_probe
import torch
import torch.nn.functional as F

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":                      # Triton's interpreter runs the kernel on the CPU; on a GPU it compiles
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from kiln.errors import BuildError  # noqa: E402
from kiln.kernels.conv_triton import ConvConfig, arrange_weight, conv2d_nhwc, default_config  # noqa: E402
from kiln.kernels.epilogue_triton import ACTS  # noqa: E402
from kiln.kernels.registry import KernelContext, get_tactic, tactics_for  # noqa: E402

CL = torch.channels_last
REF = {
    "none": lambda v: v, "relu": F.relu, "silu": F.silu, "sigmoid": torch.sigmoid, "hard_swish": F.hardswish,
    "hard_sigmoid": lambda v: torch.clamp(0.2 * v + 0.5, 0, 1), "gelu": F.gelu,
    "leaky_relu": lambda v: F.leaky_relu(v, 0.1), "tanh": torch.tanh, "clip": lambda v: torch.clamp(v, -0.5, 0.7),
}
PARAMS = {"hard_sigmoid": (0.2, 0.5), "leaky_relu": (0.1, 0.0), "clip": (-0.5, 0.7)}
TINY = ConvConfig(16, 16, 16, 4, 2, 2)      # many small tiles: masks, ragged edges and the GROUP_M order
FP32_TOL = 1e-5 if DEV == "cpu" else 5e-3   # a GPU multiplies FP32 tiles (and torch's reference) in TF32


def _inputs(n, cin, h, w, cout, k, residual_shape=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).to(DEV, dtype).contiguous(memory_format=CL)
    wt = (torch.randn(cout, cin, *k, generator=g) / (cin * k[0] * k[1]) ** 0.5).to(DEV, dtype)
    b = torch.randn(cout, generator=g).to(DEV, dtype)
    r = None
    if residual_shape is not None:
        r = torch.randn(residual_shape, generator=g).to(DEV, dtype).contiguous(memory_format=CL)
    return x, wt, b, r


def _ref(x, w, b, r, stride, pads, dil, act, after):
    xp = F.pad(x.float(), (pads[1], pads[3], pads[0], pads[2]))
    v = F.conv2d(xp, w.float(), b.float(), stride, 0, dil)
    if r is not None and not after:
        v = v + r.float()
    v = REF[act](v)
    if r is not None and after:
        v = v + r.float()
    return v


def _check(x, w, b, r, stride=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1), act="none", after=False, config=default_config,
           tol=FP32_TOL):
    alpha, beta = PARAMS.get(act, (0.0, 0.0))
    y = conv2d_nhwc(x, arrange_weight(w), b, r, stride, pads, dil, act, alpha, beta, after, config)
    ref = _ref(x, w, b, r, stride, pads, dil, act, after)
    assert y.shape == ref.shape and y.dtype == x.dtype and y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)


# name: (N, Cin, H, W, Cout, kernel, stride, pads (top, left, bottom, right), dilation, activation, residual)
CASES = {
    "1x1": (2, 16, 5, 5, 24, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), "silu", None),
    "1x1_s2": (2, 16, 7, 7, 16, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), "relu", None),
    "3x3_s1_p1": (2, 16, 6, 6, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "relu", "before"),
    "3x3_s2_p1": (2, 24, 7, 7, 40, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), "silu", "after"),
    "6x6_s2_p2": (1, 8, 9, 9, 16, (6, 6), (2, 2), (2, 2, 2, 2), (1, 1), "silu", None),
    "3x3_dil2": (2, 8, 7, 7, 8, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), "gelu", None),
    "ragged": (1, 24, 5, 7, 20, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "hard_swish", "after"),
    "asym_pads": (2, 8, 6, 5, 16, (3, 2), (2, 1), (1, 0, 2, 1), (1, 1), "leaky_relu", "before"),
}


@pytest.mark.parametrize("config", [TINY, default_config], ids=["tiny_tiles", "default"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(case, config):
    n, cin, h, w, cout, k, stride, pads, dil, act, res = CASES[case]
    oh = (h + pads[0] + pads[2] - dil[0] * (k[0] - 1) - 1) // stride[0] + 1
    ow = (w + pads[1] + pads[3] - dil[1] * (k[1] - 1) - 1) // stride[1] + 1
    x, wt, b, r = _inputs(n, cin, h, w, cout, k, (n, cout, oh, ow) if res else None)
    _check(x, wt, b, r, stride, pads, dil, act, res == "after", config)


@pytest.mark.parametrize("act", ACTS)
def test_every_activation(act):
    x, w, b, r = _inputs(2, 8, 4, 4, 16, (1, 1), (2, 16, 4, 4), seed=ACTS.index(act))
    _check(x, w, b, r, act=act, after=ACTS.index(act) % 2 == 1)


@pytest.mark.parametrize("k", [(1, 1), (3, 3)])
def test_fp16_accumulates_in_fp32(k):
    pads = (k[0] // 2,) * 4
    x, w, b, r = _inputs(2, 64, 5, 5, 32, k, (2, 32, 5, 5), dtype=torch.float16)
    _check(x, w, b, r, pads=pads, act="silu", after=True, tol=1e-2)


def test_nchw_input_is_converted():
    x, w, b, _ = _inputs(1, 16, 5, 5, 8, (3, 3))
    _check(x.contiguous(), w, b, None, pads=(1, 1, 1, 1), act="relu")


def test_refuses_channels_not_a_multiple_of_8():
    x, w, b, _ = _inputs(1, 3, 8, 8, 16, (6, 6))
    with pytest.raises(BuildError, match="multiples of 8"):
        conv2d_nhwc(x, arrange_weight(w), b, None, (2, 2), (2, 2, 2, 2))


def _attrs(**kw):
    a = {"stride": [1, 1], "pads": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1, "activation": "silu",
         "alpha": 0.0, "beta": 0.0}
    a.update(kw)
    return a


def test_tactic_runs_without_bias_and_on_meta():
    attrs = _attrs(stride=[2, 2], residual=True, residual_after_activation=True)
    run = get_tactic("Convolution", "triton_igemm").make(attrs, KernelContext(device=DEV, precision="fp16"))
    x, w, _, r = _inputs(2, 16, 7, 7, 24, (3, 3), (2, 24, 4, 4), dtype=torch.float16)
    (y,) = run(x, w, None, r)
    ref = F.silu(F.conv2d(x.float(), w.float(), None, 2, 1)) + r.float()
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)
    assert y.is_contiguous(memory_format=CL)
    (y2,) = run(x, w, None, r)                      # the rearranged weight and zero bias are cached
    assert torch.equal(y, y2)
    (m,) = run(x.to("meta"), w.to("meta"), None, r.to("meta"))
    assert m.is_meta and m.shape == (2, 24, 4, 4)
    x3, w3, _, _ = _inputs(1, 3, 8, 8, 16, (3, 3), dtype=torch.float16)
    with pytest.raises(BuildError, match="multiples of 8"):      # YOLO's 3-channel stem: another tactic
        run(x3, w3)


def test_supports_only_2d_ungrouped_half_precision():
    names = {"triton_igemm", "triton_igemm_wide", "triton_igemm_small"}

    def offered(attrs, precision="fp16"):
        ctx = KernelContext(device="cuda", precision=precision)
        return names & {t.name for t in tactics_for("Convolution", attrs, ctx)}

    assert offered(_attrs()) == names
    assert offered(_attrs(), "bf16") == names
    assert offered(_attrs(pads=[1, 0, 2, 1], activation=None)) == names
    assert not offered(_attrs(), "fp32")
    assert not offered(_attrs(groups=2))
    assert not offered(_attrs(stride=[1], pads=[1, 1], dilation=[1]))
    assert not offered(_attrs(activation="gelu_tanh"))
    assert not names & {t.name for t in tactics_for("Convolution", _attrs(), KernelContext(device="cpu",
                                                                                             precision="fp16"))}


# ---- compiled for Hopper without a GPU ----------------------------------------------------------

_SM90_PROBE = textwrap.dedent("""
    import json, re, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from sm90_compile import Recorder, compile_sm90
    import kiln.kernels.conv_triton as ct

    real, log, names = ct._conv_kernel, [], []
    ct._conv_kernel = Recorder(real, log)
    CL = torch.channels_last
    # (name, Cin, Cout, kernel, stride, pads, residual, config)
    cases = [("1x1", 128, 128, 1, 1, 0, None, ct.default_config(16 * 6400, 128, 128)),
             ("3x3", 64, 128, 3, 1, 1, "after", ct.default_config(16 * 6400, 128, 64)),
             ("3x3_s2", 64, 128, 3, 2, 1, None, ct.default_config(16 * 1600, 128, 64)),
             ("wide", 256, 256, 3, 1, 1, "before", ct.wide_config(16 * 1600, 256, 256)),
             ("small", 512, 512, 3, 1, 1, None, ct.small_config(400, 512, 512)),
             ("cin24", 24, 64, 3, 1, 1, None, ct.default_config(16 * 6400, 64, 24))]
    for dtype in (torch.float16, torch.bfloat16):
        for name, cin, cout, k, s, p, res, cfg in cases:
            x = torch.zeros(2, cin, 10, 10, dtype=dtype).contiguous(memory_format=CL)
            w = torch.zeros(cout, cin, k, k, dtype=dtype)
            oh = (10 + 2 * p - k) // s + 1
            r = torch.zeros(2, cout, oh, oh, dtype=dtype).contiguous(memory_format=CL) if res else None
            ct.conv2d_nhwc(x, ct.arrange_weight(w), torch.zeros(cout, dtype=dtype), r, (s, s), (p,) * 4,
                           act="silu", residual_after=res == "after", config=cfg)
            names.append(f"{name}_{str(dtype)[6:]}")
    out = {}
    for name, (fn, grid, args, kwargs) in zip(names, log):
        ptx = compile_sm90(real, args, kwargs).asm["ptx"]
        out[name] = {"wgmma": "wgmma.mma_async" in ptx, "cp_async": "cp.async" in ptx,
                     "st": sorted(set(re.findall(r"st\\.global\\.[\\w.]+", ptx)))}
    print(json.dumps(out))
""")


def test_kernel_compiles_for_sm90_with_wgmma():
    """Compiled for an H100 without one (FP16 and BF16; 1×1 and k×k; each tile table): the tiles
    stream through cp.async into shared memory and multiply on Hopper's wgmma tensor cores."""
    out = run_probe(_SM90_PROBE)
    assert len(out) == 12, out
    for name, info in out.items():
        assert info["wgmma"] and info["cp_async"], (name, info)
        assert info["st"], (name, info)


# ---- on a GPU, at the sizes that show up in YOLOv5 and ResNet-50 ---------------------------------

GPU_CASES = {
    "yolo_1x1": (16, 128, 80, 80, 64, (1, 1), (1, 1), (0, 0, 0, 0), "silu", None),
    "yolo_3x3_after": (16, 64, 80, 80, 64, (3, 3), (1, 1), (1, 1, 1, 1), "silu", "after"),
    "yolo_3x3_s2": (16, 128, 80, 80, 256, (3, 3), (2, 2), (1, 1, 1, 1), "silu", None),
    "resnet_1x1_res": (32, 256, 14, 14, 1024, (1, 1), (1, 1), (0, 0, 0, 0), "relu", "before"),
    "batch1_head": (1, 512, 20, 20, 512, (3, 3), (1, 1), (1, 1, 1, 1), "silu", None),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tactic", ["triton_igemm", "triton_igemm_wide", "triton_igemm_small"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_matches_torch(case, tactic, dtype):
    n, cin, h, w, cout, k, stride, pads, act, res = GPU_CASES[case]
    oh, ow = (h + 2 * pads[0] - k[0]) // stride[0] + 1, (w + 2 * pads[1] - k[1]) // stride[1] + 1
    x, wt, b, r = _inputs(n, cin, h, w, cout, k, (n, cout, oh, ow) if res else None, dtype=dtype)
    attrs = _attrs(stride=list(stride), pads=list(pads), activation=act, residual=res is not None,
                   residual_after_activation=res == "after")
    precision = "fp16" if dtype == torch.float16 else "bf16"
    (y,) = get_tactic("Convolution", tactic).make(attrs, KernelContext(device="cuda", precision=precision))(
        x, wt, b, r)
    ref = _ref(x, wt, b, r, stride, pads, (1, 1), act, res == "after")
    err = float((y.float() - ref).norm() / ref.norm())
    assert err < (2e-3 if dtype == torch.float16 else 1e-2), err


@pytest.mark.parametrize("k,stride,pads", [((1, 1), (1, 1), (0, 0, 0, 0)), ((3, 3), (2, 2), (1, 1, 1, 1))])
def test_writes_into_a_concatenation_slice(k, stride, pads) -> None:
    """With ``out``, the output lands in channels [3, 3+Cout) of a wider channels-last buffer and
    nothing else of the buffer changes (runtime/concat_elision.py)."""
    x, w, b, _ = _inputs(2, 16, 6, 5, 8, k, seed=3)
    oh, ow = (6 + pads[0] + pads[2] - k[0]) // stride[0] + 1, (5 + pads[1] + pads[3] - k[1]) // stride[1] + 1
    buf = torch.full((2, oh, ow, 13), 7.0, device=DEV).permute(0, 3, 1, 2)
    y = conv2d_nhwc(x, arrange_weight(w), b, None, stride, pads, (1, 1), "silu", config=TINY,
                    out=lambda shape, dtype, device: buf[:, 3:3 + shape[1]])
    assert y.data_ptr() == buf[:, 3:].data_ptr()
    want = _ref(x, w, b, None, stride, pads, (1, 1), "silu", False)
    torch.testing.assert_close(buf[:, 3:11], want, rtol=FP32_TOL, atol=FP32_TOL)
    assert bool((buf[:, :3] == 7).all()) and bool((buf[:, 11:] == 7).all())


def test_alternative_tile_tables_are_timed_only_at_high_levels():
    from kiln.builder.tactics import at_level
    attrs = {"stride": [1, 1], "pads": [0, 0, 0, 0], "dilation": [1, 1], "groups": 1, "activation": "silu"}
    cands = tactics_for("Convolution", attrs, KernelContext(device="cuda", precision="fp16"))
    names3 = [t.name for t in at_level(cands, 3)]
    names5 = [t.name for t in at_level(cands, 5)]
    assert "triton_igemm" in names3 and "triton_igemm_wide" not in names3 and "triton_igemm_small" not in names3
    assert {"triton_igemm", "triton_igemm_wide", "triton_igemm_small"} <= set(names5)


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["relu", None])
def test_cublaslt_1x1_matches_torch(act):
    """The 1×1-as-GEMM tactic: channels-last in and out, bias + ReLU in the GEMM's epilogue."""
    x, w, b, _ = _inputs(4, 64, 14, 14, 128, (1, 1), dtype=torch.float16)
    attrs = _attrs(pads=[0, 0, 0, 0], activation=act)
    (y,) = get_tactic("Convolution", "cublaslt_1x1").make(attrs, KernelContext(device="cuda", precision="fp16"))(x, w, b)
    ref = F.conv2d(x.float(), w.float(), b.float())
    ref = F.relu(ref) if act else ref
    assert y.is_contiguous(memory_format=CL) and y.shape == ref.shape
    assert float((y.float() - ref).norm() / ref.norm()) < 2e-3
