"""The Triton 8-bit GEMM/implicit-GEMM kernels (kiln/kernels/int8_gemm.py) under TRITON_INTERPRET, and the
reference tactic of the 8-bit layers, against an independent float64 evaluation of the Q/DQ arithmetic they
replace: dequantize, float op, bias, residual, activation, quantize (round half to even, saturate)."""
from __future__ import annotations


import ml_dtypes
import numpy as np
import pytest

from _sm90_probe import run_probe
import torch
import torch.nn.functional as F

from kiln.ir.dtypes import torch_dtype
from kiln.kernels import KernelContext, get_tactic, tactics_for
from kiln.triton_support import HAS_TRITON, interpreting

needs_triton = pytest.mark.skipif(not HAS_TRITON or not interpreting(),
                                  reason="runs the Triton kernels in TRITON_INTERPRET mode")

def _ref64(x, xs, xz, w, ws, bias, conv, act=None, residual=None, after=False):
    """float64 y of the dequantized layer (before requantization)."""
    xf = (x.astype(np.float64) - xz) * xs
    wf = w.astype(np.float64) * ws.reshape([-1] + [1] * (w.ndim - 1))
    bf = bias.astype(np.float64) * (np.float64(np.float32(xs)) * ws.astype(np.float64))
    if conv is not None:
        y = F.conv2d(torch.from_numpy(xf), torch.from_numpy(wf), torch.from_numpy(bf), **conv).numpy()
    else:
        y = xf @ wf.T + bf
    r = 0.0 if residual is None else residual.astype(np.float64)
    y = y if after else y + r
    if act == "relu":
        y = np.maximum(y, 0)
    elif act == "silu":
        y = y / (1 + np.exp(-y))
    return y + r if after else y


def _codes(y, scale, zp, lo, hi):
    return np.clip(np.rint(y / scale) + zp, lo, hi)


def _run(tactic, attrs, device_inputs, input_dtypes):
    ctx = KernelContext(device="cpu", input_dtypes=input_dtypes)
    return get_tactic(attrs.get("_kind", "QConvolution"), tactic).make(
        {k: v for k, v in attrs.items() if k != "_kind"}, ctx)(*device_inputs)[0]


def _attrs(ws, **kw):
    base = {"x_scale": 0.05, "x_zero_point": 0, "w_scale": ws, "out_scale": None, "out_zero_point": 0,
            "to": "float32", "activation": None, "alpha": 0.0, "beta": 0.0, "residual_after_activation": False}
    return {**base, **kw}


def _check_codes(got, y64, scale, zp, lo, hi):
    """8-bit outputs: every code within one step of the float64 answer's, and equal wherever the float64 value
    is not within 1e-3 of a step of a rounding boundary (float32 sums legitimately differ there)."""
    want = _codes(y64, scale, zp, lo, hi)
    got = got.astype(np.float64)
    assert np.abs(got - want).max() <= 1
    frac = np.abs(y64 / scale - np.floor(y64 / scale) - 0.5)
    clear = frac > 1e-3
    assert np.array_equal(got[clear], want[clear])
    assert clear.mean() > 0.9 and np.unique(got).size > 20       # a real spread of codes was compared


CONV_CASES = [  # (x dtype, x zero point, stride, pads, activation, out)
    ("uint8", 131, (1, 1), (1, 1, 1, 1), "relu", "uint8"),
    ("int8", -5, (2, 2), (1, 0, 2, 1), None, "int8"),
    ("int8", 0, (1, 1), (0, 0, 0, 0), "silu", "float32"),
]


