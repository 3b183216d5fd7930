"""The TMA-fed 8-bit GEMM and convolution (kiln/kernels/int8_tma.py): their numerics under TRITON_INTERPRET
(which runs tensor descriptors) against the float64 evaluation of the Q/DQ arithmetic and against the pointer
kernel (plain, persistent, 3x3 with padding), what they refuse, the layers and devices their tactics are
offered for, their sm_90 code (TMA copies and 8-bit wgmma, compiled without a GPU) and, on a GPU, the tactics
at real layer shapes."""
from __future__ import annotations


import ml_dtypes
import numpy as np
import pytest

from _sm90_probe import run_probe
import torch
from test_int8_kernels import _attrs, _check_codes, _ref64

import kiln.kernels.int8_gemm as ig
from kiln.errors import BuildError
from kiln.kernels import KernelContext, get_tactic, tactics_for
from kiln.triton_support import HAS_TRITON, interpreting

needs_triton = pytest.mark.skipif(not HAS_TRITON or not interpreting(),
                                  reason="runs the Triton kernels in TRITON_INTERPRET mode")


@pytest.fixture
def tma_launches(monkeypatch) -> list[bool]:
    """What each launch_tma or launch_tma_conv call returned (False: it left the layer to the pointer kernel)."""
    import kiln.kernels.int8_tma as it
    calls: list[bool] = []
    for name in ("launch_tma", "launch_tma_conv"):
        launch = getattr(it, name)
        monkeypatch.setattr(it, name, lambda *a, launch=launch, **k: calls.append(launch(*a, **k)) or calls[-1])
    return calls


def _run(kind, tactic, attrs, ins, dtypes):
    ctx = KernelContext(device="cpu", input_dtypes=dtypes)
    return get_tactic(kind, tactic).make(attrs, ctx)(*ins)


@needs_triton
@pytest.mark.parametrize("xdt,xz", [("int8", -7), ("uint8", 140)])
def test_tma_fully_connected_matches_float64_and_the_pointer_kernel(xdt, xz, tma_launches):
    """M = 15 and K = 48 leave partial tiles (the copies zero-fill them), N = 32 is narrower than the tile."""
    rng = np.random.default_rng(1)
    x = (rng.integers(-128, 128, (3, 5, 48)) + xz + 7).astype(xdt)
    w = rng.integers(-127, 128, (32, 48)).astype(np.int8)
    ws = (rng.uniform(0.5, 2.0, 32) * 1e-2).astype(np.float32)
    bias = rng.integers(-3000, 3000, 32).astype(np.int32)
    y64 = _ref64(x, 0.02, xz, w, ws, bias, None, "relu")
    scale = float(np.float32(y64.max() / 300))
    attrs = _attrs(ws, x_scale=0.02, x_zero_point=xz, to="int8", activation="relu", out_scale=scale,
                   out_zero_point=-100)
    ins = [torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias)]
    got = _run("QFullyConnected", "triton_int8_tma", attrs, ins, (xdt, "int8", "int32"))[0]
    assert got.shape == (3, 5, 32) and tma_launches == [True]
    _check_codes(got.numpy(), y64, scale, -100, -128, 127)
    assert (got == 127).any() and (got == -100).any()      # saturation and the ReLU floor were exercised
    # the same int32 sums and the same epilogue: the pointer kernel's codes exactly
    assert torch.equal(got, _run("QFullyConnected", "triton_int8", attrs, ins, (xdt, "int8", "int32"))[0])


