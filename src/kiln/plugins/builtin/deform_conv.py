"""ModulatedDeformConv2d (DCNv2) with ONNX DeformConv (opset 19) semantics.

Each kernel tap reads the input at its regular position plus a learned (dy, dx) offset,
bilinearly interpolated (zero outside the image), scaled by a learned mask; then a
convolution's weights mix the taps. Matches ``torchvision.ops.deform_conv2d`` (offset
channels ordered (offset_group, kh, kw, [dy, dx]); mask channels (offset_group, kh, kw)).

GPU tactics:
- ``triton``: a Triton kernel writes the modulated deformable im2col columns into the
  workspace, then cuBLAS (torch.bmm/mm with ``out=``) multiplies by the weights.
- ``triton_fused``: one Triton implicit-GEMM kernel samples the columns tile by tile in
  registers and feeds ``tl.dot`` directly, never writing them to memory; the weights are
  first rearranged tap-major into the workspace.
Both read X channels-last (each bilinear corner is then a contiguous run of channels): an
NCHW X is first transposed into the workspace.
"""
from __future__ import annotations

from typing import Any

from kiln.errors import PluginError
from kiln.plugins.base import Plugin, TensorDesc, field
from kiln.plugins.builtin import _util
from kiln.plugins.registry import register
from kiln.triton_support import cdiv, next_pow2, tl, triton

_FLOATS = ("float32", "float16", "bfloat16")
_WS_CAP = 512 << 20  # columns for as many images as fit; more images per GEMM only helps up to here


def deform_conv_fields(attrs: dict, opset: int) -> dict:
    """ONNX DeformConv attributes with their defaults (kernel_shape empty = taken from W)."""
    return {"dilations": [int(v) for v in attrs.get("dilations", [1, 1])],
            "group": int(attrs.get("group", 1)),
            "kernel_shape": [int(v) for v in attrs.get("kernel_shape", [])],
            "offset_group": int(attrs.get("offset_group", 1)),
            "pads": [int(v) for v in attrs.get("pads", [0, 0, 0, 0])],
            "strides": [int(v) for v in attrs.get("strides", [1, 1])]}