@pytest.mark.parametrize("tactic", ["reference", pytest.param("triton_int8", marks=needs_triton)])
@pytest.mark.parametrize("xdt,xz,stride,pads,act,out", CONV_CASES)
def test_int8_conv_matches_float64(tactic, xdt, xz, stride, pads, act, out):
    rng = np.random.default_rng(0)
    cin, cout = 8, 24
    k = 1 if pads == (0, 0, 0, 0) else 3
    lo, hi = (0, 255) if xdt == "uint8" else (-128, 127)
    x = rng.integers(lo, hi + 1, (2, cin, 7, 6)).astype(xdt)
    w = rng.integers(-127, 128, (cout, cin, k, k)).astype(np.int8)
    ws = (rng.uniform(0.5, 2.0, cout) * 1e-3).astype(np.float32)
    bias = rng.integers(-20000, 20000, cout).astype(np.int32)
    geo = {"stride": list(stride), "pads": list(pads), "dilation": [1, 1], "groups": 1}
    conv = {"stride": stride, "padding": 0}
    xp = x.astype(np.float64)
    padded = np.pad(xp, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=xz)
    y64 = _ref64(padded, 0.05, xz, w, ws, bias, conv, act)
    residual = None
    if out == "float32":       # a float output with a residual added after the activation
        residual = rng.standard_normal(y64.shape).astype(np.float32)
        y64 = _ref64(padded, 0.05, xz, w, ws, bias, conv, act, residual, after=True)
    scale = float(np.float32(np.abs(y64).max() / 100))
    attrs = _attrs(ws, x_zero_point=xz, to=out, activation=act, residual_after_activation=residual is not None,
                   **geo, **({} if out == "float32" else {"out_scale": scale, "out_zero_point": 3}))
    ins = [torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias)]
    ins += [torch.from_numpy(residual)] if residual is not None else []
    got = _run(tactic, attrs, ins, (xdt, "int8", "int32")).numpy()
    assert got.shape == y64.shape and got.dtype == np.dtype(out)
    if out == "float32":
        np.testing.assert_allclose(got, y64, rtol=1e-5, atol=1e-5 * np.abs(y64).max())
    else:
        _check_codes(got, y64, scale, 3, lo if out == xdt else -128, hi if out == xdt else 127)


@pytest.mark.parametrize("tactic", ["reference", "int_mm", pytest.param("triton_int8", marks=needs_triton),
                                    pytest.param("triton_int8_small", marks=needs_triton)])
@pytest.mark.parametrize("xdt,xz", [("int8", -7), ("uint8", 140)])
def test_int8_fully_connected_matches_float64(tactic, xdt, xz):
    rng = np.random.default_rng(1)
    x = (rng.integers(-128, 128, (3, 5, 40)) + xz + 7).astype(xdt)      # K = 40: a partial K slice
    w = rng.integers(-127, 128, (19, 40)).astype(np.int8)         # N = 19: a partial N tile
    ws = (rng.uniform(0.5, 2.0, 19) * 1e-2).astype(np.float32)
    bias = rng.integers(-3000, 3000, 19).astype(np.int32)
    y64 = _ref64(x, 0.02, xz, w, ws, bias, None, "relu")
    scale = float(np.float32(y64.max() / 300))
    attrs = _attrs(ws, _kind="QFullyConnected", x_scale=0.02, x_zero_point=xz, to="int8", activation="relu",
                   out_scale=scale, out_zero_point=-100)
    got = _run(tactic, attrs, [torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias)],
               (xdt, "int8", "int32")).numpy()
    assert got.shape == (3, 5, 19)
    _check_codes(got, y64, scale, -100, -128, 127)
    assert (got == 127).any() and (got == -100).any()      # saturation and the ReLU floor were exercised