@needs_triton
@pytest.mark.parametrize("split", [0, 1, 2])
def test_tma_1x1_conv_with_codes_residual_and_a_second_codes_output(split, tma_launches):
    """A 1x1 convolution over channels-last codes as the GEMM of its 30 pixel rows: the residual (codes) read and
    the float output and its codes written through descriptors. ``split`` 0 runs the tactic (its default tiles);
    1 and 2 run 16x32 tiles (two row tiles, a partial column tile) with the epilogue whole or in two halves."""
    from kiln.kernels.int8_tma import TmaConfig
    rng = np.random.default_rng(2)
    x = rng.integers(-128, 128, (2, 32, 5, 3)).astype(np.int8)
    w = rng.integers(-127, 128, (48, 32, 1, 1)).astype(np.int8)
    ws = (rng.uniform(0.5, 2.0, 48) * 1e-3).astype(np.float32)
    bias = rng.integers(-20000, 20000, 48).astype(np.int32)
    r = rng.integers(-128, 128, (2, 48, 5, 3)).astype(np.int8)
    conv = {"stride": (1, 1), "padding": 0}
    y64 = _ref64(x, 0.05, 0, w, ws, bias, conv, "relu", (r.astype(np.float64) - 4) * 0.03)
    attrs = _attrs(ws, stride=[1, 1], pads=[0, 0, 0, 0], dilation=[1, 1], groups=1, activation="relu",
                   to="float16", residual_scale=0.03, residual_zero_point=4, codes_to="int8", codes_scale=0.02,
                   codes_zero_point=1)
    cl = torch.channels_last
    ins = [torch.from_numpy(x).contiguous(memory_format=cl), torch.from_numpy(w), torch.from_numpy(bias),
           torch.from_numpy(r).contiguous(memory_format=cl)]
    if split:
        out, second, rcodes = ig.layer_outputs(attrs)
        ep = ig.epilogue_terms(attrs, ins[1], ins[2], ins[0].dtype)
        y, q = ig.qgemm(ins[0], ig.k_major(ins[1]), ep, out, ins[3], "relu", geometry=ig.Geometry(),
                        config=TmaConfig(16, 32, 32, 4, 2, split=split), residual_codes=rcodes, codes=second)
    else:
        y, q = _run("QConvolution", "triton_int8_tma", attrs, ins, ("int8", "int8", "int32", "int8"))
    assert tma_launches == [True]
    assert y.dtype == torch.float16 and y.is_contiguous(memory_format=cl) and q.is_contiguous(memory_format=cl)
    np.testing.assert_allclose(y.float().numpy(), y64, rtol=1e-3, atol=1e-3 * np.abs(y64).max())
    want_q = np.clip(np.rint(y.float().numpy().astype(np.float64) / np.float32(0.02)) + 1, -128, 127)
    assert np.abs(q.numpy() - want_q).max() <= 1 and np.mean(q.numpy() == want_q) > 0.99
    y2, q2 = _run("QConvolution", "triton_int8", attrs, ins, ("int8", "int8", "int32", "int8"))
    assert torch.equal(y, y2) and torch.equal(q, q2)


@needs_triton
@pytest.mark.parametrize("codes", ["int8", "float8_e4m3fn"])
def test_tma_persistent_kernel_walks_every_tile(codes, monkeypatch):
    """The persistent kernel on 3 programs over 12 and 14 tiles (grouped order, the epilogue whole or in halves,
    codes residual): the pointer kernel's codes exactly. Its tile loop runs a runtime trip count: Triton's
    interpreter turns a scalar argument into a one-element array, which ``range`` cannot take under NumPy 2, so
    the test lets the interpreter's tensors index as their single element."""
    import triton.runtime.interpreter as interp

    import kiln.kernels.int8_tma as it
    patch = getattr(interp, "_patch_lang_tensor", None)
    if patch is None:
        pytest.skip("this Triton's interpreter has no _patch_lang_tensor to extend")

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
    monkeypatch.setattr(interp, "_patch_lang_tensor", patched)
    monkeypatch.setattr(it, "_sm_count", lambda device: 3)
    g = torch.Generator().manual_seed(5)
    if codes == "int8":
        x = torch.randint(-128, 128, (100, 64), generator=g, dtype=torch.int8)
        w = torch.randint(-127, 128, (96, 64), generator=g, dtype=torch.int8)
    else:
        x = (torch.randn(100, 64, generator=g) * 20).to(torch.float8_e4m3fn)
        w = (torch.randn(96, 64, generator=g) * 20).to(torch.float8_e4m3fn)
    ep = ig.Epilogue(torch.randint(-1000, 1000, (96,), generator=g, dtype=torch.int32), torch.rand(96, generator=g)
                     * 1e-3, 0)
    r = torch.randint(-128, 128, (100, 96), generator=g, dtype=torch.int8)
    out, rc = ig.Codes(torch.int8, 0.05, 3), ig.Codes(torch.float32, 0.1, 1)
    want = ig.qgemm(x, w, ep, out, r, "relu", config=ig.QGemmConfig(32, 32, 32, 4, 2), residual_codes=rc)
    assert np.unique(want.numpy()).size > 50
    for cfg in (it.TmaConfig(32, 32, 32, 4, 2, group_m=2, persistent=True),
                it.TmaConfig(16, 64, 32, 4, 2, split=2, persistent=True)):
        assert torch.equal(ig.qgemm(x, w, ep, out, r, "relu", config=cfg, residual_codes=rc), want), cfg


