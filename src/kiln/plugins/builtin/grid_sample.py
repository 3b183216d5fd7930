"""GridSample and AffineGrid (ONNX opsets 16/20, 4-D): the spatial transformer pair.

AffineGrid turns a batch of 2x3 affine matrices into a sampling grid; GridSample reads
the input at those (normalized) positions. Semantics are PyTorch's
``grid_sample``/``affine_grid``, which ONNX specifies and ONNX Runtime implements:
bilinear, nearest (round half to even) and bicubic (A = -0.75); zeros, border and
reflection padding; both ``align_corners`` conventions.

GPU: one Triton program per (image, block of output pixels, chunk of channels) computes
the taps and weights once and reuses them for every channel of its chunk; loads and
stores run along output pixels, which are contiguous in memory.
"""
from __future__ import annotations

from typing import Any

from kiln.errors import PluginError
from kiln.plugins.base import Plugin, TensorDesc, field
from kiln.plugins.builtin import _util
from kiln.plugins.builtin._util import tl, triton
from kiln.plugins.registry import register

_FLOATS = ("float32", "float16", "bfloat16")
_MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
_PADS = {"zeros": 0, "border": 1, "reflection": 2}
_OPSET20_NAMES = {"linear": "bilinear", "cubic": "bicubic", "nearest": "nearest"}


def grid_sample_fields(attrs: dict, opset: int) -> dict:
    """Opset 20 renamed the modes (linear/cubic); Kiln stores the opset-16 names."""
    mode = _util.attr_str(attrs.get("mode", "linear" if opset >= 20 else "bilinear"))
    return {"mode": _OPSET20_NAMES.get(mode, mode),
            "padding_mode": _util.attr_str(attrs.get("padding_mode", "zeros")),
            "align_corners": int(attrs.get("align_corners", 0))}


@register
class GridSample(Plugin):
    """ONNX GridSample (4-D): X [N,C,H,W], grid [N,Ho,Wo,2] of normalized (x, y) -> [N,C,Ho,Wo]."""

    name = "GridSample"
    namespace = "kiln"
    version = "1"
    tactics = {"cuda": ("triton",), "cpu": ("torch",)}   # "torch" also runs on CUDA, eagerly

    mode = field(str, "bilinear", "interpolation", choices=tuple(_MODES))
    padding_mode = field(str, "zeros", "values read outside the input", choices=tuple(_PADS))
    align_corners = field(int, 0, "1: -1/1 are the corner pixels' centers; 0: their outer edges", choices=(0, 1))

    @classmethod
    def onnx_fields(cls, attrs: dict, opset: int) -> dict:
        return grid_sample_fields(attrs, opset)

    def output_descs(self, inputs: list[TensorDesc]) -> list[TensorDesc]:
        x, grid = inputs[0], inputs[1]
        if x.rank != 4 or grid.rank != 4:
            raise PluginError(f"Plugin GridSample supports 4-D input only, got X {x.shape} and grid {grid.shape}; "
                              f"5-D (volumetric) sampling is not implemented.")
        return [TensorDesc((x.shape[0], x.shape[1], grid.shape[1], grid.shape[2]), x.dtype)]

    def supports(self, index: int, desc: TensorDesc, num_inputs: int) -> bool:
        return desc.layout == "linear" and desc.dtype in _FLOATS and (index != 1 or desc.rank == 4)

    def forward(self, inputs: list[Any], outputs: list[Any], workspace: Any, tactic: str) -> None:
        x, grid = inputs[0], inputs[1]
        if tactic == "triton":
            _grid_sample_triton(self, x, grid, outputs[0])
        elif tactic == "torch":
            import torch.nn.functional as F

            y = F.grid_sample(x.float(), grid.float(), mode=self.mode, padding_mode=self.padding_mode,
                              align_corners=bool(self.align_corners))
            outputs[0].copy_(y)
        else:
            raise PluginError(f"Plugin GridSample has no tactic {tactic!r}; use 'triton' or 'torch'.")


