"""The Triton pooling tactic (kernels/pool_triton.py), through Triton's interpreter on the CPU
(compiled on a GPU), against torch.nn.functional's max_pool2d / avg_pool2d."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":                      # Triton's interpreter runs the kernel on the CPU; on a GPU it compiles
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from kiln.kernels.pool_triton import (  # noqa: E402
    _vec,
    global_pool,
    global_pool_launch_config,
    make_pooling_triton,
    pool2d,
    pool_launch_config,
)
from kiln.kernels.registry import KernelContext, tactics_for  # noqa: E402

CL = torch.channels_last


def _attrs(ptype, kernel, stride=None, pads=None, dilation=None, ceil_mode=False, count_include_pad=False):
    return {"type": ptype, "kernel": kernel, "stride": stride or list(kernel or []), "pads": pads or [0, 0, 0, 0],
            "dilation": dilation or [1, 1], "ceil_mode": ceil_mode, "count_include_pad": count_include_pad, "p": 2}


def _run(attrs, x):
    (y,) = make_pooling_triton(attrs, KernelContext(device=DEV))(x)
    return y


def _input(shape, seed, channels_last, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(DEV, dtype)
    return x.contiguous(memory_format=CL) if channels_last else x


def _reference(x, a):
    """torch's own pooling on an FP32 NCHW copy; asymmetric pads spelled out with F.pad."""
    x = x.float().contiguous()
    k, s, d = a["kernel"], a["stride"], a["dilation"]
    top, left, bottom, right = a["pads"]
    # torch's own padding is symmetric and at most half the window
    symmetric = (top, left) == (bottom, right) and top <= k[0] // 2 and left <= k[1] // 2
    torch_pad = (left, right, top, bottom)
    if a["type"] == "max":
        if symmetric:
            return F.max_pool2d(x, k, s, (top, left), d, a["ceil_mode"])
        return F.max_pool2d(F.pad(x, torch_pad, value=float("-inf")), k, s, 0, d, a["ceil_mode"])
    if symmetric:
        return F.avg_pool2d(x, k, s, (top, left), a["ceil_mode"], a["count_include_pad"])
    total = F.avg_pool2d(F.pad(x, torch_pad), k, s, 0, a["ceil_mode"], divisor_override=1)
    ones = torch.ones_like(x[:1, :1])
    cells = F.pad(ones, torch_pad, value=1.0 if a["count_include_pad"] else 0.0)
    return total / F.avg_pool2d(cells, k, s, 0, a["ceil_mode"], divisor_override=1)