@needs_triton
def test_tma_fp8_fully_connected_writes_fp8_codes(tma_launches):
    rng = np.random.default_rng(3)
    e4m3 = ml_dtypes.float8_e4m3fn
    x = (rng.standard_normal((6, 64)) * 60).astype(e4m3)
    w = (rng.standard_normal((32, 64)) * 100).astype(e4m3)
    ws = (rng.uniform(0.5, 2.0, 32) * 1e-3).astype(np.float32)
    bias = rng.integers(-50000, 50000, 32).astype(np.int32)
    y64 = _ref64(x.astype(np.float64), 0.01, 0, w.astype(np.float64), ws, bias, None)
    scale = float(np.float32(np.abs(y64).max() / 300))
    attrs = _attrs(ws, x_scale=0.01, to="float8_e4m3fn", out_scale=scale)
    ins = [torch.from_numpy(x.view(np.uint8)).view(torch.float8_e4m3fn),
           torch.from_numpy(w.view(np.uint8)).view(torch.float8_e4m3fn), torch.from_numpy(bias)]
    dt = ("float8_e4m3fn", "float8_e4m3fn", "int32")
    got = _run("QFullyConnected", "triton_fp8_tma", attrs, ins, dt)[0].float().numpy().astype(np.float64)
    assert tma_launches == [True]
    want = (y64 / scale).clip(-448, 448).astype(np.float32).astype(e4m3).astype(np.float64)
    grid = np.sort(np.unique(np.arange(256, dtype=np.uint8).view(e4m3).astype(np.float64)))
    grid = grid[np.isfinite(grid)]
    assert np.isin(got, grid).all()
    assert np.abs(np.searchsorted(grid, got) - np.searchsorted(grid, want)).max() <= 1
    assert np.mean(got == want) > 0.95


CONV3_CASES = [  # (x codes, x zero point, Cin, pads, dilation, tile config)
    ("int8", 0, 32, (1, 1, 1, 1), (1, 1), None),
    ("int8", 0, 32, (2, 1, 2, 1), (2, 1), (16, 32, 32, 4, 2, 0, 2, False, False, 4)),
    ("uint8", 0, 48, (1, 1, 1, 1), (1, 1), (16, 32, 32, 4, 2, 8, 1, False, False, 8)),   # a partial K slice
    ("int8", -5, 32, (0, 0, 0, 0), (1, 1), (16, 32, 32, 4, 2)),        # unpadded: any zero point
]