def affine_grid_fields(attrs: dict, opset: int) -> dict:
    """``size`` is an input in ONNX; a parser that folds a constant one passes it in ``attrs``."""
    out = {"align_corners": int(attrs.get("align_corners", 0))}
    if attrs.get("size") is not None:
        out["size"] = [int(v) for v in attrs["size"]]
    return out


@register
class AffineGrid(Plugin):
    """ONNX AffineGrid (opset 20, 2-D): theta [N,2,3] and size (N,C,H,W) -> grid [N,H,W,2].

    The output shape depends on the *values* of ``size``, so the engine needs them at
    build time: the ``size`` field (the folded constant input). Without it the plugin
    reads a second input tensor, which costs a host sync and is for eager use only.
    """

    name = "AffineGrid"
    namespace = "kiln"
    version = "1"
    tactics = {"cuda": ("triton",), "cpu": ("torch",)}   # "torch" also runs on CUDA, eagerly

    align_corners = field(int, 0, "same convention as GridSample", choices=(0, 1))
    size = field(list, [], "output size [N, C, H, W] (the constant 'size' input)")

    @classmethod
    def onnx_fields(cls, attrs: dict, opset: int) -> dict:
        return affine_grid_fields(attrs, opset)

    def _hw(self) -> tuple[int, int] | None:
        if not self.size:
            return None
        if len(self.size) != 4:
            raise PluginError(f"Plugin AffineGrid field 'size' must be [N, C, H, W] (2-D), got {self.size}.")
        return int(self.size[2]), int(self.size[3])

    def output_descs(self, inputs: list[TensorDesc]) -> list[TensorDesc]:
        theta = inputs[0]
        if theta.rank != 3 or theta.shape[1:] not in ((2, 3), (None, None)):
            raise PluginError(f"Plugin AffineGrid needs theta of shape [N, 2, 3], got {theta.shape}.")
        hw = self._hw() or (None, None)
        return [TensorDesc((theta.shape[0], hw[0], hw[1], 2), theta.dtype)]

    def supports(self, index: int, desc: TensorDesc, num_inputs: int) -> bool:
        if index == 1 and num_inputs == 2:
            return desc.dtype == "int64"
        return desc.layout == "linear" and desc.dtype in _FLOATS

    def forward(self, inputs: list[Any], outputs: list[Any], workspace: Any, tactic: str) -> None:
        theta = inputs[0]
        hw = self._hw()
        if hw is None:
            size = _util.opt(inputs, 1)
            if size is None:
                raise PluginError("Plugin AffineGrid needs its 'size' field or a 'size' input [N, C, H, W].")
            hw = tuple(int(v) for v in size.tolist()[2:4])   # host sync: eager use only
        out = outputs[0]
        if tactic == "triton":
            _affine_grid_triton(self, theta, hw, out)
        elif tactic == "torch":
            out.copy_(affine_grid_torch(theta, hw, bool(self.align_corners)))
        else:
            raise PluginError(f"Plugin AffineGrid has no tactic {tactic!r}; use 'triton' or 'torch'.")


def _base(n: int, align: bool, device: Any) -> Any:
    """Normalized pixel centers. A unit axis with align_corners=1 sits at +1 as in ONNX Runtime
    (Eigen's LinSpaced returns its upper end); torch's affine_grid (since 1.3) puts it at 0."""
    import torch

    i = torch.arange(n, dtype=torch.float32, device=device)
    if align:
        return i * 2.0 / (n - 1) - 1.0 if n > 1 else i + 1.0
    return (i * 2.0 + 1.0) / n - 1.0


def affine_grid_torch(theta: Any, hw: tuple[int, int], align: bool) -> Any:
    import torch

    h, w = hw
    xs, ys = _base(w, align, theta.device), _base(h, align, theta.device)
    base = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=theta.device)], -1)
    return torch.einsum("hwk,njk->nhwj", base, theta.float())


# ---- GPU: Triton -----------------------------------------------------------------------------

@triton.jit
def _unnormalize(g, size, ALIGN: tl.constexpr):
    if ALIGN:
        return (g + 1.0) / 2.0 * (size - 1)
    else:
        return ((g + 1.0) * size - 1.0) / 2.0