@register
class ModulatedDeformConv2d(Plugin):
    """Inputs X [N,C,H,W], W [oC,C/group,kH,kW], offset [N,og*kH*kW*2,oH,oW], optional B [oC],
    optional mask [N,og*kH*kW,oH,oW] -> Y [N,oC,oH,oW]. Omitted inputs may be None."""

    name = "ModulatedDeformConv2d"
    namespace = "kiln"
    version = "1"
    # GPU tactics are CUDA-graph safe; "torch" (and Triton on CPU tensors under TRITON_INTERPRET=1)
    # also run when asked by name, eagerly.
    tactics = {"cuda": ("triton", "triton_fused"), "cpu": ("torch",)}

    dilations = field(list, [1, 1], "kernel dilation (h, w)")
    group = field(int, 1, "convolution groups")
    kernel_shape = field(list, [], "(kH, kW); empty = from W")
    offset_group = field(int, 1, "channel groups that share one set of offsets/masks")
    pads = field(list, [0, 0, 0, 0], "(top, left, bottom, right)")
    strides = field(list, [1, 1], "stride (h, w)")

    @classmethod
    def onnx_fields(cls, attrs: dict, opset: int) -> dict:
        return deform_conv_fields(attrs, opset)

    def _geometry(self, x: tuple, w: tuple) -> tuple:
        if len(self.pads) != 4 or len(self.strides) != 2 or len(self.dilations) != 2:
            raise PluginError(f"Plugin ModulatedDeformConv2d is 2-D: pads needs 4 values, strides and dilations 2; "
                              f"got pads={self.pads}, strides={self.strides}, dilations={self.dilations}.")
        kh, kw = (self.kernel_shape or list(w[2:4]))[:2]
        return kh, kw

    def output_descs(self, inputs: list[TensorDesc]) -> list[TensorDesc]:
        x, w, off = inputs[0], inputs[1], inputs[2]
        if x.rank != 4 or w.rank != 4 or off.rank != 4:
            raise PluginError(f"Plugin ModulatedDeformConv2d supports 2-D convolution only (rank-4 X, W, offset); "
                              f"got X {x.shape}, W {w.shape}, offset {off.shape}.")
        kh, kw = self._geometry(x.shape, w.shape)
        spatial = []
        for axis in (0, 1):
            size, k = x.shape[2 + axis], (kh, kw)[axis]
            if off.shape[2 + axis] is not None:
                spatial.append(off.shape[2 + axis])           # the offset map has the output's size
            elif isinstance(size, int) and isinstance(k, int):
                pad = self.pads[axis] + self.pads[axis + 2]
                spatial.append((size + pad - self.dilations[axis] * (k - 1) - 1) // self.strides[axis] + 1)
            else:
                spatial.append(None)
        return [TensorDesc((x.shape[0], w.shape[0], *spatial), x.dtype)]

    def supports(self, index: int, desc: TensorDesc, num_inputs: int) -> bool:
        return desc.layout == "linear" and desc.dtype in _FLOATS

    def workspace_size(self, inputs: list[TensorDesc]) -> int:
        """Room for a channels-last copy of X (both kernels gather channels-contiguous taps), then
        for 'triton' the im2col columns of as many images as fit under 512 MB (at least one), for
        'triton_fused' the weights rearranged tap-major; the larger of the two."""
        x, w = inputs[0], inputs[1]
        (out,) = self.output_descs(inputs)
        c, oc, cg, kh, kw = _util.concrete(self.name, (x.shape[1], *w.shape), "channel/kernel")
        oh, ow = _util.concrete(self.name, out.shape[2:], "output spatial")
        size = _util.itemsize(x.dtype)
        per_image = c * kh * kw * oh * ow * size
        n = x.shape[0] if isinstance(x.shape[0], int) else 1
        h, wd = (d if isinstance(d, int) else 0 for d in x.shape[2:4])
        x_copy = _util.aligned(n * c * h * wd * size)
        cols = _util.aligned(per_image * max(1, min(n, _WS_CAP // max(per_image, 1))))
        return x_copy + max(cols, _util.aligned(oc * cg * kh * kw * size))

    def forward(self, inputs: list[Any], outputs: list[Any], workspace: Any, tactic: str) -> None:
        x, w, off = inputs[0], inputs[1], inputs[2]
        bias, mask = _util.opt(inputs, 3), _util.opt(inputs, 4)
        out = outputs[0]
        kh, kw = self._geometry(tuple(x.shape), tuple(w.shape))
        geo = _Geo(self, x, w, off, mask, kh, kw)
        if tactic == "torch":
            out.copy_(_deform_conv_torch(x, w, off, bias, mask, geo))
        elif tactic == "triton_fused":
            _util.require_triton(self.name)
            _implicit_gemm(self, x, w, off, bias, mask, out, workspace, geo)
        elif tactic == "triton":
            _util.require_triton(self.name)
            _im2col_gemm(self, x, w, off, bias, mask, out, workspace, geo)
        else:
            raise PluginError(f"Plugin ModulatedDeformConv2d has no tactic {tactic!r}; "
                              f"use 'triton', 'triton_fused' or 'torch'.")


class _Geo:
    """Shapes and hyper-parameters of one call, checked once."""

    def __init__(self, p: ModulatedDeformConv2d, x: Any, w: Any, off: Any, mask: Any, kh: int, kw: int) -> None:
        self.n, self.c, self.h, self.w = x.shape
        self.oc = w.shape[0]
        self.kh, self.kw, self.kk = kh, kw, kh * kw
        self.g, self.og = p.group, p.offset_group
        self.oh, self.ow = off.shape[2], off.shape[3]
        self.l = self.oh * self.ow
        self.sh, self.sw = p.strides
        self.dh, self.dw = p.dilations
        self.ph, self.pw = p.pads[0], p.pads[1]
        if self.c % self.g or self.oc % self.g or self.c % self.og or w.shape[1] * self.g != self.c:
            raise PluginError(f"Plugin ModulatedDeformConv2d: channels C={self.c}, oC={self.oc} must divide into "
                              f"group={self.g} (W has {w.shape[1]} input channels per group) and "
                              f"offset_group={self.og}.")
        if off.shape[1] != self.og * self.kk * 2 or (mask is not None and mask.shape[1] != self.og * self.kk):
            raise PluginError(f"Plugin ModulatedDeformConv2d: offset needs {self.og * self.kk * 2} channels and mask "
                              f"{self.og * self.kk} for offset_group={self.og} and a {kh}x{kw} kernel; got "
                              f"{off.shape[1]} and {None if mask is None else mask.shape[1]}.")
        self.cg, self.ocg, self.cpo = self.c // self.g, self.oc // self.g, self.c // self.og
        for axis, (size, k, o) in enumerate(((self.h, kh, self.oh), (self.w, kw, self.ow))):
            want = (size + p.pads[axis] + p.pads[axis + 2] - p.dilations[axis] * (k - 1) - 1) // p.strides[axis] + 1
            if o != want:
                raise PluginError(f"Plugin ModulatedDeformConv2d: the offset map is {self.oh}x{self.ow} but the "
                                  f"convolution's output is {want} along axis {axis + 2}; check pads/strides/dilations.")


# ---- CPU: torch ------------------------------------------------------------------------------

def _deform_columns_torch(x: Any, off: Any, mask: Any, geo: _Geo) -> Any:
    """Modulated deformable im2col: [N, C*kH*kW, oH*oW], rows ordered (c, kh, kw)."""
    import torch

    n, og, kk, l = geo.n, geo.og, geo.kk, geo.l
    dev = x.device
    xf = x.float().reshape(n, og, geo.cpo, geo.h * geo.w)
    o = off.float().reshape(n, og, kk, 2, l)
    m = mask.float().reshape(n, og, kk, l) if mask is not None else None
    i = torch.arange(geo.kh, device=dev).repeat_interleave(geo.kw) * geo.dh
    j = torch.arange(geo.kw, device=dev).repeat(geo.kh) * geo.dw
    oy = (torch.arange(geo.oh, device=dev) * geo.sh - geo.ph).repeat_interleave(geo.ow)
    ox = (torch.arange(geo.ow, device=dev) * geo.sw - geo.pw).repeat(geo.oh)
    py = (oy[None, :] + i[:, None]).float() + o[:, :, :, 0]          # [n, og, kk, l]
    px = (ox[None, :] + j[:, None]).float() + o[:, :, :, 1]
    inside = (py > -1) & (py < geo.h) & (px > -1) & (px < geo.w)
    y0, x0 = torch.floor(py), torch.floor(px)
    ly, lx = py - y0, px - x0
    y0, x0 = y0.long(), x0.long()
    cols = torch.zeros(n, og, geo.cpo, kk, l, dtype=torch.float32, device=dev)
    for dy, dx, wt in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
        yy, xx = y0 + dy, x0 + dx
        ok = inside & (yy >= 0) & (yy < geo.h) & (xx >= 0) & (xx < geo.w)
        idx = torch.where(ok, yy * geo.w + xx, torch.zeros_like(yy)).reshape(n, og, 1, kk * l)
        v = torch.gather(xf, 3, idx.expand(n, og, geo.cpo, kk * l)).reshape(n, og, geo.cpo, kk, l)
        cols += v * torch.where(ok, wt, torch.zeros_like(wt))[:, :, None]
    if m is not None:
        cols *= m[:, :, None]
    return cols.reshape(n, geo.c * kk, l)


def _deform_conv_torch(x: Any, w: Any, off: Any, bias: Any, mask: Any, geo: _Geo) -> Any:
    cols = _deform_columns_torch(x, off, mask, geo).reshape(geo.n, geo.g, geo.cg * geo.kk, geo.l)
    y = w.float().reshape(geo.g, geo.ocg, geo.cg * geo.kk) @ cols                  # [n, g, ocg, l]
    y = y.reshape(geo.n, geo.oc, geo.oh, geo.ow)
    if bias is not None:
        y = y + bias.float().reshape(1, -1, 1, 1)
    return y


# ---- GPU: Triton -----------------------------------------------------------------------------

@triton.jit
def _blend(p00, p01, p10, p11, m00, m01, m10, m11, w00, w01, w10, w11, HALF: tl.constexpr):
    """The bilinear sample at four corner pointers (masked corners read 0) times their weights: in the
    input's FP16 when HALF (as torchvision blends; the weights arrive FP16), else in FP32."""
    if HALF:
        v = w00 * tl.load(p00, mask=m00, other=0.0)
        v += w01 * tl.load(p01, mask=m01, other=0.0)
        v += w10 * tl.load(p10, mask=m10, other=0.0)
        v += w11 * tl.load(p11, mask=m11, other=0.0)
    else:
        v = w00 * tl.load(p00, mask=m00, other=0.0).to(tl.float32)
        v += w01 * tl.load(p01, mask=m01, other=0.0).to(tl.float32)
        v += w10 * tl.load(p10, mask=m10, other=0.0).to(tl.float32)
        v += w11 * tl.load(p11, mask=m11, other=0.0).to(tl.float32)
    return v


@triton.jit
def _dcn_im2col_kernel(x_ptr, off_ptr, mask_ptr, col_ptr, n0, C, H, W, OW, L, sxn, sxc, sxh, sxw,
                       son, soc, soh, sow, smn, smc, smh, smw, SH, SW, PH, PW, DH, DW, CPO, CCH, CHUNKS,
                       KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr, HALF: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pb = tl.program_id(0)
    nk = tl.program_id(1)
    cb = tl.program_id(2)
    KK: tl.constexpr = KH * KW
    nl = nk // KK
    k = nk % KK
    n = (n0 + nl).to(tl.int64)
    og = cb // CHUNKS
    c_lo = og * CPO + (cb % CHUNKS) * CCH
    c_hi = tl.minimum(c_lo + CCH, (og + 1) * CPO)
    l = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    lm = l < L
    oh = l // OW
    ow = l % OW
    op = off_ptr + n * son + (og * 2 * KK + 2 * k) * soc + oh * soh + ow * sow
    dy = tl.load(op, mask=lm, other=0.0).to(tl.float32)
    dx = tl.load(op + soc, mask=lm, other=0.0).to(tl.float32)
    if HAS_MASK:
        mv = tl.load(mask_ptr + n * smn + (og * KK + k) * smc + oh * smh + ow * smw, mask=lm, other=0.0)
        mv = mv.to(tl.float32)
    else:
        mv = tl.full([BLOCK_P], 1.0, tl.float32)
    py = (oh * SH - PH + (k // KW) * DH).to(tl.float32) + dy
    px = (ow * SW - PW + (k % KW) * DW).to(tl.float32) + dx
    inside = (py > -1.0) & (py < H * 1.0) & (px > -1.0) & (px < W * 1.0) & lm
    y0f = tl.floor(py)
    x0f = tl.floor(px)
    ly = py - y0f
    lx = px - x0f
    y0 = y0f.to(tl.int32)
    x0 = x0f.to(tl.int32)
    okt = inside & (y0 >= 0)
    okb = inside & (y0 + 1 < H)
    okl = x0 >= 0
    okr = x0 + 1 < W
    m00 = (okt & okl)[None, :]
    m01 = (okt & okr)[None, :]
    m10 = (okb & okl)[None, :]
    m11 = (okb & okr)[None, :]
    w00 = ((1.0 - ly) * (1.0 - lx) * mv)[None, :]
    w01 = ((1.0 - ly) * lx * mv)[None, :]
    w10 = (ly * (1.0 - lx) * mv)[None, :]
    w11 = (ly * lx * mv)[None, :]
    if HALF:        # FP16: blend in FP16 as torchvision does (no per-element conversions)
        w00 = w00.to(tl.float16)
        w01 = w01.to(tl.float16)
        w10 = w10.to(tl.float16)
        w11 = w11.to(tl.float16)
    o00 = (y0 * sxh + x0 * sxw)[None, :]
    o01 = o00 + sxw
    o10 = o00 + sxh
    o11 = o10 + sxw
    xb = x_ptr + n * sxn
    cb_ptr = col_ptr + nl.to(tl.int64) * C * KK * L + k * L + l[None, :]
    c0 = c_lo
    while c0 < c_hi:
        c = c0 + tl.arange(0, BLOCK_C)
        cm = (c < c_hi)[:, None]
        base = xb + (c * sxc)[:, None]
        v = _blend(base + o00, base + o01, base + o10, base + o11, cm & m00, cm & m01, cm & m10, cm & m11,
                   w00, w01, w10, w11, HALF)
        tl.store(cb_ptr + (c.to(tl.int64) * KK * L)[:, None], v.to(col_ptr.dtype.element_ty), mask=cm & lm[None, :])
        c0 += BLOCK_C


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, R, S, s_b, s_r, s_s, d_b, d_s, S_MOD, S_MUL,
                      BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """dst[b, (s % S_MOD) * S_MUL + s // S_MOD, r] = src[b, r, s], dst contiguous along r.

    A tile is read along s and written along r (Triton moves it through shared memory), so
    both sides coalesce. NCHW X -> NHWC is (b, r, s) = (n, c, pixel) with S_MOD = 1; the
    weights [oC, Cg, kH, kW] -> [g, kH*kW, Cg, oCg] are (g, oc, c*kH*kW + k) with S_MOD = kH*kW,
    S_MUL = Cg, which puts tap-major rows under each output channel."""
    ps = tl.program_id(0)
    pr = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    r = pr * BLOCK_R + tl.arange(0, BLOCK_R)
    s = ps * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = (r < R)[:, None] & (s < S)[None, :]
    v = tl.load(src_ptr + b * s_b + (r * s_r)[:, None] + (s * s_s)[None, :], mask=ok)
    t = (s % S_MOD) * S_MUL + s // S_MOD
    tl.store(dst_ptr + b * d_b + (t * d_s)[None, :] + r[:, None], v.to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dcn_implicit_gemm_kernel(x_ptr, wt_ptr, off_ptr, mask_ptr, b_ptr, out_ptr, H, W, OW, L, NL, OC, CG, OCG, CPO,
                              sxn, sxh, sxw, son, soc, soh, sow, smn, smc, smh, smw, SH, SW, PH, PW, DH, DW,
                              KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                              IEEE: tl.constexpr, HALF: tl.constexpr, SEGMENTS: tl.constexpr, CHUNKS: tl.constexpr,
                              EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Y tile [BLOCK_M pixels (n*L + l), BLOCK_N output channels of group g] = sampled X @ Wt.

    X is channels-last (unit channel stride), so each bilinear corner of a pixel is a
    contiguous run of channels and the A tile gathers whole 64-128 byte rows. The bilinear
    data of a pixel (4 corner pointers, weights x mask, validity) depends on the tap and the
    offset group only: it is computed once per (tap, offset-group segment of the conv
    group) and reused by every BLOCK_K channel chunk in it. Wt is [g, kH*kW*Cg, oCg] (tap
    major), so B tiles are plain row-major loads the pipeliner can prefetch.

    Trip counts are constexpr upper bounds (SEGMENTS per group, CHUNKS per segment): loops
    with constant bounds pipeline, and Triton's interpreter cannot take a tensor bound.
    Without EVEN_K a chunk or a whole segment may run past its channels and is masked."""
    KK: tl.constexpr = KH * KW
    pid = tl.program_id(0)
    g = tl.program_id(1)
    num_m = tl.cdiv(NL, BLOCK_M)
    num_n = tl.cdiv(OCG, BLOCK_N)
    per_band = GROUP_M * num_n                      # GROUP_M pixel tiles x all channel tiles share X in L2
    first_m = (pid // per_band) * GROUP_M
    band_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_band) % band_m
    pid_n = (pid % per_band) // band_m

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < NL
    n = (m // L).to(tl.int64)
    l = m % L
    oh = l // OW
    ow = l % OW
    x_row = x_ptr + n * sxn
    off_row = off_ptr + n * son + oh * soh + ow * sow
    mask_row = mask_ptr + n * smn + oh * smh + ow * smw
    y_at = oh * SH - PH
    x_at = ow * SW - PW
    ocn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    oc_ok = ocn < OCG
    rk = tl.arange(0, BLOCK_K)
    c_first = g * CG
    og_first = c_first // CPO
    og_last = (c_first + CG - 1) // CPO              # loads stay in bounds in an empty segment
    w_tile = wt_ptr + g * (KK * CG * OCG) + ocn[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(KK):
        py0 = (y_at + (k // KW) * DH).to(tl.float32)
        px0 = (x_at + (k % KW) * DW).to(tl.float32)
        for sg in range(SEGMENTS):
            c_lo = tl.maximum(c_first, (og_first + sg) * CPO)
            c_hi = tl.minimum(c_first + CG, (og_first + sg + 1) * CPO)
            og = tl.minimum(og_first + sg, og_last)
            dy = tl.load(off_row + (og * 2 * KK + 2 * k) * soc, mask=m_ok, other=0.0).to(tl.float32)
            dx = tl.load(off_row + (og * 2 * KK + 2 * k + 1) * soc, mask=m_ok, other=0.0).to(tl.float32)
            py = py0 + dy
            px = px0 + dx
            inside = (py > -1.0) & (py < H * 1.0) & (px > -1.0) & (px < W * 1.0) & m_ok
            y0f = tl.floor(py)
            x0f = tl.floor(px)
            ly = py - y0f
            lx = px - x0f
            hy = 1.0 - ly
            hx = 1.0 - lx
            if HAS_MASK:
                mv = tl.load(mask_row + (og * KK + k) * smc, mask=m_ok, other=0.0).to(tl.float32)
                hy *= mv
                ly *= mv
            y0 = y0f.to(tl.int32)
            x0 = x0f.to(tl.int32)
            okt = inside & (y0 >= 0)
            okb = inside & (y0 + 1 < H)
            okl = x0 >= 0
            okr = x0 + 1 < W
            m00 = (okt & okl)[:, None]
            m01 = (okt & okr)[:, None]
            m10 = (okb & okl)[:, None]
            m11 = (okb & okr)[:, None]
            w00 = (hy * hx)[:, None]
            w01 = (hy * lx)[:, None]
            w10 = (ly * hx)[:, None]
            w11 = (ly * lx)[:, None]
            if HALF:    # FP16: blend in FP16 as torchvision does (no per-element conversions)
                w00 = w00.to(tl.float16)
                w01 = w01.to(tl.float16)
                w10 = w10.to(tl.float16)
                w11 = w11.to(tl.float16)
            p00 = (x_row + y0 * sxh + x0 * sxw)[:, None]
            p01 = p00 + sxw
            p10 = p00 + sxh
            p11 = p10 + sxw
            for i in range(CHUNKS):
                c0 = c_lo + i * BLOCK_K
                cc = (c0 + rk)[None, :]
                if EVEN_K:           # chunks never cross a group or offset-group boundary
                    a = _blend(p00 + cc, p01 + cc, p10 + cc, p11 + cc, m00, m01, m10, m11, w00, w01, w10, w11, HALF)
                    b = tl.load(w_tile + (k * CG + c0 - c_first + rk)[:, None] * OCG, mask=oc_ok[None, :],
                                other=0.0)
                else:
                    c_ok = cc < c_hi
                    a = _blend(p00 + cc, p01 + cc, p10 + cc, p11 + cc, m00 & c_ok, m01 & c_ok, m10 & c_ok,
                               m11 & c_ok, w00, w01, w10, w11, HALF)
                    b = tl.load(w_tile + (k * CG + c0 - c_first + rk)[:, None] * OCG,
                                mask=(c0 + rk < c_hi)[:, None] & oc_ok[None, :], other=0.0)
                if IEEE:
                    acc = tl.dot(a, b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a.to(b.dtype), b, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + g * OCG + ocn, mask=oc_ok, other=0.0).to(tl.float32)[None, :]
    y = out_ptr + (n * OC * L + l)[:, None] + ((g * OCG + ocn) * L)[None, :]
    tl.store(y, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & oc_ok[None, :])


def im2col_launch_config(geo: _Geo, itemsize: int = 4) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_P, channels per program, num_warps) for channels-last X: each tap's
    channels are contiguous, so a program gathers BLOCK_C channels × BLOCK_P pixels per step
    (about 2-4 KB), all of an offset group's channels per program: (32, 64) for FP16, (32, 16) for
    FP32 (benchmarks/sweep_plugins.py --only dcn_nhwc sweeps them)."""
    block_c = min(32, next_pow2(geo.cpo))
    block_p = min(64 if itemsize <= 2 else 16, next_pow2(geo.l))
    return block_c, block_p, min(geo.cpo, 256), 4


def _im2col_gemm(p: ModulatedDeformConv2d, x: Any, w: Any, off: Any, bias: Any, mask: Any, out: Any,
                 workspace: Any, geo: _Geo, config: tuple | None = None) -> None:
    import torch

    if out.numel() == 0:
        return
    nhwc = x.is_contiguous(memory_format=torch.channels_last)     # as FP16 conv stacks hand it over
    x_bytes = 0 if nhwc else _util.aligned(x.numel() * x.element_size())
    per_image = geo.c * geo.kk * geo.l
    have = 0 if workspace is None else max(0, workspace.numel() - x_bytes) // x.element_size()
    if have >= per_image:
        chunk = min(geo.n, have // per_image)
    else:      # no (big enough) workspace: eager use only, carve() allocates
        chunk = max(1, min(geo.n, _WS_CAP // (per_image * x.element_size())))
    parts = [] if nhwc else [((geo.n, geo.h, geo.w, geo.c), x.dtype)]
    views = _util.carve(workspace, parts + [((chunk, geo.c * geo.kk, geo.l), x.dtype)], x.device, p.name)
    if not nhwc:          # one pass to channels-last makes every bilinear tap a contiguous channel run
        x = _to_nhwc(x, views[0])
    cols = views[-1]
    block_c, block_p, cch, warps = config or im2col_launch_config(geo, x.element_size())
    chunks = cdiv(geo.cpo, cch)
    wm = w.reshape(geo.g, geo.ocg, geo.cg * geo.kk)
    mk = mask if mask is not None else off
    for n0 in range(0, geo.n, chunk):
        nc = min(chunk, geo.n - n0)
        grid = (cdiv(geo.l, block_p), nc * geo.kk, geo.og * chunks)
        _dcn_im2col_kernel[grid](x, off, mk, cols, n0, geo.c, geo.h, geo.w, geo.ow, geo.l, *x.stride(),
                                 *off.stride(), *mk.stride(), geo.sh, geo.sw, geo.ph, geo.pw, geo.dh, geo.dw,
                                 geo.cpo, cch, chunks, KH=geo.kh, KW=geo.kw, HAS_MASK=mask is not None,
                                 HALF=x.dtype == torch.float16,
                                 BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)
        y = out[n0:n0 + nc].view(nc, geo.oc, geo.l)
        if geo.g == 1:
            torch.bmm(wm[0].expand(nc, geo.ocg, geo.c * geo.kk), cols[:nc], out=y)
        else:
            for i in range(nc):
                for g in range(geo.g):
                    rows = slice(g * geo.cg * geo.kk, (g + 1) * geo.cg * geo.kk)
                    torch.mm(wm[g], cols[i, rows], out=y[i, g * geo.ocg:(g + 1) * geo.ocg])
    if bias is not None:
        out.add_(bias.view(1, -1, 1, 1))


# (BLOCK_R, BLOCK_S, num_warps) of the layout transposes: 64x64 tiles (8-16 KB through shared
# memory) read and write 128-256 bytes per row; benchmarks/sweep_plugins.py --only dcn_fused times others.
TRANSPOSE_CONFIG = (64, 64, 4)


def _transpose(src: Any, dst: Any, batch: int, r: int, s: int, src_strides: tuple, d_b: int, d_s: int,
               s_mod: int = 1, s_mul: int = 1, config: tuple | None = None) -> None:
    block_r, block_s, warps = config or TRANSPOSE_CONFIG
    grid = (cdiv(s, block_s), cdiv(r, block_r), batch)
    _transpose_kernel[grid](src, dst, r, s, *src_strides, d_b, d_s, s_mod, s_mul, BLOCK_R=block_r, BLOCK_S=block_s,
                            num_warps=warps)


def _to_nhwc(x: Any, buf: Any, config: tuple | None = None) -> Any:
    """NCHW X copied into ``buf`` [N, H, W, C], returned as an NCHW-shaped channels-last view.
    The tiled transpose reads pixel rows and writes channel rows, both coalesced (torch's
    permute-copy does not); X whose H and W do not merge into one stride takes torch's copy."""
    n, c, h, w = x.shape
    if h == 1 or x.stride(2) == w * x.stride(3):
        _transpose(x, buf, n, c, h * w, (x.stride(0), x.stride(1), x.stride(3)), h * w * c, c, config=config)
    else:
        buf.copy_(x.permute(0, 2, 3, 1))
    return buf.permute(0, 3, 1, 2)


def _tap_major_weights(w: Any, buf: Any, geo: _Geo) -> None:
    """W [oC, Cg, kH, kW] into ``buf`` as [g, kH*kW*Cg, oCg]: the implicit GEMM's B, rows ordered
    (tap, channel) like its K loop, output channels contiguous."""
    if w.is_contiguous():
        _transpose(w, buf, geo.g, geo.ocg, geo.cg * geo.kk, (geo.ocg * w.stride(0), w.stride(0), 1),
                   geo.kk * geo.cg * geo.ocg, geo.ocg, geo.kk, geo.cg)
    else:
        buf.view(geo.g, geo.kh, geo.kw, geo.cg, geo.ocg).copy_(w.unflatten(0, (geo.g, geo.ocg)).permute(0, 3, 4, 2, 1))


_SMS = 132    # streaming multiprocessors of an H100 SXM: tiles shrink until the grid about fills them


def fused_configs(itemsize: int, ieee: bool) -> list[tuple[int, int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the sweep times
    (benchmarks/sweep_plugins.py --only dcn_fused), less those that spill more than 8 bytes of
    registers on sm_90 at the benchmark shape (listed by
    ``DCN_ALL_CONFIGS=1 python tests/plugins/sm90_compile.py deform_conv -v``).

    Tensor-core dots: BLOCK_N 256 gathers each pixel's samples once for 256 output channels,
    64-128 suit small batches. num_stages 1 keeps the gathers plain L1-cached loads; 2-3 let
    Triton stream them into shared memory with cp.async, which bypasses L1 but hides latency:
    which wins depends on how much neighbouring pixels' samples overlap, so both are timed.
    IEEE FP32 multiplies on FMA units from registers, so its tiles are smaller."""
    if ieee:
        return [(bm, bn, bk, wp, st) for bm, bn, wp in ((32, 64, 4), (32, 128, 4), (32, 128, 8), (64, 64, 4),
                                                        (64, 64, 8), (64, 128, 8), (128, 64, 8), (128, 128, 8))
                for bk in (16, 32) for st in (1, 2) if bm * bn * bk <= 128 * 128 * 16]
    out = [(bm, bn, bk, 8, st) for bm in (64, 128) for bn in (64, 128, 256) for bk in (32, 64) for st in (1, 2, 3)
           if bm * bn * bk < 128 * 256 * 64]
    out += [(64, 64, 32, 4, 2), (64, 64, 32, 4, 3), (64, 128, 32, 4, 2), (64, 128, 32, 4, 3), (128, 64, 32, 4, 2)]
    # TF32: 32 channels a step and no 128x256 tile (their stages overflow shared memory or spill)
    return [c for c in out if c[2] * itemsize <= 128 and c[0] * c[1] * itemsize <= 128 * 256 * 2]


def fused_launch_config(geo: _Geo, itemsize: int, ieee: bool) -> tuple[int, int, int, int, int]:
    """The implicit GEMM's configuration: the default tile, made smaller (pixels first, down to
    64, then channels) while the grid would leave a quarter of the SMs idle, then clamped to
    small channel and pixel counts (tl.dot needs 16 or more per side)."""
    if ieee:
        block_m, block_n, block_k, warps, stages = 128, 128, 16, 8, 2
    else:
        block_m, block_n, block_k, warps, stages = 128, 256 if itemsize <= 2 else 128, 32, 8, 3
    nl = geo.n * geo.l
    while cdiv(nl, block_m) * cdiv(geo.ocg, block_n) * geo.g < _SMS * 3 // 4:
        if block_m > 64:
            block_m //= 2
        elif block_n > 64:
            block_n //= 2
        else:
            break
    block_m = max(16, min(block_m, next_pow2(nl)))
    block_n = max(16, min(block_n, next_pow2(geo.ocg)))
    block_k = max(16, min(block_k, next_pow2(min(geo.cg, geo.cpo))))
    return block_m, block_n, block_k, warps, stages


def _implicit_gemm(p: ModulatedDeformConv2d, x: Any, w: Any, off: Any, bias: Any, mask: Any, out: Any,
                   workspace: Any, geo: _Geo, config: tuple | None = None) -> None:
    import torch

    if out.numel() == 0:
        return
    nhwc = x.is_contiguous(memory_format=torch.channels_last)
    parts = [] if nhwc else [((geo.n, geo.h, geo.w, geo.c), x.dtype)]
    views = _util.carve(workspace, parts + [((geo.g, geo.kk * geo.cg, geo.ocg), x.dtype)], x.device, p.name)
    if not nhwc:
        x = _to_nhwc(x, views[0])
    wt = views[-1]
    _tap_major_weights(w, wt, geo)
    ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    block_m, block_n, block_k, warps, stages = config or fused_launch_config(geo, x.element_size(), ieee)
    if geo.cpo % geo.cg == 0:            # the group lies in one offset group
        segments = 1
    elif geo.cg % geo.cpo == 0:
        segments = geo.cg // geo.cpo
    else:                                # unaligned: some groups straddle one more boundary
        segments = cdiv(geo.cg, geo.cpo) + 1
    even_k = geo.cg % block_k == 0 and geo.cpo % block_k == 0 and segments * min(geo.cg, geo.cpo) == geo.cg
    mk = mask if mask is not None else off
    nl = geo.n * geo.l
    grid = (cdiv(nl, block_m) * cdiv(geo.ocg, block_n), geo.g)
    _dcn_implicit_gemm_kernel[grid](
        x, wt, off, mk, bias if bias is not None else wt, out, geo.h, geo.w, geo.ow, geo.l, nl, geo.oc, geo.cg,
        geo.ocg, geo.cpo, x.stride(0), x.stride(2), x.stride(3), *off.stride(), *mk.stride(), geo.sh, geo.sw,
        geo.ph, geo.pw, geo.dh, geo.dw, KH=geo.kh, KW=geo.kw, HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
        IEEE=ieee, HALF=x.dtype == torch.float16, SEGMENTS=segments, CHUNKS=cdiv(min(geo.cg, geo.cpo), block_k), EVEN_K=even_k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=warps, num_stages=stages)