@needs_triton
@pytest.mark.parametrize("xdt,xz,cin,pads,dil,cfg", CONV3_CASES)
def test_tma_3x3_conv_matches_float64_and_the_pointer_kernel(xdt, xz, cin, pads, dil, cfg, tma_launches):
    """A stride-1 3x3 convolution on 4-D descriptors: the tap-shifted input boxes zero-filled at the borders are the
    padding (zero point 0), pixel tiles run past the 5x6 map's edges (the stores clip them), a K slice past Cin
    reads the next tap's weights against zero-filled channels (uint8 codes: zeroed after their shift)."""
    from kiln.kernels.int8_tma import TmaConfig
    rng = np.random.default_rng(4)
    lo, hi = (0, 255) if xdt == "uint8" else (-128, 127)
    x = rng.integers(lo, hi + 1, (2, cin, 5, 6)).astype(xdt)
    w = rng.integers(-127, 128, (32, cin, 3, 3)).astype(np.int8)
    ws = (rng.uniform(0.5, 2.0, 32) * 1e-3).astype(np.float32)
    bias = rng.integers(-20000, 20000, 32).astype(np.int32)
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])),
                    constant_values=xz)
    y64 = _ref64(padded, 0.05, xz, w, ws, bias, {"stride": (1, 1), "padding": 0, "dilation": dil}, "relu")
    scale = float(np.float32(np.abs(y64).max() / 100))
    attrs = _attrs(ws, x_zero_point=xz, to="int8", activation="relu", out_scale=scale, out_zero_point=3,
                   stride=[1, 1], pads=list(pads), dilation=list(dil), groups=1)
    ins = [torch.from_numpy(x).contiguous(memory_format=torch.channels_last), torch.from_numpy(w),
           torch.from_numpy(bias)]
    dt = (xdt, "int8", "int32")
    if cfg is None:
        got = _run("QConvolution", "triton_int8_tma", attrs, ins, dt)[0]
    else:
        out, _, _ = ig.layer_outputs(attrs)
        got = ig.qgemm(ins[0], ig.k_major(ins[1]), ig.epilogue_terms(attrs, ins[1], ins[2], ins[0].dtype), out,
                       act="relu", geometry=ig.Geometry(3, 3, (1, 1), pads, dil), config=TmaConfig(*cfg))
    assert tma_launches == [True] and got.shape == y64.shape
    _check_codes(got.numpy(), y64, scale, 3, -128, 127)
    assert torch.equal(got, _run("QConvolution", "triton_int8", attrs, ins, dt)[0])