@pytest.mark.parametrize("tactic", ["reference", "scaled_mm", pytest.param("triton_fp8", marks=needs_triton)])
@pytest.mark.parametrize("out", ["float8_e4m3fn", "float16"])
def test_fp8_fully_connected_matches_float64(tactic, out):
    rng = np.random.default_rng(2)
    e4m3 = ml_dtypes.float8_e4m3fn
    x = (rng.standard_normal((6, 48)) * 60).astype(e4m3)
    w = (rng.standard_normal((20, 48)) * 100).astype(e4m3)
    ws = (rng.uniform(0.5, 2.0, 20) * 1e-3).astype(np.float32)
    bias = rng.integers(-50000, 50000, 20).astype(np.int32)
    y64 = _ref64(x.astype(np.float64), 0.01, 0, w.astype(np.float64), ws, bias, None)
    scale = float(np.float32(np.abs(y64).max() / 300))
    attrs = _attrs(ws, _kind="QFullyConnected", x_scale=0.01, to=out,
                   **({"out_scale": scale} if out.startswith("float8") else {}))
    ins = [torch.from_numpy(x.view(np.uint8)).view(torch.float8_e4m3fn),
           torch.from_numpy(w.view(np.uint8)).view(torch.float8_e4m3fn), torch.from_numpy(bias)]
    got = _run(tactic, attrs, ins, ("float8_e4m3fn", "float8_e4m3fn", "int32")).float().numpy()
    if out == "float16":
        np.testing.assert_allclose(got, y64, rtol=1e-3, atol=1e-3 * np.abs(y64).max())
        return
    want = (y64 / scale).clip(-448, 448).astype(np.float32).astype(e4m3).astype(np.float64)   # RNE, saturated
    # the float32 accumulation may move a value across a rounding boundary: then the neighbouring FP8 code
    grid = np.sort(np.unique(np.arange(256, dtype=np.uint8).view(e4m3).astype(np.float64)))
    grid = grid[np.isfinite(grid)]
    pos = np.searchsorted(grid, want)
    got_pos = np.searchsorted(grid, got.astype(np.float64))
    assert np.isin(got.astype(np.float64), grid).all()
    assert np.abs(got_pos - pos).max() <= 1 and np.mean(got_pos == pos) > 0.95


@pytest.mark.parametrize("tactic", ["reference", pytest.param("triton_fp8", marks=needs_triton)])
def test_fp8_conv_adds_an_fp8_codes_residual(tactic):
    """An FP8 1x1 convolution whose residual arrives as FP8 codes (PTQ gives a residual add the shortcut's codes):
    dequantized with its scale and added before the ReLU, a float32 output, against float64."""
    rng = np.random.default_rng(6)
    e4m3 = ml_dtypes.float8_e4m3fn
    x = (rng.standard_normal((2, 32, 5, 6)) * 30).astype(e4m3)
    w = (rng.standard_normal((48, 32, 1, 1)) * 40).astype(e4m3)
    r = (rng.standard_normal((2, 48, 5, 6)) * 60).astype(e4m3)
    ws = (rng.uniform(0.5, 2.0, 48) * 1e-3).astype(np.float32)
    bias = rng.integers(-50000, 50000, 48).astype(np.int32)
    y64 = _ref64(x.astype(np.float64), 0.01, 0, w.astype(np.float64), ws, bias, {"stride": (1, 1), "padding": 0},
                 "relu", r.astype(np.float64) * np.float64(np.float32(0.05)))
    attrs = _attrs(ws, x_scale=0.01, to="float32", activation="relu", residual_scale=0.05, stride=[1, 1],
                   pads=[0, 0, 0, 0], dilation=[1, 1], groups=1)

    def fp8(a):
        return torch.from_numpy(a.view(np.uint8)).view(torch.float8_e4m3fn)
    ins = [fp8(x).contiguous(memory_format=torch.channels_last), fp8(w), torch.from_numpy(bias),
           fp8(r).contiguous(memory_format=torch.channels_last)]
    got = _run(tactic, attrs, ins, ("float8_e4m3fn", "float8_e4m3fn", "int32", "float8_e4m3fn")).numpy()
    assert (y64 > 0).mean() > 0.3 and (y64 == 0).mean() > 0.1        # the ReLU kept and cut values
    np.testing.assert_allclose(got, y64, rtol=1e-5, atol=1e-5 * np.abs(y64).max())