WINDOWS = {
    "3x3_s2_p1": dict(kernel=[3, 3], stride=[2, 2], pads=[1, 1, 1, 1]),
    "5x5_s1_p2": dict(kernel=[5, 5], stride=[1, 1], pads=[2, 2, 2, 2]),
    "2x2_s2": dict(kernel=[2, 2], stride=[2, 2]),
    "3x3_s2_ceil": dict(kernel=[3, 3], stride=[2, 2], pads=[1, 1, 1, 1], ceil_mode=True),
    "2x3_s21_ceil": dict(kernel=[2, 3], stride=[2, 1], pads=[0, 1, 0, 1], ceil_mode=True),
    "asym_pads": dict(kernel=[3, 2], stride=[2, 1], pads=[0, 1, 2, 0]),
    "asym_pads_ceil": dict(kernel=[3, 3], stride=[2, 2], pads=[0, 1, 1, 0], ceil_mode=True),
}


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("c", [3, 24])
def test_max_pool_matches_torch(window, channels_last, c):
    a = _attrs("max", **WINDOWS[window])
    x = _input((1, c, 9, 7), seed=c, channels_last=channels_last)
    y = _run(a, x)
    ref = _reference(x, a)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    torch.testing.assert_close(y, ref.to(DEV), rtol=0, atol=0)


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("include_pad", [True, False], ids=["with_pad", "without_pad"])
def test_average_pool_matches_torch(window, channels_last, include_pad):
    a = _attrs("average", count_include_pad=include_pad, **WINDOWS[window])
    x = _input((1, 24, 8, 9), seed=7, channels_last=channels_last)
    y = _run(a, x)
    ref = _reference(x, a)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref.to(DEV), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_dilated_max_pool(channels_last):
    a = _attrs("max", [3, 3], [1, 2], [2, 1, 2, 1], dilation=[2, 2])
    x = _input((1, 3, 10, 9), seed=11, channels_last=channels_last)
    torch.testing.assert_close(_run(a, x), _reference(x, a).to(DEV), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ptype", ["max", "average"])
def test_half_precision_inputs(dtype, ptype):
    """Max is exact in any dtype; the average sums in FP32 and rounds once."""
    a = _attrs(ptype, [3, 3], [2, 2], [1, 1, 1, 1])
    x = _input((2, 24, 7, 7), seed=3, channels_last=True, dtype=dtype)
    y = _run(a, x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    ref = _reference(x, a).to(dtype).to(DEV)
    if ptype == "max":
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    else:
        torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_max_pool_propagates_nan(channels_last):
    x = _input((1, 3, 6, 6), seed=5, channels_last=False)
    x[0, 0, 2, 3] = float("nan")
    x[0, 2, 0, 0] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=CL)
    a = _attrs("max", [3, 3], [2, 2], [1, 1, 1, 1])
    y = _run(a, x)
    ref = F.max_pool2d(x.float().cpu(), 3, 2, 1)
    assert y.isnan().any()
    torch.testing.assert_close(y.cpu(), ref, rtol=0, atol=0, equal_nan=True)
    g = _run(_attrs("max", None), x)
    assert g[0, 0].isnan().all() and g[0, 2].isnan().all() and not g[0, 1].isnan().any()


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("shape", [(2, 24, 7, 7), (3, 5, 4, 13)])
def test_global_pools(channels_last, shape):
    x = _input(shape, seed=shape[1], channels_last=channels_last)
    avg = _run(_attrs("average", None), x)
    assert avg.shape == (shape[0], shape[1], 1, 1)
    torch.testing.assert_close(avg, x.mean(dim=(2, 3), keepdim=True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_run(_attrs("max", None), x), x.amax(dim=(2, 3), keepdim=True), rtol=0, atol=0)
    # a window over the whole map takes the same path
    whole = _run(_attrs("average", list(shape[2:])), x)
    torch.testing.assert_close(whole, F.avg_pool2d(x, shape[2:]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("config", [(1, 1, 1), (4, 2, 1), (16, 8, 2)])
def test_launch_config_overrides(channels_last, config):
    """Any block shape gives the same result: ragged pixel and channel blocks are masked."""
    x = _input((1, 6, 5, 6), seed=9, channels_last=channels_last)
    y = pool2d(x, (3, 3), (2, 2), (1, 1, 1, 1), ptype="average", count_include_pad=False, config=config)
    torch.testing.assert_close(y, F.avg_pool2d(x, 3, 2, 1, count_include_pad=False), rtol=1e-5, atol=1e-6)
    g = global_pool(x, "average", config=config)
    torch.testing.assert_close(g, x.mean(dim=(2, 3), keepdim=True), rtol=1e-5, atol=1e-6)


def test_strided_view_input():
    """A view with no standard layout is read through its strides."""
    x = _input((2, 8, 12, 10), seed=13, channels_last=False)[:, 1:6, ::2, 1:]
    a = _attrs("max", [2, 2], [1, 1], [0, 0, 1, 1])
    torch.testing.assert_close(_run(a, x), _reference(x, a).to(DEV), rtol=0, atol=0)
    torch.testing.assert_close(_run(_attrs("average", None), x), x.mean(dim=(2, 3), keepdim=True),
                               rtol=1e-5, atol=1e-6)


def test_inputs_the_kernel_does_not_cover_take_torch():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.int32).reshape(2, 3, 6, 6).to(DEV)
    a = _attrs("max", [2, 2], [2, 2])
    torch.testing.assert_close(_run(a, x), F.max_pool2d(x.float(), 2, 2).to(torch.int32))


def test_launch_configs_are_powers_of_two():
    for n, c, hw, cl in [(256, 64, 56 * 56, True), (1, 3, 7, True), (16, 512, 400, False), (1, 1, 1, False)]:
        for cfg in (pool_launch_config(n, c, hw, cl), global_pool_launch_config(n, c, hw, cl)):
            assert all(v > 0 and v & (v - 1) == 0 for v in cfg)
    block_p, block_c, _ = pool_launch_config(256, 64, 56 * 56, True)
    assert block_c == 64                      # channels-last: the whole channel row per pixel


def test_tactic_is_listed_on_cuda_only():
    a = _attrs("max", [3, 3], [2, 2], [1, 1, 1, 1])
    cuda = [t.name for t in tactics_for("Pooling", a, KernelContext(device="cuda", input_dtypes=("float16",)))]
    assert "triton_nhwc" in cuda and cuda[0] == "torch"          # torch stays the reference
    assert "triton_nhwc" in [t.name for t in tactics_for("Pooling", _attrs("average", None),
                                                         KernelContext(device="cuda"))]
    cpu = [t.name for t in tactics_for("Pooling", a, KernelContext(device="cpu", input_dtypes=("float32",)))]
    assert "triton_nhwc" not in cpu
    for attrs, dtypes in [({**a, "type": "lp"}, ("float16",)), ({**a, "return_indices": True}, ("float16",)),
                          (a, ("int8",)), (_attrs("max", [2, 2, 2]), ("float16",))]:
        names = [t.name for t in tactics_for("Pooling", attrs, KernelContext(device="cuda", input_dtypes=dtypes))]
        assert "triton_nhwc" not in names


def test_vector_width_divides_channels_and_pixel_strides():
    assert _vec(64, 64 * 112 * 112, 112 * 64, 64) == 16
    assert _vec(24, 24 * 49, 7 * 24, 24) == 8
    assert _vec(3, 3 * 49, 21, 3) == 1
    assert _vec(64, 64 * 49, 7, 1) == 1           # NCHW: pixels are not whole vectors


_SM90_PROBE = textwrap.dedent(r"""
    import json, re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kiln.kernels.pool_triton import _kernels, _vec

    def build(fn, dtypes, consts, ints, warps):
        sig = {a: "i32" for a in fn.arg_names}
        sig.update(dtypes)
        for k, v in list(ints.items()):
            if v == 1:                      # what triton's launcher does with ints equal to 1
                consts[k] = 1
        sig.update({k: "constexpr" for k in consts})
        shapes = ("P", "H", "W", "Ho", "Wo", "HW")          # the kernels' do_not_specialize
        div = [a for a in fn.arg_names if a.endswith("_ptr")
               or (a not in shapes and ints.get(a, 1) != 1 and ints[a] % 16 == 0)]
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div}
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps))
        return {"ld": sorted(set(re.findall(r"ld\.global[.\w]*", k.asm["ptx"]))),
                "st": sorted(set(re.findall(r"st\.global[.\w]*", k.asm["ptx"]))),
                "layouts": [ln for ln in k.asm["ttgir"].splitlines() if ln.startswith("#blocked")]}

    pool, gpool = _kernels()
    out = {}
    for name, cl, c in [("nhwc64", True, 64), ("nhwc24", True, 24), ("nchw64", False, 64)]:
        h, ho = 56, 28
        xs = (c * h * h, 1, h * c, c) if cl else (c * h * h, h * h, h, 1)
        ys = (c * ho * ho, 1, ho * c, c) if cl else (c * ho * ho, ho * ho, ho, 1)
        ints = dict(zip(["P", "C", "H", "W", "Ho", "Wo", "sxn", "sxc", "sxh", "sxw", "syn", "syc", "syh", "syw"],
                        (8 * ho * ho, c, h, h, ho, ho) + xs + ys))
        consts = dict(KH=3, KW=3, SH=2, SW=2, PT=1, PL=1, PB=1, PR=1, DH=1, DW=1, MAX=True, INCLUDE_PAD=False,
                      VEC=_vec(c, xs[0], xs[2], xs[3], ys[0], ys[2], ys[3]), BLOCK_P=32 if cl else 256,
                      BLOCK_C=64 if cl else 4)
        out[name] = build(pool, {"x_ptr": "*fp16", "y_ptr": "*fp16"}, consts, ints, 4)
    ints = dict(C=2048, HW=49, sxn=2048 * 49, sxc=1, shw=2048, syn=2048, syc=1)
    out["gap"] = build(gpool, {"x_ptr": "*fp16", "y_ptr": "*fp16"},
                       dict(MAX=False, VEC=16, BLOCK_HW=32, BLOCK_C=64), ints, 4)
    print(json.dumps(out))
""")


def test_kernels_compile_for_sm90_with_wide_coalesced_access():
    """Compiled for an H100 without one: channels-last tiles load and store 16 bytes per thread
    (8 fp16 channels), NCHW tiles put a warp's 32 threads along pixels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SM90_PROBE], capture_output=True, text=True, env=env, timeout=300)
    if res.returncode != 0:
        pytest.skip(f"Triton cannot compile for sm_90 here: {res.stderr.strip().splitlines()[-1:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for name in ("nhwc64", "nhwc24", "gap"):
        assert out[name]["ld"] == ["ld.global.v4.b32"], (name, out[name])
    for name in ("nhwc64", "nhwc24"):
        assert out[name]["st"] == ["st.global.v4.b32"], (name, out[name])
    assert any("threadsPerWarp = [32, 1]" in ln for ln in out["nchw64"]["layouts"]), out["nchw64"]


# ---- on a GPU, at the sizes that show up in profiles -------------------------------------------

GPU_CASES = {
    "resnet_stem_max": ((64, 64, 112, 112), _attrs("max", [3, 3], [2, 2], [1, 1, 1, 1])),
    "sppf_max": ((16, 512, 20, 20), _attrs("max", [5, 5], [1, 1], [2, 2, 2, 2])),
    "avg_3x3_ceil": ((32, 256, 35, 35), _attrs("average", [3, 3], [2, 2], [1, 1, 1, 1], ceil_mode=True)),
    "avg_3x3_s1": ((32, 192, 35, 35), _attrs("average", [3, 3], [1, 1], [1, 1, 1, 1], count_include_pad=True)),
    "resnet_gap": ((256, 2048, 7, 7), _attrs("average", None)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_gpu_matches_torch(case, dtype, channels_last):
    shape, a = GPU_CASES[case]
    x = torch.randn(shape, device="cuda").to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    y = _run(a, x)
    if a["kernel"] is None:
        ref = x.float().mean(dim=(2, 3), keepdim=True).to(dtype)
    elif a["type"] == "max":
        ref = F.max_pool2d(x, a["kernel"], a["stride"], a["pads"][:2], 1, a["ceil_mode"])
    else:
        ref = F.avg_pool2d(x, a["kernel"], a["stride"], a["pads"][:2], a["ceil_mode"], a["count_include_pad"])
    assert y.shape == ref.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    if a["type"] == "max":
        assert torch.equal(y, ref)
    else:
        torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_nan_propagates_like_torch():
    x = torch.randn(4, 64, 28, 28, device="cuda", dtype=torch.float16).contiguous(memory_format=CL)
    x[1, 5, 3, 4] = float("nan")
    x[2, 63, 27, 27] = float("nan")
    a = _attrs("max", [3, 3], [2, 2], [1, 1, 1, 1])
    torch.testing.assert_close(_run(a, x), F.max_pool2d(x, 3, 2, 1), rtol=0, atol=0, equal_nan=True)