@needs_triton
def test_tma_conv_refuses_strides_padding_with_a_zero_point_and_the_persistent_kernel():
    from kiln.kernels.int8_tma import TmaConfig, persistent_config, pixel_tile
    x = torch.zeros(1, 16, 6, 6, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(16, 9 * 16, dtype=torch.int8)
    cfg = TmaConfig(16, 16, 16, 4, 2)
    for zp, stride, pads, config, why in (
            (0, (2, 2), (1,) * 4, cfg, "it is strided"),
            (3, (1, 1), (1,) * 4, cfg, "its padding must read the input's nonzero zero point"),
            (0, (1, 1), (0,) * 4, persistent_config, "the persistent kernel runs plain GEMMs only")):
        ep = ig.Epilogue(torch.zeros(16, dtype=torch.int32), torch.ones(16), zp)
        with pytest.raises(BuildError, match=f"^The TMA 8-bit convolution cannot run this layer: {why}; the pointer "
                                             f"kernel runs it\\.$"):
            ig.qgemm(x, w, ep, ig.Codes(torch.int8, 0.1), geometry=ig.Geometry(3, 3, stride, pads, (1, 1)),
                     config=config)
    # the pixel block that wastes least: 56 = 28 x 2 rows by one 64-wide column (as little as any), 7 x 7 in 8 x 8
    assert [(pixel_tile(hw, hw, px), px // pixel_tile(hw, hw, px)) for hw, px in ((56, 128), (28, 128), (7, 64))] == \
        [(64, 2), (32, 4), (8, 8)]


@needs_triton
def test_unaligned_shapes_are_refused_and_unaligned_views_run_the_pointer_kernel(tma_launches):
    """K = 40 codes (rows of 40 bytes) cannot be addressed by TMA: a BuildError, which the builder's timing turns
    into an invalid tactic. A tensor whose base is off 16 bytes (a view) runs the pointer kernel instead."""
    from kiln.kernels.int8_tma import TmaConfig, launch_tma, tma_refusal
    assert tma_refusal(40, 32, (1,)) == "K = 40 is not a multiple of 16"
    assert tma_refusal(48, 20, (1,)) == "N = 20 times 1 bytes is not a multiple of 16"
    assert tma_refusal(48, 20, (4,)) is None
    assert tma_refusal(48, 24, (2, 1)) == "N = 24 times 1 bytes is not a multiple of 16"
    ws = np.full(32, 1e-3, np.float32)
    attrs = _attrs(ws, to="int8", out_scale=0.1)
    with pytest.raises(BuildError, match=r"^The TMA 8-bit GEMM needs rows of 16-byte multiples: K = 40 is not a "
                                         r"multiple of 16; the pointer kernel runs this layer\.$"):
        _run("QFullyConnected", "triton_int8_tma", attrs, [torch.zeros(4, 40, dtype=torch.int8),
             torch.zeros(32, 40, dtype=torch.int8), torch.zeros(32, dtype=torch.int32)], ("int8", "int8", "int32"))
    g = torch.Generator().manual_seed(0)
    flat = torch.randint(-128, 128, (1 + 9 * 32,), generator=g, dtype=torch.int8)
    x = flat[1:].view(9, 32)                                    # base one byte past an aligned one
    w = torch.randint(-127, 128, (16, 32), generator=g, dtype=torch.int8)
    ep = ig.Epilogue(torch.zeros(16, dtype=torch.int32), torch.full((16,), 1e-3), 0)
    y = torch.empty(9, 16, dtype=torch.int8)
    assert not launch_tma(x, w, y, None, None, ep, TmaConfig(32, 16, 32, 4, 2), {})
    got = ig.qgemm(x, w, ep, ig.Codes(torch.int8, 0.05), config=TmaConfig(32, 16, 32, 4, 2))
    assert tma_launches == [False, False]       # the direct call, then qgemm's
    want = torch.clamp(torch.round((x.long() @ w.long().T).double() * np.float32(1e-3) / np.float32(0.05)), -128, 127)
    assert torch.equal(got.long(), want.long())


def test_tma_tactics_are_offered_on_hopper_for_gemms_and_stride1_convolutions(monkeypatch):
    """Offered (at the levels that time the alternative tile tables) on a CUDA device of compute capability 9.0
    or later, for fully connected layers and stride-1 convolutions of the matching code type (padded ones where
    the input's zero point is 0, and not to the persistent kernel); not on older GPUs, the CPU, strided or
    grouped convolutions."""
    import kiln.kernels.int8_tma as it
    ws = np.ones(4, np.float32)
    fc = _attrs(ws, to="int8", out_scale=0.1)
    conv = {**fc, "stride": [1, 1], "pads": [0, 0, 0, 0], "dilation": [1, 1], "groups": 1}

    def names(kind, attrs, device="cuda", codes="int8"):
        ctx = KernelContext(device=device, input_dtypes=(codes, codes, "int32"))
        return {t.name for t in tactics_for(kind, attrs, ctx) if "tma" in t.name}

    tma = {"triton_int8_tma", "triton_int8_tma_persistent"}
    monkeypatch.setattr(it, "hopper", lambda: True)
    if HAS_TRITON:
        assert names("QFullyConnected", fc) == tma and names("QConvolution", conv) == tma
        assert names("QFullyConnected", fc, codes="uint8") == tma
        assert names("QFullyConnected", fc, codes="float8_e4m3fn") == {"triton_fp8_tma", "triton_fp8_tma_persistent"}
    assert names("QConvolution", {**conv, "stride": [2, 2]}) == set()
    if HAS_TRITON:      # padded: the implicit GEMM where padding reads zero codes, never the persistent GEMM
        assert names("QConvolution", {**conv, "pads": [1, 1, 1, 1]}) == {"triton_int8_tma"}
    assert names("QConvolution", {**conv, "pads": [1, 1, 1, 1], "x_zero_point": 3}) == set()
    assert names("QConvolution", {**conv, "groups": 2}) == set()
    assert names("QFullyConnected", fc, device="cpu") == set()
    monkeypatch.setattr(it, "hopper", lambda: False)
    assert names("QFullyConnected", fc) == set()


def test_hopper_reads_the_device_capability(monkeypatch):
    import kiln.kernels.int8_tma as it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for cap, want in (((8, 9), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, cap=cap: cap)
        assert it.hopper() is want
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert it.hopper() is False


_SM90_PROBE = """
import json, re, sys
sys.path.insert(0, sys.argv[1])
import torch
from sm90_compile import Recorder, compile_sm90
from kiln.triton_support import load_triton
load_triton()               # the kernels as Triton's JITFunctions, which the recorders wrap
import kiln.kernels.int8_gemm as ig
import kiln.kernels.int8_tma as it

log = []
it._qgemm_tma_kernel = Recorder(it._qgemm_tma_kernel, log)
it._sm_count = lambda device: 132
ep = lambda n: ig.Epilogue(torch.zeros(n, dtype=torch.int32), torch.ones(n), 0)
cl = torch.channels_last
ig.qgemm(torch.zeros(4096, 768, dtype=torch.int8), torch.zeros(3072, 768, dtype=torch.int8), ep(3072),
         ig.Codes(torch.int8, 0.1), act="gelu", config=it.tma_config)
ig.qgemm(torch.zeros(4096, 768, dtype=torch.float8_e4m3fn), torch.zeros(768, 768, dtype=torch.float8_e4m3fn), ep(768),
         ig.Codes(torch.float8_e4m3fn, 0.1), config=it.persistent_config)
ig.qgemm(torch.zeros(8, 64, 56, 56, dtype=torch.uint8).contiguous(memory_format=cl),
         torch.zeros(256, 64, dtype=torch.int8), ep(256), ig.Codes(torch.float16),
         torch.zeros(8, 256, 56, 56, dtype=torch.int8).contiguous(memory_format=cl), "relu", geometry=ig.Geometry(),
         config=it.persistent_config, residual_codes=ig.Codes(torch.float32, 0.1, 2),
         codes=ig.Codes(torch.int8, 0.2, 1))
it._qconv_tma_kernel = Recorder(it._qconv_tma_kernel, log)
ig.qgemm(torch.zeros(32, 64, 56, 56, dtype=torch.int8).contiguous(memory_format=cl),
         torch.zeros(64, 9 * 64, dtype=torch.int8), ep(64), ig.Codes(torch.int8, 0.1), act="relu",
         geometry=ig.Geometry(3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), config=it.tma_config)
out = {}
for name, (fn, grid, args, kwargs) in zip(["fc_int8", "fc_fp8_persistent", "conv1x1_uint8_persistent",
                                           "conv3x3_int8"], log):
    k = compile_sm90(fn, args, kwargs)
    ptx = k.asm["ptx"]
    out[name] = [bool(k.asm["cubin"]), k.metadata.shared <= 232448, "st.global" in ptx,
                 sorted(set(re.findall(r"cp[.]async[.]bulk[.]tensor[.]([24]d[.][a-z:]+[.][a-z:]+)", ptx))),
                 sorted(set(re.findall(r"wgmma[.]mma_async[.]sync[.]aligned[.][a-z0-9]+[.]"
                                       r"([a-z0-9]+[.][a-z0-9]+[.][a-z0-9]+)", ptx)))]
print(json.dumps(out))
"""


def test_tma_kernels_compile_to_hopper_bulk_copies_and_8bit_wgmma():
    """Compiled for sm_90 (no GPU needed): every A/B slice is a TMA load (global -> shared), every output and
    codes store a TMA store (shared -> global, no per-thread global stores), the products 8-bit wgmma (int32 or
    FP32 accumulation), within Hopper's shared memory; plain, persistent, with the residual and a second codes
    output, and the 3x3 convolution's 4-D input and output boxes."""
    pytest.importorskip("triton")
    out = run_probe(_SM90_PROBE)
    copies = ["2d.global.shared::cta", "2d.shared::cluster.global"]      # stores (shared -> global), loads
    conv = ["2d.shared::cluster.global", "4d.global.shared::cta", "4d.shared::cluster.global"]     # NHWC boxes
    assert out == {"fc_int8": [True, True, False, copies, ["s32.s8.s8"]],
                   "fc_fp8_persistent": [True, True, False, copies, ["f32.e4m3.e4m3"]],
                   "conv1x1_uint8_persistent": [True, True, False, copies, ["s32.s8.s8"]],
                   "conv3x3_int8": [True, True, False, conv, ["s32.s8.s8"]]}


# ---- on the GPU: both TMA tactics against the reference tactic at real layer shapes ------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("codes", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("tactic", ["tma", "tma_persistent"])
def test_gpu_tma_tactics_match_the_reference(codes, tactic, monkeypatch):
    """BERT's FFN1 (4096 x 768 -> 3072, GELU, codes out), ResNet's expanding 1x1 (codes residual, float16 out
    with its codes) and (not persistent) a padded 3x3, the persistent kernel walking several tiles per SM."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs compute capability 9.0 or later")
    fp8 = codes == "float8_e4m3fn"
    name = f"triton_{'fp8' if fp8 else 'int8'}_{tactic}"
    g = torch.Generator(device="cpu").manual_seed(0)

    def codes_of(shape, scale):
        t = torch.randn(shape, generator=g) * scale
        return (t.to(torch.float8_e4m3fn) if fp8 else t.round().clamp(-128, 127).to(torch.int8)).to("cuda")

    cases = [("QFullyConnected", codes_of((4096, 768), 30), codes_of((3072, 768), 40), None,
              _attrs(np.full(3072, 2e-4, np.float32), to=codes, out_scale=0.02, activation="gelu")),
             ("QConvolution", codes_of((32, 64, 56, 56), 30).contiguous(memory_format=torch.channels_last),
              codes_of((256, 64, 1, 1), 40),
              codes_of((32, 256, 56, 56), 30).contiguous(memory_format=torch.channels_last),
              _attrs(np.full(256, 4e-4, np.float32), to="float16", activation="relu", residual_scale=0.05,
                     codes_to=codes, codes_scale=0.02, stride=[1, 1], pads=[0, 0, 0, 0], dilation=[1, 1], groups=1))]
    if tactic == "tma":         # ResNet's 3x3 64 -> 64 at 56x56, padded
        cases.append(("QConvolution", codes_of((32, 64, 56, 56), 30).contiguous(memory_format=torch.channels_last),
                      codes_of((64, 64, 3, 3), 40), None,
                      _attrs(np.full(64, 2e-4, np.float32), to=codes, out_scale=0.02, activation="relu",
                             stride=[1, 1], pads=[1, 1, 1, 1], dilation=[1, 1], groups=1)))
    for kind, x, w, r, attrs in cases:
        bias = torch.randint(-5000, 5000, (w.shape[0],), generator=g, dtype=torch.int32).to("cuda")
        ctx = KernelContext(device="cuda", layer_name=kind, input_dtypes=(codes, codes, "int32"))
        assert name in {t.name for t in tactics_for(kind, attrs, ctx)}
        ins = [x, w, bias] + ([r] if r is not None else [])
        with torch.inference_mode():
            want = get_tactic(kind, "reference").make(attrs, ctx)(*ins)
            got = get_tactic(kind, name).make(attrs, ctx)(*ins)
            ptr = get_tactic(kind, f"triton_{'fp8' if fp8 else 'int8'}").make(attrs, ctx)(*ins)
        for a, b, p in zip(got, want, ptr):
            if not fp8 and not a.dtype.is_floating_point:   # the same int32 sums and rounding: the same codes
                assert torch.equal(a, p), name
            elif not fp8:           # float16 out: the compiler may contract the epilogue's multiply-adds differently
                step = p.float().abs().clamp_min(2.0 ** -14) * 2.0 ** -10
                off = (a.float() - p.float()).abs() > step
                assert not bool(off.any()), f"{name}: {int(off.sum())} float16 values beyond one step of the pointer kernel's"
            is_codes = not a.dtype.is_floating_point or a.dtype == torch.float8_e4m3fn
            a, b = a.float(), b.float()
            rel = float((a - b).norm() / b.norm())
            if not is_codes:
                assert rel < 2e-3, name
            elif fp8:               # FP32 accumulation order: a value near a rounding boundary may move a code
                assert rel < 1e-2 and float((a == b).float().mean()) > 0.95, name
            else:
                assert float((a - b).abs().max()) <= 1 and float((a == b).float().mean()) > 0.99, name