@triton.jit
def _pad_coord(v, size, PAD: tl.constexpr, ALIGN: tl.constexpr):
    """torch's compute_coordinates: clip (border) or reflect-then-clip (reflection)."""
    if PAD == 2:
        if ALIGN:
            lo = 0.0
            span = (size - 1) * 1.0
        else:
            lo = -0.5
            span = size * 1.0
        safe = tl.maximum(span, 1e-30)
        d = tl.abs(v - lo)
        flips = tl.floor(d / safe)
        extra = d - flips * safe
        odd = (flips - 2.0 * tl.floor(flips * 0.5)) != 0.0
        v = tl.where(odd, span - extra + lo, extra + lo)
        v = tl.where(span > 0.0, v, 0.0)
    if PAD != 0:
        v = tl.minimum(tl.maximum(v, 0.0), (size - 1) * 1.0)
    return v

@triton.jit
def _cubic_near(t):   # |d| <= 1, A = -0.75
    return ((1.25 * t - 2.25) * t) * t + 1.0

@triton.jit
def _cubic_far(t):    # 1 < |d| < 2
    return ((-0.75 * t + 3.75) * t - 6.0) * t + 3.0

@triton.jit(do_not_specialize=["H", "W"])
def _grid_sample_kernel(x_ptr, g_ptr, out_ptr, C, H, W, HWo, Wo, sxn, sxc, sxh, sxw, sgn, sgh, sgw, sgc,
                       C_CHUNK, MODE: tl.constexpr, PAD: tl.constexpr, ALIGN: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pb = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    cc = tl.program_id(2)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < HWo
    oh = p // Wo
    ow = p % Wo
    gp = g_ptr + n * sgn + oh * sgh + ow * sgw
    gx = tl.load(gp, mask=pm, other=0.0).to(tl.float32)
    gy = tl.load(gp + sgc, mask=pm, other=0.0).to(tl.float32)
    ix = _unnormalize(gx, W, ALIGN)
    iy = _unnormalize(gy, H, ALIGN)
    xb = x_ptr + n * sxn
    ob = out_ptr + n * C * HWo
    c_lo = cc * C_CHUNK
    c_hi = tl.minimum(c_lo + C_CHUNK, C)
    if MODE == 0:
        ix = _pad_coord(ix, W, PAD, ALIGN)
        iy = _pad_coord(iy, H, PAD, ALIGN)
        x0f = tl.floor(ix)
        y0f = tl.floor(iy)
        wx1 = ix - x0f
        wx0 = 1.0 - wx1
        wy1 = iy - y0f
        wy0 = 1.0 - wy1
        x0 = x0f.to(tl.int32)
        y0 = y0f.to(tl.int32)
        x1 = x0 + 1
        y1 = y0 + 1
        vx0 = (x0 >= 0) & (x0 < W)
        vx1 = (x1 >= 0) & (x1 < W)
        vy0 = (y0 >= 0) & (y0 < H) & pm
        vy1 = (y1 >= 0) & (y1 < H) & pm
        m00 = (vy0 & vx0)[None, :]
        m01 = (vy0 & vx1)[None, :]
        m10 = (vy1 & vx0)[None, :]
        m11 = (vy1 & vx1)[None, :]
        w00 = (wy0 * wx0)[None, :]
        w01 = (wy0 * wx1)[None, :]
        w10 = (wy1 * wx0)[None, :]
        w11 = (wy1 * wx1)[None, :]
        o00 = (y0 * sxh + x0 * sxw)[None, :]
        o01 = (y0 * sxh + x1 * sxw)[None, :]
        o10 = (y1 * sxh + x0 * sxw)[None, :]
        o11 = (y1 * sxh + x1 * sxw)[None, :]
        c0 = c_lo
        while c0 < c_hi:
            c = c0 + tl.arange(0, BLOCK_C)
            cm = (c < c_hi)[:, None]
            base = xb + (c * sxc)[:, None]
            acc = w00 * tl.load(base + o00, mask=cm & m00, other=0.0).to(tl.float32)
            acc += w01 * tl.load(base + o01, mask=cm & m01, other=0.0).to(tl.float32)
            acc += w10 * tl.load(base + o10, mask=cm & m10, other=0.0).to(tl.float32)
            acc += w11 * tl.load(base + o11, mask=cm & m11, other=0.0).to(tl.float32)
            tl.store(ob + (c * HWo)[:, None] + p[None, :], acc.to(out_ptr.dtype.element_ty), mask=cm & pm[None, :])
            c0 += BLOCK_C
    elif MODE == 1:
        ix = _pad_coord(ix, W, PAD, ALIGN)
        iy = _pad_coord(iy, H, PAD, ALIGN)
        # round half to even, like nearbyint
        fx = tl.floor(ix)
        dx = ix - fx
        fx += tl.where((dx > 0.5) | ((dx == 0.5) & ((fx - 2.0 * tl.floor(fx * 0.5)) != 0.0)), 1.0, 0.0)
        fy = tl.floor(iy)
        dy = iy - fy
        fy += tl.where((dy > 0.5) | ((dy == 0.5) & ((fy - 2.0 * tl.floor(fy * 0.5)) != 0.0)), 1.0, 0.0)
        xn = fx.to(tl.int32)
        yn = fy.to(tl.int32)
        mn = ((xn >= 0) & (xn < W) & (yn >= 0) & (yn < H) & pm)[None, :]
        on = (yn * sxh + xn * sxw)[None, :]
        c0 = c_lo
        while c0 < c_hi:
            c = c0 + tl.arange(0, BLOCK_C)
            cm = (c < c_hi)[:, None]
            v = tl.load(xb + (c * sxc)[:, None] + on, mask=cm & mn, other=0.0)
            tl.store(ob + (c * HWo)[:, None] + p[None, :], v.to(out_ptr.dtype.element_ty), mask=cm & pm[None, :])
            c0 += BLOCK_C
    else:
        x0f = tl.floor(ix)
        y0f = tl.floor(iy)
        tx = ix - x0f
        ty = iy - y0f
        c0 = c_lo
        while c0 < c_hi:
            c = c0 + tl.arange(0, BLOCK_C)
            cm = (c < c_hi)[:, None]
            base = xb + (c * sxc)[:, None]
            acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
            for i in tl.static_range(4):
                if i == 0:
                    wy = _cubic_far(ty + 1.0)
                elif i == 1:
                    wy = _cubic_near(ty)
                elif i == 2:
                    wy = _cubic_near(1.0 - ty)
                else:
                    wy = _cubic_far(2.0 - ty)
                yy = _pad_coord(y0f + (i - 1), H, PAD, ALIGN).to(tl.int32)
                row = acc * 0.0
                for j in tl.static_range(4):
                    if j == 0:
                        wx = _cubic_far(tx + 1.0)
                    elif j == 1:
                        wx = _cubic_near(tx)
                    elif j == 2:
                        wx = _cubic_near(1.0 - tx)
                    else:
                        wx = _cubic_far(2.0 - tx)
                    xx = _pad_coord(x0f + (j - 1), W, PAD, ALIGN).to(tl.int32)
                    ok = ((xx >= 0) & (xx < W) & (yy >= 0) & (yy < H) & pm)[None, :]
                    v = tl.load(base + (yy * sxh + xx * sxw)[None, :], mask=cm & ok, other=0.0).to(tl.float32)
                    row += wx[None, :] * v
                acc += wy[None, :] * row
            tl.store(ob + (c * HWo)[:, None] + p[None, :], acc.to(out_ptr.dtype.element_ty), mask=cm & pm[None, :])
            c0 += BLOCK_C

@triton.jit(do_not_specialize=["H", "W"])
def _affine_grid_kernel(theta_ptr, out_ptr, H, W, HW, stn, str_, stc, ALIGN: tl.constexpr, BLOCK_P: tl.constexpr):
    pb = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < HW
    hf = (p // W).to(tl.float32)
    wf = (p % W).to(tl.float32)
    if ALIGN:
        xs = tl.where(W > 1, wf * 2.0 / tl.maximum(W - 1, 1) - 1.0, 1.0)   # unit axis at +1, as ORT
        ys = tl.where(H > 1, hf * 2.0 / tl.maximum(H - 1, 1) - 1.0, 1.0)
    else:
        xs = (wf * 2.0 + 1.0) / W - 1.0
        ys = (hf * 2.0 + 1.0) / H - 1.0
    t = theta_ptr + n * stn
    gx = (tl.load(t).to(tl.float32) * xs + tl.load(t + stc).to(tl.float32) * ys) + tl.load(t + 2 * stc).to(tl.float32)
    gy = (tl.load(t + str_).to(tl.float32) * xs + tl.load(t + str_ + stc).to(tl.float32) * ys) \
        + tl.load(t + str_ + 2 * stc).to(tl.float32)
    k = tl.arange(0, 2)
    val = tl.where(k[None, :] == 0, gx[:, None], gy[:, None])
    o = out_ptr + n * HW * 2 + p[:, None] * 2 + k[None, :]
    tl.store(o, val.to(out_ptr.dtype.element_ty), mask=pm[:, None])



def grid_sample_launch_config(n: int, c: int, hw_out: int, mode: str) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_P, C_CHUNK, num_warps). Pixels across threads, one channel at a time per
    program (each step one coalesced row of taps); channels split across programs until about
    2048 programs keep the GPU busy. Swept on an H200 (benchmarks/sweep_plugins.py): one channel
    per step ran 1.7-2.5x faster than 8, e.g. [8,64,128,128] fp16 0.020 ms vs 0.052 ms."""
    block_p = 128 if n * hw_out >= 131072 else 64
    block_p = min(block_p, _util.next_pow2(hw_out))
    block_c = 2 if mode == "bicubic" else 1
    programs = n * _util.cdiv(hw_out, block_p)
    chunks = max(1, min(_util.cdiv(c, block_c), _util.cdiv(2048, programs)))
    c_chunk = _util.cdiv(_util.cdiv(c, chunks), block_c) * block_c
    return block_c, block_p, c_chunk, 4 if block_p >= 128 else 2


def _grid_sample_triton(p: GridSample, x: Any, grid: Any, out: Any, config: tuple | None = None) -> None:
    _util.require_triton("GridSample")
    if not out.is_contiguous():
        raise PluginError("Plugin GridSample writes a contiguous [N,C,Ho,Wo] output; the runtime gave a strided one.")
    n, c, h, w = x.shape
    ho, wo = grid.shape[1], grid.shape[2]
    if out.numel() == 0:
        return
    if h == 0 or w == 0:
        out.zero_()
        return
    block_c, block_p, c_chunk, warps = config or grid_sample_launch_config(n, c, ho * wo, p.mode)
    launch = (_util.cdiv(ho * wo, block_p), n, _util.cdiv(c, c_chunk))
    _grid_sample_kernel[launch](x, grid, out, c, h, w, ho * wo, wo, *x.stride(), grid.stride(0), grid.stride(1), grid.stride(2),
                 grid.stride(3), c_chunk, MODE=_MODES[p.mode], PAD=_PADS[p.padding_mode], ALIGN=bool(p.align_corners),
                 BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)


def _affine_grid_triton(p: AffineGrid, theta: Any, hw: tuple[int, int], out: Any) -> None:
    _util.require_triton("AffineGrid")
    if not out.is_contiguous():
        raise PluginError("Plugin AffineGrid writes a contiguous [N,H,W,2] grid; the runtime gave a strided one.")
    h, w = hw
    n = theta.shape[0]
    if out.numel() == 0:
        return
    block_p = min(256, _util.next_pow2(h * w))
    _affine_grid_kernel[(_util.cdiv(h * w, block_p), n)](theta, out, h, w, h * w, *theta.stride(),
                                                         ALIGN=bool(p.align_corners), BLOCK_P=block_p, num_warps=4)