_SM90_PROBE = """
import json, re, sys
sys.path.insert(0, sys.argv[1])
import torch
from sm90_compile import Recorder, compile_sm90
from kiln.triton_support import load_triton
load_triton()               # the kernels as Triton's JITFunctions, which the recorders wrap
import kiln.kernels.int8_gemm as ig
import kiln.kernels.int8_quantize as iq

log = []
ig._qgemm_kernel = Recorder(ig._qgemm_kernel, log)
iq._quantize_kernel = Recorder(iq._quantize_kernel, log)
iq._dequantize_kernel = Recorder(iq._dequantize_kernel, log)
ep = lambda n: ig.Epilogue(torch.zeros(n, dtype=torch.int32), torch.ones(n), 0)
x = torch.zeros(8, 64, 56, 56, dtype=torch.uint8)
ig.qgemm(x, torch.zeros(64, 9 * 64, dtype=torch.int8), ep(64), ig.Codes(torch.uint8, 0.1, 3), act="relu",
         geometry=ig.Geometry(3, 3, (1, 1), (1, 1, 1, 1), (1, 1)))
x = torch.zeros(256, 768, dtype=torch.float8_e4m3fn)
ig.qgemm(x, torch.zeros(3072, 768, dtype=torch.float8_e4m3fn), ep(3072), ig.Codes(torch.float8_e4m3fn, 0.1))
iq.quantize_per_tensor(torch.zeros(8, 64, 56, 56, dtype=torch.float16), torch.ones(1), torch.zeros(1, dtype=torch.int8),
                       "int8")
iq.dequantize_per_tensor(torch.zeros(8, 64, 56, 56, dtype=torch.float8_e4m3fn), torch.ones(1), None, torch.float16)
out = {}
for name, (fn, grid, args, kwargs) in zip(["conv3x3_uint8", "fc_fp8", "quantize", "dequantize"], log):
    k = compile_sm90(fn, args, kwargs)
    out[name] = [bool(k.asm["cubin"])] + sorted(set(re.findall(r"wgmma[.]mma_async[.]sync[.]aligned[.][a-z0-9]+[.]"
                                                                 r"([a-z0-9]+[.][a-z0-9]+[.][a-z0-9]+)", k.asm["ptx"])))
print(json.dumps(out))
"""


def test_8bit_kernels_compile_to_hopper_8bit_tensor_core_instructions():
    """Compiled for sm_90 (no GPU needed), the int8 kernel's products are int8 wgmma instructions with int32
    accumulation and the FP8 kernel's E4M3 wgmma with FP32 accumulation (the interpreter cannot show that); the
    one-pass quantize and dequantize kernels compile too."""
    pytest.importorskip("triton")
    out = run_probe(_SM90_PROBE)
    assert out == {"conv3x3_uint8": [True, "s32.s8.s8"], "fc_fp8": [True, "f32.e4m3.e4m3"], "quantize": [True],
                   "dequantize": [True]}


@needs_triton
@pytest.mark.parametrize("xdt", [torch.float32, torch.float16])
@pytest.mark.parametrize("out,zp", [("int8", -3), ("uint8", 128), ("float8_e4m3fn", None)])
def test_triton_quantize_matches_the_torch_tactic(xdt, out, zp):
    """One-pass QuantizeLinear (int8_quantize.py): the torch tactic's codes exactly (both divide in FP32 and
    round half to even; ties and saturation included), in the input's memory layout."""
    rng = np.random.default_rng(3)
    scale = torch.tensor(0.0625 if out != "float8_e4m3fn" else 0.01)
    x = torch.from_numpy(rng.standard_normal((2, 8, 5, 6)).astype(np.float32) * 6)
    x.view(-1)[:40] = torch.arange(-20, 20) * 0.5 * 0.0625          # exact ties: x / scale = k + 0.5
    x.view(-1)[40:44] = torch.tensor([-1e-7, -0.0, 1e-7, -2e-7])      # FP8: negatives rounding to zero give -0.0
    x = x.to(xdt).contiguous(memory_format=torch.channels_last)
    zpt = None if zp is None else torch.tensor(zp, dtype=torch_dtype(out))
    attrs = {"axis": 1, "to": out, "block_size": 0, "saturate": 1}
    ctx = KernelContext(device="cpu", input_dtypes=(str(xdt).removeprefix("torch."), "float32", out))
    want = get_tactic("QuantizeLinear", "torch").make(attrs, ctx)(x, scale, zpt)[0]
    got = get_tactic("QuantizeLinear", "triton").make(attrs, ctx)(x, scale, zpt)[0]
    assert got.dtype == want.dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    codes = got.float()
    assert codes.min() == (-448 if out.startswith("float8") else torch.iinfo(got.dtype).min)     # saturated
    ref = np.clip(np.rint(x.float().numpy() / scale.item()) + (zp or 0), -128, 255)      # ties to even
    if out != "float8_e4m3fn":
        np.testing.assert_array_equal(codes.numpy(), np.clip(ref, *((-128, 127) if out == "int8" else (0, 255))))


