"""8-bit convolution and GEMM in Triton, dequantize/bias/residual/activation/requantize fused in the epilogue.

One kernel serves QConvolution (2-D, groups 1, as an implicit GEMM on channels-last codes, conv_triton.py's
scheme) and QFullyConnected (a plain GEMM: a 1x1 convolution over [M, K] rows). The product runs on the codes:
int8 x int8 -> int32 (``tl.dot`` with int32 accumulation; uint8 inputs are shifted by -128 as they load) or
FP8 E4M3 x E4M3 -> FP32 (each BLOCK_K slice's tensor-core sum added to the FP32 accumulator: Triton's sm_90
default keeps the whole K loop in the tensor core's narrower fast-accumulation sum). Zero points never enter the
inner loop: padding taps load the input's zero point, and the sum ``zp * sum(w)`` each output channel then carries
is taken out of the bias once (``epilogue_terms``). The epilogue computes

    v = (acc + ibias[n]) * mult[n]            mult = x_scale * w_scale[n]  (the dequantized product plus bias)
    v = act(v + r)   or   act(v) + r          (residual r: float, or codes dequantized as they load)
    y = saturate(round_half_even(v * (1 / out_scale)) + out_zero_point)   or   v as float
    [q = the codes of y as stored]            (a second output: a float y that is also quantized)

so a quantized network keeps its activations as 8-bit codes between such layers. The epilogue multiplies by the
FP32 reciprocal of the output scale where ONNX divides by it (an exact division is a called subroutine that
spills the accumulator tile): a code can then differ by one from ONNX's where the quotient lies within an ulp of
a half. The weight is stored K-major
([Cout, KH, KW, Cin]), the layout 8-bit tensor-core instructions read without a transpose. Tile tables:
``default_config`` (one tactic per code type), ``wide_config`` and ``small_config`` (min_level 4; the builder
times them from the default level for 8-bit layers slow enough to pay their compiles: builder/tactics.py). The
epilogue is one function (``epilogue_tile``) that int8_tma.py's kernels share: ``qgemm`` given their
``TmaConfig`` runs a fully connected layer or stride-1 convolution on them.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from kiln.errors import BuildError
from kiln.ir.dtypes import torch_dtype
from kiln.kernels._util import per_tensor
from kiln.kernels.conv_triton import ConvConfig, igemm_origin, igemm_tap, out_size, tile_offsets
from kiln.kernels.epilogue_triton import ACTS, apply_act, epilogue_params, nhwc_output
from kiln.kernels.quantize import RANGES, weight_scales
from kiln.kernels.registry import tactic
from kiln.triton_support import HAS_TRITON, cdiv, next_pow2, tl, triton

# input code type -> the kernel's MODE; output type -> OUT (0: float, 1: integer codes, 2: FP8 codes)
MODES = {torch.int8: 0, torch.uint8: 1, torch.float8_e4m3fn: 2}
FLOAT_OUT = (torch.float32, torch.float16, torch.bfloat16)


QGemmConfig = ConvConfig       # the same tile parameters as the float implicit-GEMM kernel


def default_config(m: int, n: int, cin: int) -> QGemmConfig:
    """128x128 tiles (x64 where N <= 64, 64 rows where M is small), K slices of 64-128 codes (at least 32:
    the 8-bit MMA's depth), narrowed to Cin rounded up to a power of two."""
    bn = 64 if n <= 64 else 128
    bm = 64 if m <= 64 else 128
    bk = min(128, max(32, next_pow2(cin)))
    return QGemmConfig(bm, bn, bk, 8 if bm * bn >= 128 * 128 else 4, 4 if bk <= 64 else 3)


def wide_config(m: int, n: int, cin: int) -> QGemmConfig:
    """128x256 tiles where N > 128 (256x128 otherwise): fewer re-reads of A and B per output for big layers."""
    bk = min(128, max(32, next_pow2(cin)))
    return QGemmConfig(128, 256, bk, 8, 3) if n > 128 else QGemmConfig(256, 128 if n > 64 else 64, bk, 8, 3)


def small_config(m: int, n: int, cin: int) -> QGemmConfig:
    """64x64 tiles and a deeper pipeline, for layers too small to fill the GPU with big tiles."""
    return QGemmConfig(64, 64, min(128, max(32, next_pow2(cin))), 4, 4)


@triton.jit
def _round_half_even(v):
    """v (|v| < 2**22) rounded to the nearest integer, ties to even (ONNX QuantizeLinear), on FP32 values: adding
    and taking away 1.5 * 2**23 leaves no fraction bits, and FP32 addition rounds half to even."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _to_e4m3_grid(v):
    """v (already within +-448) rounded half to even onto the FP8 E4M3 grid, still FP32: the conversion that
    follows is then exact on every backend. The grid step is 2**(e - 3) for exponent e >= -6, 2**-9 below; v is
    scaled by the step's exact inverse, so nothing divides. The sign survives rounding to zero, as in ONNX."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)
    r = _round_half_even(v * inv) * step
    # v's sign bit put back: a negative value that rounds to zero stays -0.0 (Triton's -x is 0 - x)
    return (r.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["M", "H", "W", "OH", "OW"])
def _qgemm_kernel(x_ptr, w_ptr, ib_ptr, mult_ptr, r_ptr, y_ptr, q_ptr, M, H, W, OH, OW, Cout, x_zp, out_inv,
                  out_zp, q_inv, q_zp, r_scale, r_zp, alpha, beta, CIN: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr,
                  SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                  POINTWISE: tl.constexpr, IDX64: tl.constexpr, MODE: tl.constexpr, OUT: tl.constexpr,
                  LO: tl.constexpr, HI: tl.constexpr, QOUT: tl.constexpr, QLO: tl.constexpr, QHI: tl.constexpr,
                  ACT: tl.constexpr, HAS_RES: tl.constexpr, ZP_PAD: tl.constexpr,
                  RES_AFTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
    offs_m, offs_n = tile_offsets(M, Cout, IDX64, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < Cout
    KTOT: tl.constexpr = KH * KW * CIN
    chunks: tl.constexpr = (CIN + BLOCK_K - 1) // BLOCK_K
    if POINTWISE:
        steps: tl.constexpr = chunks
        a_row = offs_m * CIN
    else:
        steps: tl.constexpr = KH * KW * chunks
        img, ih0, iw0 = igemm_origin(offs_m, OH, OW, SH, SW, PH, PW)
    if MODE == 2:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for i in range(steps):
        if POINTWISE:
            tap = 0
            c = i * BLOCK_K + offs_k
            a_ok = m_ok
        else:
            tap, c, a_ok, a_row = igemm_tap(i, chunks, offs_k, m_ok, img, ih0, iw0, H, W, CIN, KW, DH, DW, BLOCK_K)
        # a tap in the padding reads the zero point (its code for 0.0); the bias takes zp * sum(w) out again
        a_ptrs = x_ptr + a_row[:, None] + c[None, :]
        b_ptrs = w_ptr + offs_n[None, :] * KTOT + (tap * CIN + c)[:, None]
        if CIN % BLOCK_K == 0:          # every K slice full: masks constant along K, so loads stay vectorized
            a_mask = a_ok[:, None]
            b_mask = n_ok[None, :]
        else:
            k_ok = c < CIN
            a_mask = a_ok[:, None] & k_ok[None, :]
            b_mask = k_ok[:, None] & n_ok[None, :]
        if MODE == 2:
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        elif ZP_PAD:        # padding taps read a nonzero zero point: a select after the load (not pipelined)
            a = tl.load(a_ptrs, mask=a_mask, other=x_zp)
            b = tl.load(b_ptrs, mask=b_mask, other=0)
        else:               # zero-filled masked loads, which the compiler pipelines (rows past M are dropped)
            a = tl.load(a_ptrs, mask=a_mask, other=0)
            b = tl.load(b_ptrs, mask=b_mask, other=0)
        if MODE == 1:
            a = (a.to(tl.int16) - 128).to(tl.int8)
        if MODE == 2:
            acc += tl.dot(a, b)     # each K slice summed on its own, then added in FP32
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    offs = offs_m[:, None] * Cout + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    r = tl.load(r_ptr + offs, mask=ok) if HAS_RES else 0      # lanes outside the tile are never stored
    y, q = epilogue_tile(acc, r, offs_n, n_ok, ib_ptr, mult_ptr, out_inv, out_zp, q_inv, q_zp, r_scale, r_zp, alpha,
                         beta, MODE, OUT, LO, HI, QOUT, QLO, QHI, ACT, HAS_RES, RES_AFTER, y_ptr.dtype.element_ty,
                         q_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, y, mask=ok)
    if QOUT != 0:
        tl.store(q_ptr + offs, q, mask=ok)


@triton.jit
def epilogue_tile(acc, r, offs_n, n_ok, ib_ptr, mult_ptr, out_inv, out_zp, q_inv, q_zp, r_scale, r_zp, alpha, beta,
                  MODE: tl.constexpr, OUT: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, QOUT: tl.constexpr,
                  QLO: tl.constexpr, QHI: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                  RES_AFTER: tl.constexpr, Y_TY: tl.constexpr, Q_TY: tl.constexpr):
    """The epilogue (module docstring) of one output tile: the accumulator ``acc`` of output channels
    ``offs_n`` and, with HAS_RES, the residual tile ``r`` as stored -> (y in Y_TY, and with QOUT y's codes in
    Q_TY, else y again), for the caller to store."""
    ib = tl.load(ib_ptr + offs_n, mask=n_ok, other=0)
    if MODE == 2:
        v = (acc + ib.to(tl.float32)[None, :])
    else:
        v = (acc + ib[None, :]).to(tl.float32)
    v = v * tl.load(mult_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_RES:     # float, or 8-bit codes dequantized with r_scale and r_zp (1 and 0 for a float residual)
        r = (r.to(tl.float32) - r_zp) * r_scale
    if HAS_RES and not RES_AFTER:
        v += r
    v = apply_act(v, alpha, beta, ACT)
    if HAS_RES and RES_AFTER:
        v += r
    y = _requantize(v, out_inv, out_zp, OUT, LO, HI).to(Y_TY)
    q = y
    if QOUT != 0:       # the float output's codes too, from the value as stored
        q = _requantize(y.to(tl.float32), q_inv, q_zp, QOUT, QLO, QHI).to(Q_TY)
    return y, q


@triton.jit
def _requantize(v, inv_scale, zp, OUT: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr):
    """FP32 v as OUT says: 0 as it is, 1 integer codes (round half to even, saturated to LO..HI), 2 FP8 codes; v is
    scaled by the FP32 reciprocal of the scale (see qgemm)."""
    if OUT == 1:
        t = tl.minimum(tl.maximum(v * inv_scale, -4194304.0), 4194304.0)
        v = tl.minimum(tl.maximum(_round_half_even(t) + zp, LO), HI)
    elif OUT == 2:
        v = _to_e4m3_grid(tl.minimum(tl.maximum(v * inv_scale, -448.0), 448.0))
    return v


class Epilogue(NamedTuple):
    """What the kernel's epilogue needs besides the accumulator, on the layer's device."""

    ibias: torch.Tensor          # int32 [N]: bias codes - zp * sum(w) per output channel
    mult: torch.Tensor           # float32 [N]: x_scale * w_scale
    x_zp: int                    # the zero point padding taps load (a uint8 code for uint8 inputs)


def epilogue_terms(attrs, w: torch.Tensor, bias: torch.Tensor, x_dtype: torch.dtype, layer: str = "") -> Epilogue:
    """The per-output-channel epilogue terms of a QConvolution/QFullyConnected layer with weight codes ``w``
    ([N, ...]) and int32 bias codes ``bias``; refuses a layer whose sums could overflow int32."""
    ws = weight_scales(attrs, w, bias, layer)
    zp = int(attrs.get("x_zero_point", 0))
    shift = zp - 128 if x_dtype == torch.uint8 else zp        # the zero point once uint8 codes are shifted
    wc = w.reshape(w.shape[0], -1)
    b64 = bias.to(torch.int64).cpu()
    if x_dtype == torch.float8_e4m3fn:
        ib = b64
    else:
        ib = b64 - shift * wc.to(torch.int64).sum(1).cpu()
        worst = ib.abs().max().item() + 128 * 128 * wc.shape[1] if ib.numel() else 0
        if worst >= 2 ** 31:
            raise BuildError(f"The int8 kernel's int32 sums could overflow for a {tuple(w.shape)} weight; the "
                             f"reference tactic runs this layer.")
    mult = (torch.tensor(float(np.float32(attrs["x_scale"])), dtype=torch.float32) * ws).to(w.device)
    return Epilogue(ib.to(torch.int32).to(w.device), mult, zp)


def _out_type(dtype: torch.dtype) -> tuple[int, int, int]:
    """The kernel's (OUT, LO, HI) for output type ``dtype``."""
    if dtype in FLOAT_OUT:
        return 0, 0, 0
    if dtype == torch.float8_e4m3fn:
        return 2, 0, 0
    name = str(dtype).removeprefix("torch.")
    if name not in ("int8", "uint8"):
        raise BuildError(f"The 8-bit GEMM writes float32/16, bfloat16, int8, uint8 or FP8 E4M3, not {name}.")
    lo, hi = RANGES[name]
    return 1, lo, hi


class Geometry(NamedTuple):
    """A 2-D convolution's window; a GEMM is ``Geometry()`` over rows of length Cin."""

    kh: int = 1
    kw: int = 1
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)


class Codes(NamedTuple):
    """An output's type and, for 8-bit codes, their scale and zero point (a residual's: how to dequantize it)."""

    dtype: torch.dtype
    scale: float = 1.0
    zero_point: int = 0


def qgemm(x: torch.Tensor, wk: torch.Tensor, ep: Epilogue, out: Codes, residual: torch.Tensor | None = None,
          act: str = "none", alpha: float = 0.0, beta: float = 0.0, residual_after: bool = False,
          geometry: Geometry | None = None, config: QGemmConfig | Callable[[int, int, int], QGemmConfig] =
          default_config, residual_codes: Codes | None = None, codes: Codes | None = None):
    """The fused 8-bit layer, writing ``out`` (and, with ``codes``, the float output's codes as well: then a pair
    is returned). With ``geometry``: ``x`` is [N, Cin, H, W] codes (made channels-last), ``wk`` the K-major weight
    [Cout, KH·KW·Cin] (``k_major``), and the result a channels-last [N, Cout, OH, OW]. Without: ``x`` is [..., K]
    codes, ``wk`` [N, K], and the result [..., N]. ``residual`` is shaped like the result: float, or the 8-bit
    codes ``residual_codes`` dequantizes. ``config`` (or what it returns for (M, N, Cin)) is a ``QGemmConfig``, or
    a ``TmaConfig`` for int8_tma.py's kernels (fully connected layers and stride-1 convolutions)."""
    mode = MODES.get(x.dtype)
    if mode is None or (wk.dtype == torch.float8_e4m3fn) != (mode == 2):
        raise BuildError(f"The 8-bit GEMM takes int8/uint8 codes with int8 weights or FP8 E4M3 codes with FP8 "
                         f"weights, got {x.dtype} and {wk.dtype}.")
    kind, lo, hi = _out_type(out.dtype)
    qkind, qlo, qhi = _out_type(codes.dtype) if codes is not None else (0, 0, 0)
    if codes is not None and (kind != 0 or qkind == 0):
        raise BuildError("The 8-bit GEMM writes a second output only as codes of a float output.")
    cout = wk.shape[0]
    g = geometry or Geometry()
    if geometry is None:
        cin = x.shape[-1]
        lead = tuple(x.shape[:-1])
        m = int(np.prod(lead, dtype=np.int64))
        h = w = oh = ow = 1
        rows = x.reshape(m, cin).contiguous()
        if residual is not None:
            residual = residual.reshape(m, cout).contiguous()

        def result(dtype: torch.dtype) -> torch.Tensor:
            return torch.empty((*lead, cout), dtype=dtype, device=x.device)
    else:
        n, cin, h, w = x.shape
        oh = out_size(h, g.kh, g.stride[0], g.pads[0], g.pads[2], g.dilation[0])
        ow = out_size(w, g.kw, g.stride[1], g.pads[1], g.pads[3], g.dilation[1])
        m = n * oh * ow
        rows = x.contiguous(memory_format=torch.channels_last)
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last)

        def result(dtype: torch.dtype) -> torch.Tensor:
            return nhwc_output(None, (n, cout, oh, ow), dtype, x.device, x.is_meta)
    if wk.shape[1] != g.kh * g.kw * cin:
        raise BuildError(f"The 8-bit GEMM's input has {cin} channels but its weight expects "
                         f"{wk.shape[1] // (g.kh * g.kw)}.")
    y = result(out.dtype)
    q = result(codes.dtype) if codes is not None else None
    if not x.is_meta and y.numel():
        rc = residual_codes or Codes(torch.float32)
        qc = codes or Codes(torch.int8)
        cfg = config(m, cout, cin) if callable(config) else config
        pointwise = (g.kh, g.kw) == (1, 1) and g.stride == (1, 1) and not any(g.pads)
        epilogue = dict(out_inv=_reciprocal(out.scale), out_zp=float(out.zero_point), q_inv=_reciprocal(qc.scale),
                        q_zp=float(qc.zero_point), r_scale=float(rc.scale), r_zp=float(rc.zero_point),
                        alpha=float(alpha), beta=float(beta), MODE=mode, OUT=kind, LO=lo, HI=hi, QOUT=qkind, QLO=qlo,
                        QHI=qhi, ACT=ACTS.index(act), HAS_RES=residual is not None, RES_AFTER=bool(residual_after))
        if not isinstance(cfg, QGemmConfig):        # a TMA tile config (int8_tma.py)
            from kiln.kernels.int8_tma import launch_tma, launch_tma_conv
            if pointwise:
                done = launch_tma(_matrix(rows, m), wk, _matrix(y, m), _matrix(q, m), _matrix(residual, m), ep, cfg,
                                  epilogue)
            else:
                nhwc = [None if t is None else t.permute(0, 2, 3, 1) for t in (rows, y, q, residual)]
                done = launch_tma_conv(nhwc[0], wk, *nhwc[1:], ep, g, cfg, epilogue)
            if done:
                return y if q is None else (y, q)
            cfg = default_config(m, cout, cin)      # a tensor TMA cannot address (unaligned view)
        bm, bn, bk, warps, stages, group_m = cfg
        big = max(x.numel(), y.numel()) >= 2 ** 31
        _qgemm_kernel[(cdiv(m, bm) * cdiv(cout, bn),)](
            rows, wk, ep.ibias, ep.mult, residual if residual is not None else y, y, q if q is not None else y, m, h,
            w, oh, ow, cout, ep.x_zp, CIN=cin, KH=g.kh, KW=g.kw, SH=g.stride[0], SW=g.stride[1], PH=g.pads[0],
            PW=g.pads[1], DH=g.dilation[0], DW=g.dilation[1], POINTWISE=pointwise, IDX64=big,
            ZP_PAD=not pointwise and ep.x_zp != 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
            num_warps=warps, num_stages=stages, **epilogue)
    return y if q is None else (y, q)


def _matrix(t: torch.Tensor | None, m: int) -> torch.Tensor | None:
    """A layer tensor as the [M, C] matrix of its rows (a view for channels-last 4-D and contiguous tensors)."""
    if t is None:
        return None
    if t.dim() == 4:
        t = t.permute(0, 2, 3, 1)
    return t.reshape(m, t.shape[-1])


def _reciprocal(scale: float) -> float:
    """1 / scale as FP32 arithmetic gives it (the kernel multiplies by it where ONNX divides by the scale)."""
    return float(np.float32(1.0) / np.float32(scale))


def k_major(w: torch.Tensor) -> torch.Tensor:
    """Weight codes [Cout, Cin, KH, KW] (or [N, K]) as the contiguous K-major [Cout, KH·KW·Cin] matrix."""
    if w.dim() == 4:
        w = w.permute(0, 2, 3, 1)
    return w.reshape(w.shape[0], -1).contiguous()


def _supports(fp8: bool):
    def ok(attrs, ctx) -> bool:
        codes = ctx.input_dtypes[0] if ctx.input_dtypes else None
        conv2d = "stride" not in attrs or (len(attrs["stride"]) == 2 and attrs.get("groups", 1) == 1)
        return (HAS_TRITON and conv2d and (attrs.get("activation") or "none") in ACTS
                and (codes == "float8_e4m3fn") == fp8 and (codes in ("int8", "uint8", "float8_e4m3fn") or not codes))
    return ok


def layer_outputs(attrs) -> tuple[Codes, Codes | None, Codes | None]:
    """An 8-bit layer's output, its second output (codes of a float output) and its residual's codes, from its
    attrs."""
    def codes(dtype, scale, zp) -> Codes | None:
        return None if scale is None else Codes(torch_dtype(dtype), scale, int(zp))
    out = codes(attrs["to"], attrs.get("out_scale"), attrs.get("out_zero_point", 0)) or Codes(torch_dtype(attrs["to"]))
    second = codes(attrs.get("codes_to"), attrs.get("codes_scale"), attrs.get("codes_zero_point", 0))
    residual = codes("float32", attrs.get("residual_scale"), attrs.get("residual_zero_point", 0))
    return out, second, residual


def _make(choose: Callable[[int, int, int], NamedTuple]):
    """The maker of a tactic running ``qgemm`` with the tile config ``choose`` gives for (M, N, Cin)."""
    def make(attrs, ctx):
        act, alpha, beta = epilogue_params(attrs)
        after = bool(attrs.get("residual_after_activation"))
        out, second, rcodes = layer_outputs(attrs)
        conv = "stride" in attrs
        cache: dict = {}

        def run(x, w, bias, residual=None):
            wk, ep = per_tensor(cache, w, lambda: (k_major(w), epilogue_terms(attrs, w, bias, x.dtype,
                                                                              ctx.layer_name)))
            g = Geometry(w.shape[2], w.shape[3], tuple(attrs["stride"]), tuple(attrs["pads"]),
                         tuple(attrs["dilation"])) if conv else None
            y = qgemm(x, wk, ep, out, residual, act, alpha, beta, after, g, choose, rcodes, second)
            return y if second is not None else (y,)
        return run
    return make


# the default tile table, and two more (a compile per layer shape each) for levels 4-5 and slow 8-bit layers
# (builder/tactics.py: candidates)
for _kind in ("QConvolution", "QFullyConnected"):
    for _codes, _fp8 in (("int8", False), ("fp8", True)):
        tactic(_kind, f"triton_{_codes}", devices=("cuda",), supports=_supports(_fp8), priority=-1)(
            _make(default_config))
        tactic(_kind, f"triton_{_codes}_wide", devices=("cuda",), supports=_supports(_fp8), priority=-1,
               min_level=4)(_make(wide_config))
        tactic(_kind, f"triton_{_codes}_small", devices=("cuda",), supports=_supports(_fp8), priority=-1,
               min_level=4)(_make(small_config))