def test_grouped_conv_runs_the_reference_tactic():
    """A depthwise/grouped 8-bit convolution (MobileNet's) has no Triton kernel; the reference tactic computes it
    (GPU and CPU) and matches the float64 evaluation."""
    rng = np.random.default_rng(5)
    x = rng.integers(-128, 128, (2, 6, 5, 5)).astype(np.int8)
    w = rng.integers(-127, 128, (6, 1, 3, 3)).astype(np.int8)
    ws = (rng.uniform(0.5, 2.0, 6) * 1e-2).astype(np.float32)
    bias = rng.integers(-500, 500, 6).astype(np.int32)
    attrs = _attrs(ws, stride=[1, 1], pads=[1, 1, 1, 1], dilation=[1, 1], groups=6, to="float32")
    for device in ("cpu", "cuda"):
        names = [t.name for t in tactics_for("QConvolution", attrs, KernelContext(device=device,
                                                                                   input_dtypes=("int8",)))]
        assert names == ["reference"], device
    got = _run("reference", attrs, [torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias)],
               ("int8", "int8", "int32")).numpy()
    xf = x.astype(np.float64) * 0.05
    wf = w.astype(np.float64) * ws[:, None, None, None]
    want = F.conv2d(torch.from_numpy(xf), torch.from_numpy(wf), torch.from_numpy(bias * (0.05 * ws.astype(np.float64))),
                    padding=1, groups=6).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("tactic", ["reference", "int_mm", pytest.param("triton_int8", marks=needs_triton)])
def test_mismatched_weight_scales_are_refused_in_one_line(tactic):
    """Weight scales (attrs) and weight/bias (weights) that disagree on the output channels — a damaged engine or a
    hand-made layer — are a ShapeError naming the layer, not a broadcast error or wrong numbers."""
    from kiln.errors import ShapeError
    attrs = _attrs(np.ones(5, np.float32), _kind="QFullyConnected", to="float32")
    ctx = KernelContext(device="cpu", layer_name="fc7", input_dtypes=("int8", "int8", "int32"))
    run = get_tactic("QFullyConnected", tactic).make({k: v for k, v in attrs.items() if k != "_kind"}, ctx)
    with pytest.raises(ShapeError, match=r"^8-bit layer 'fc7' has 5 weight scales and 6 bias codes for a weight "
                                         r"of 6 output channels; .* rebuild it from the model\.$"):
        run(torch.zeros(2, 32, dtype=torch.int8), torch.zeros(6, 32, dtype=torch.int8), torch.zeros(6, dtype=torch.int32))


@needs_triton
@pytest.mark.parametrize("codes,zp", [("int8", -3), ("uint8", 128), ("float8_e4m3fn", None)])
@pytest.mark.parametrize("out", ["float32", "float16"])
def test_triton_dequantize_matches_the_torch_tactic(codes, zp, out):
    """One-pass DequantizeLinear: the torch tactic's values exactly ((codes - zero point) * scale in FP32), in the
    input's memory layout."""
    rng = np.random.default_rng(4)
    bits = torch.from_numpy(rng.integers(0, 256, (2, 6, 5, 4)).astype(np.uint8))
    if codes == "float8_e4m3fn":
        bits[(bits & 0x7F) == 0x7F] = 0         # no NaN codes
    x = bits.view(torch_dtype(codes)).contiguous(memory_format=torch.channels_last)
    scale = torch.tensor(0.0371)
    zpt = None if zp is None else torch.tensor(zp, dtype=torch_dtype(codes))
    attrs = {"axis": 1, "to": out, "block_size": 0}
    ctx = KernelContext(device="cpu", input_dtypes=(codes, "float32", codes))
    want = get_tactic("DequantizeLinear", "torch").make(attrs, ctx)(x, scale, zpt)[0]
    got = get_tactic("DequantizeLinear", "triton").make(attrs, ctx)(x, scale, zpt)[0]
    assert got.dtype == want.dtype == torch_dtype(out) and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want)
    ref = (x.float().numpy().astype(np.float64) - (zp or 0)) * np.float64(np.float32(0.0371))
    np.testing.assert_allclose(got.float().numpy(), ref, rtol=1e-3 if out == "float16" else 1e-6)


# ---- on the GPU: every tactic of the 8-bit layers against the reference tactic, at real layer shapes -------------

GPU = "cuda"
GPU_CASES = {   # (x codes, N, Cin, H, W, Cout, kernel, stride, pads, activation, output)
    "resnet_stem": ("uint8", 8, 3, 224, 224, 64, 7, 2, 3, "relu", "int8"),
    "resnet_3x3": ("int8", 32, 64, 56, 56, 64, 3, 1, 1, "relu", "int8"),
    "resnet_1x1_up": ("int8", 32, 64, 56, 56, 256, 1, 1, 0, None, "float16"),
    "resnet_3x3_s2": ("int8", 32, 256, 28, 28, 256, 3, 2, 1, "relu", "int8"),
    "bert_fc_gelu": ("int8", 32 * 128, 768, 1, 1, 3072, 0, 1, 0, "gelu", "int8"),
}


def _exact_fp32(monkeypatch) -> None:
    """The reference tactic's float32 convolution and GEMM without TF32 (as an FP32 engine runs them)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_8bit_tactics_match_the_reference(case, monkeypatch):
    _exact_fp32(monkeypatch)
    xdt, n, cin, h, w, cout, k, stride, pad, act, out = GPU_CASES[case]
    dev = GPU
    g = torch.Generator(device="cpu").manual_seed(0)
    lo, hi = (0, 256) if xdt == "uint8" else (-128, 128)
    fc = k == 0
    x = torch.randint(lo, hi, (n, cin) if fc else (n, cin, h, w), generator=g, dtype=torch_dtype(xdt)).to(dev)
    if not fc:
        x = x.contiguous(memory_format=torch.channels_last)
    wq = torch.randint(-127, 128, (cout, cin) if fc else (cout, cin, k, k), generator=g, dtype=torch.int8).to(dev)
    bias = torch.randint(-5000, 5000, (cout,), generator=g, dtype=torch.int32).to(dev)
    ws = (np.random.default_rng(1).uniform(0.5, 2.0, cout) * 1e-3 / np.sqrt(cin * max(k, 1) ** 2)).astype(np.float32)
    kind = "QFullyConnected" if fc else "QConvolution"
    attrs = _attrs(ws, x_zero_point=131 if xdt == "uint8" else 0, to=out, activation=act,
                   **({} if out == "float16" else {"out_scale": 0.02, "out_zero_point": 0}),
                   **({} if fc else {"stride": [stride] * 2, "pads": [pad] * 4, "dilation": [1, 1], "groups": 1}))
    ctx = KernelContext(device=dev, layer_name=case, input_dtypes=(xdt, "int8", "int32"))
    names = [t.name for t in tactics_for(kind, attrs, ctx)]
    assert "reference" in names and "triton_int8" in names
    with torch.inference_mode():
        want = get_tactic(kind, "reference").make(attrs, ctx)(x, wq, bias)[0].float()
        assert want.abs().max() > 10 * (0.02 if out != "float16" else 1e-3)      # not all saturated or zero
        for name in names:
            got = get_tactic(kind, name).make(attrs, ctx)(x, wq, bias)[0].float()
            if out == "float16":
                assert float((got - want).norm() / want.norm()) < 2e-3, name
            else:
                d = (got - want).abs()
                assert float(d.max()) <= 1 and float((d == 0).float().mean()) > 0.99, name


@pytest.mark.gpu
def test_gpu_fp8_tactics_match_the_reference(monkeypatch):
    _exact_fp32(monkeypatch)
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9 or later")
    dev = GPU
    g = torch.Generator(device="cpu").manual_seed(1)
    # clamped into E4M3's range (±448): a larger value would convert to NaN
    x = (torch.randn(4096, 768, generator=g) * 30).clamp(-448, 448).to(torch.float8_e4m3fn).to(dev)
    wq = (torch.randn(3072, 768, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).to(dev)
    bias = torch.randint(-50000, 50000, (3072,), generator=g, dtype=torch.int32).to(dev)
    ws = np.full(3072, 1e-4, np.float32)
    for out, scale in (("float8_e4m3fn", 0.05), ("float16", None)):
        attrs = _attrs(ws, _kind="QFullyConnected", x_scale=0.01, to=out,
                       **({"out_scale": scale} if scale else {}))
        attrs.pop("_kind")
        ctx = KernelContext(device=dev, layer_name="fc", input_dtypes=("float8_e4m3fn", "float8_e4m3fn", "int32"))
        names = [t.name for t in tactics_for("QFullyConnected", attrs, ctx)]
        assert {"reference", "triton_fp8", "scaled_mm"} <= set(names)
        with torch.inference_mode():
            want = get_tactic("QFullyConnected", "reference").make(attrs, ctx)(x, wq, bias)[0].float()
            for name in names:
                got = get_tactic("QFullyConnected", name).make(attrs, ctx)(x, wq, bias)[0].float()
                if out == "float16":
                    assert float((got - want).norm() / want.norm()) < 2e-3, name
                else:        # one E4M3 step at most (1/8 of the value, or a subnormal step), nearly all equal
                    d = (got - want).abs()
                    bad = d > torch.clamp(want.abs() / 8, min=2.0 ** -9) * 1.0001
                    worst = [(float(got[i, j]), float(want[i, j])) for i, j in bad.nonzero()[:5].tolist()]
                    assert not bool(bad.any()), f"{name}: {int(bad.sum())} codes beyond one step, e.g. {worst}"
                    assert float((d == 0).float().mean()) > 0.95, name


@pytest.mark.gpu
@pytest.mark.parametrize("out", ["int8", "uint8", "float8_e4m3fn"])
def test_gpu_quantize_dequantize_match_the_torch_tactics(out):
    x = (torch.randn(32, 64, 56, 56, device="cuda") * 4).half().contiguous(memory_format=torch.channels_last)
    scale = torch.tensor(0.03, device="cuda")
    zp = None if out == "float8_e4m3fn" else torch.tensor(3, dtype=torch_dtype(out), device="cuda")
    ctx = KernelContext(device="cuda", input_dtypes=("float16", "float32", out))
    q = {"axis": 1, "to": out, "block_size": 0, "saturate": 1}
    with torch.inference_mode():
        want = get_tactic("QuantizeLinear", "torch").make(q, ctx)(x, scale, zp)[0]
        got = get_tactic("QuantizeLinear", "triton").make(q, ctx)(x, scale, zp)[0]
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        dq = {"axis": 1, "to": "float16", "block_size": 0}
        ctx = KernelContext(device="cuda", input_dtypes=(out, "float32", out))
        assert torch.equal(get_tactic("DequantizeLinear", "triton").make(dq, ctx)(got, scale, zp)[0],
                           get_tactic("DequantizeLinear", "torch").make(dq, ctx)(got, scale, zp)[0])
