"""GridSample and AffineGrid (ONNX opsets 16/20; 4-D and 5-D): the spatial transformer pair.

AffineGrid turns a batch of 2x3 (or 3x4, volumetric) affine matrices into a sampling
grid; GridSample reads the input at those (normalized) positions. Semantics are
PyTorch's ``grid_sample``/``affine_grid``, which ONNX specifies and ONNX Runtime
implements: bilinear (trilinear on 5-D input), nearest (round half to even) and bicubic
(A = -0.75, 4-D only, as in ONNX and torch); zeros, border and reflection padding; both
``align_corners`` conventions.

GPU: one Triton program per (image, block of output pixels, chunk of channels) computes
the taps and weights once and reuses them for every channel of its chunk; loads and
stores run along output pixels, which are contiguous in memory. The 5-D kernel is the
same scheme with a third axis (8 taps for trilinear).
"""
from __future__ import annotations

from typing import Any

from kiln.errors import PluginError
from kiln.plugins.base import Plugin, TensorDesc, field
from kiln.plugins.builtin import _util
from kiln.plugins.registry import register
from kiln.triton_support import cdiv, next_pow2, tl, triton

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
    """ONNX GridSample: X [N,C,H,W], grid [N,Ho,Wo,2] of normalized (x, y) -> [N,C,Ho,Wo];
    or volumetric X [N,C,D,H,W], grid [N,Do,Ho,Wo,3] of normalized (x, y, z) -> [N,C,Do,Ho,Wo]."""

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
        self._check_ranks(tuple(x.shape), tuple(grid.shape))
        return [TensorDesc((x.shape[0], x.shape[1], *grid.shape[1:-1]), x.dtype)]

    def _check_ranks(self, xs: tuple, gs: tuple) -> None:
        """One-line errors for what the kernels cannot take (symbolic or unknown dims pass)."""
        if len(xs) not in (4, 5) or len(gs) != len(xs):
            raise PluginError(f"Plugin GridSample takes X [N,C,H,W] with grid [N,Ho,Wo,2] (4-D) or X [N,C,D,H,W] "
                              f"with grid [N,Do,Ho,Wo,3] (5-D); got X {xs} and grid {gs}.")
        k = len(xs) - 2
        if isinstance(gs[-1], int) and gs[-1] != k:
            raise PluginError(f"Plugin GridSample needs a grid whose last dim is {k} ({', '.join('xyz'[:k])}) for "
                              f"{len(xs)}-D X {xs}; got grid {gs}.")
        if k == 3 and self.mode == "bicubic":
            raise PluginError("Plugin GridSample mode 'bicubic' (ONNX 'cubic') is defined for 4-D input only, got 5-D "
                              f"X {xs}; use mode 'bilinear' (ONNX 'linear', trilinear here) or 'nearest'.")

    def supports(self, index: int, desc: TensorDesc, num_inputs: int) -> bool:
        return desc.layout == "linear" and desc.dtype in _FLOATS and (index != 1 or desc.rank in (4, 5))

    def forward(self, inputs: list[Any], outputs: list[Any], workspace: Any, tactic: str) -> None:
        x, grid = inputs[0], inputs[1]
        self._check_ranks(tuple(x.shape), tuple(grid.shape))
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
    """ONNX AffineGrid (opset 20): theta [N,2,3] and size (N,C,H,W) -> grid [N,H,W,2], or
    theta [N,3,4] and size (N,C,D,H,W) -> grid [N,D,H,W,3].

    The output shape depends on the *values* of ``size``, so the engine needs them at
    build time: the ``size`` field (a constant input, or the Shape of a tensor with static
    spatial dims, folded by the ONNX parser). Without it the plugin reads a second input
    tensor, which costs a host sync: the layer then has data-dependent output shapes
    (eager only, never in a CUDA graph).
    """

    name = "AffineGrid"
    namespace = "kiln"
    version = "1"
    tactics = {"cuda": ("triton",), "cpu": ("torch",)}   # "torch" also runs on CUDA, eagerly

    align_corners = field(int, 0, "same convention as GridSample", choices=(0, 1))
    size = field(list, [], "output size [N, C, H, W] or [N, C, D, H, W] (the constant 'size' input; "
                           "only the spatial dims are read, N and C may be -1)")

    @classmethod
    def onnx_fields(cls, attrs: dict, opset: int) -> dict:
        return affine_grid_fields(attrs, opset)

    @property
    def data_dependent_shapes(self) -> bool:   # type: ignore[override]
        return not self.size

    def _spatial(self) -> tuple[int, ...] | None:
        return _spatial_of(self.size, "field 'size'") if self.size else None

    @staticmethod
    def _rank(theta: tuple, k: int | None) -> int:
        """Spatial rank (2 or 3) from theta [N,2,3] / [N,3,4], agreeing with the size's ``k`` when known."""
        def fits(d: Any, v: int) -> bool:
            return not isinstance(d, int) or d == v

        if len(theta) != 3 or not any(fits(theta[1], r) and fits(theta[2], r + 1) for r in (2, 3)):
            raise PluginError(f"Plugin AffineGrid needs theta of shape [N, 2, 3] (2-D) or [N, 3, 4] (3-D), "
                              f"got {theta}.")
        ranks = [r for r in (2, 3) if fits(theta[1], r) and fits(theta[2], r + 1) and k in (None, r)]
        if not ranks:
            raise PluginError(f"Plugin AffineGrid got theta {theta} with a size of {k + 2} elements; "
                              f"theta must be [N, {k}, {k + 1}] for it.")
        return ranks[0]

    def output_descs(self, inputs: list[TensorDesc]) -> list[TensorDesc]:
        theta = tuple(inputs[0].shape)
        spatial = self._spatial()
        size_in = _util.opt(inputs, 1)
        k = len(spatial) if spatial else None
        if k is None and size_in is not None and size_in.rank == 1 and isinstance(size_in.shape[0], int):
            k = size_in.shape[0] - 2
            if k not in (2, 3):
                raise PluginError(f"Plugin AffineGrid input 'size' must have 4 elements [N, C, H, W] (2-D) or 5 "
                                  f"[N, C, D, H, W] (3-D), got shape {tuple(size_in.shape)}.")
        k = self._rank(theta, k)
        dims = spatial or (None,) * k
        return [TensorDesc((theta[0], *dims, k), inputs[0].dtype)]

    def supports(self, index: int, desc: TensorDesc, num_inputs: int) -> bool:
        if index == 1 and num_inputs == 2:
            return desc.dtype == "int64"
        return desc.layout == "linear" and desc.dtype in _FLOATS

    def forward(self, inputs: list[Any], outputs: list[Any] | None, workspace: Any, tactic: str) -> list[Any] | None:
        theta = inputs[0]
        spatial = self._spatial()
        if spatial is None:
            size = _util.opt(inputs, 1)
            if size is None:
                raise PluginError("Plugin AffineGrid needs its 'size' field or a 'size' input [N, C, H, W] "
                                  "or [N, C, D, H, W].")
            spatial = _spatial_of(size.reshape(-1).tolist(), "input 'size'")   # host sync: eager use only
        k = self._rank(tuple(theta.shape), len(spatial))
        if outputs is None:
            import torch

            out = torch.empty((theta.shape[0], *spatial, k), dtype=theta.dtype, device=theta.device)
        else:
            out = outputs[0]
        if tactic == "triton":
            _affine_grid_triton(self, theta, spatial, out)
        elif tactic == "torch":
            out.copy_(affine_grid_torch(theta, spatial, bool(self.align_corners)))
        else:
            raise PluginError(f"Plugin AffineGrid has no tactic {tactic!r}; use 'triton' or 'torch'.")
        return [out] if outputs is None else None


def _spatial_of(size: list, what: str) -> tuple[int, ...]:
    """The grid's spatial sizes (H, W) or (D, H, W) from an AffineGrid size [N, C, (D,) H, W]."""
    if len(size) not in (4, 5):
        raise PluginError(f"Plugin AffineGrid {what} must have 4 elements [N, C, H, W] (2-D) or 5 [N, C, D, H, W] "
                          f"(3-D), got {list(size)}.")
    spatial = tuple(int(v) for v in size[2:])
    if any(d < 0 for d in spatial):
        raise PluginError(f"Plugin AffineGrid {what} {list(size)} has a negative spatial size; the grid's "
                          f"(D,) H, W must be >= 0.")
    return spatial


def _base(n: int, align: bool, device: Any) -> Any:
    """Normalized pixel centers. A unit axis with align_corners=1 sits at +1 as in ONNX Runtime
    (Eigen's LinSpaced returns its upper end); torch's affine_grid (since 1.3) puts it at 0."""
    import torch

    i = torch.arange(n, dtype=torch.float32, device=device)
    if align:
        return i * 2.0 / (n - 1) - 1.0 if n > 1 else i + 1.0
    return (i * 2.0 + 1.0) / n - 1.0


def affine_grid_torch(theta: Any, spatial: tuple[int, ...], align: bool) -> Any:
    """``spatial`` is (H, W) or (D, H, W); the grid's last axis is (x, y[, z]) = (W, H[, D])."""
    import torch

    axes = torch.meshgrid(*[_base(n, align, theta.device) for n in spatial], indexing="ij")
    base = torch.stack([*reversed(axes), torch.ones(tuple(spatial), device=theta.device)], -1)
    return torch.einsum("...k,njk->n...j", base, theta.float())


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

@triton.jit
def _cubic_tap(t, TAP: tl.constexpr):
    """Weight of tap TAP (0-3, at offsets -1..2 from floor) for fractional position t."""
    if TAP == 0:
        w = _cubic_far(t + 1.0)
    elif TAP == 1:
        w = _cubic_near(t)
    elif TAP == 2:
        w = _cubic_near(1.0 - t)
    else:
        w = _cubic_far(2.0 - t)
    return w

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
                wy = _cubic_tap(ty, i)
                yy = _pad_coord(y0f + (i - 1), H, PAD, ALIGN).to(tl.int32)
                row = acc * 0.0
                for j in tl.static_range(4):
                    wx = _cubic_tap(tx, j)
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



# ---- GPU: Triton, volumetric (5-D GridSample, 3-D AffineGrid) -----------------------------------

@triton.jit
def _axis_taps(g, size, PAD: tl.constexpr, ALIGN: tl.constexpr):
    """Linear taps along one axis: lower index, both weights, and whether each tap is inside."""
    v = _pad_coord(_unnormalize(g, size, ALIGN), size, PAD, ALIGN)
    v = tl.minimum(tl.maximum(v, -2.0), size + 1.0)   # far outside (zeros): both taps masked, no int overflow
    f = tl.floor(v)
    w1 = v - f
    i0 = f.to(tl.int32)
    return i0, 1.0 - w1, w1, (i0 >= 0) & (i0 < size), (i0 >= -1) & (i0 < size - 1)

@triton.jit
def _tap(z, y, x, wz, wy, wx, ok, sxd, sxh, sxw):
    """One trilinear corner as [1, BLOCK_P] rows: element offset, weight, mask."""
    return (z * sxd + y * sxh + x * sxw)[None, :], (wz * wy * wx)[None, :], ok[None, :]

@triton.jit
def _nearest_index(g, size, PAD: tl.constexpr, ALIGN: tl.constexpr):
    """Padded source coordinate rounded half to even (nearbyint), as torch and ONNX do."""
    v = _pad_coord(_unnormalize(g, size, ALIGN), size, PAD, ALIGN)
    v = tl.minimum(tl.maximum(v, -2.0), size + 1.0)
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return (f + tl.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)).to(tl.int32)

@triton.jit(do_not_specialize=["D", "H", "W"])
def _grid_sample_3d_kernel(x_ptr, g_ptr, out_ptr, C, D, H, W, P, HWo, Wo, sxn, sxc, sxd, sxh, sxw,
                           sgn, sgd, sgh, sgw, sgc, C_CHUNK, MODE: tl.constexpr, PAD: tl.constexpr,
                           ALIGN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pb = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    cc = tl.program_id(2)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    od = p // HWo
    oh = (p % HWo) // Wo
    ow = p % Wo
    gp = g_ptr + n * sgn + od * sgd + oh * sgh + ow * sgw
    gx = tl.load(gp, mask=pm, other=0.0).to(tl.float32)
    gy = tl.load(gp + sgc, mask=pm, other=0.0).to(tl.float32)
    gz = tl.load(gp + 2 * sgc, mask=pm, other=0.0).to(tl.float32)
    xb = x_ptr + n * sxn
    ob = out_ptr + n * C * P
    c_lo = cc * C_CHUNK
    c_hi = tl.minimum(c_lo + C_CHUNK, C)
    if MODE == 0:
        x0, wx0, wx1, vx0, vx1 = _axis_taps(gx, W, PAD, ALIGN)
        y0, wy0, wy1, vy0, vy1 = _axis_taps(gy, H, PAD, ALIGN)
        z0, wz0, wz1, vz0, vz1 = _axis_taps(gz, D, PAD, ALIGN)
        vz0 = vz0 & pm
        vz1 = vz1 & pm
        o0, w0, m0 = _tap(z0, y0, x0, wz0, wy0, wx0, vz0 & vy0 & vx0, sxd, sxh, sxw)
        o1, w1, m1 = _tap(z0, y0, x0 + 1, wz0, wy0, wx1, vz0 & vy0 & vx1, sxd, sxh, sxw)
        o2, w2, m2 = _tap(z0, y0 + 1, x0, wz0, wy1, wx0, vz0 & vy1 & vx0, sxd, sxh, sxw)
        o3, w3, m3 = _tap(z0, y0 + 1, x0 + 1, wz0, wy1, wx1, vz0 & vy1 & vx1, sxd, sxh, sxw)
        o4, w4, m4 = _tap(z0 + 1, y0, x0, wz1, wy0, wx0, vz1 & vy0 & vx0, sxd, sxh, sxw)
        o5, w5, m5 = _tap(z0 + 1, y0, x0 + 1, wz1, wy0, wx1, vz1 & vy0 & vx1, sxd, sxh, sxw)
        o6, w6, m6 = _tap(z0 + 1, y0 + 1, x0, wz1, wy1, wx0, vz1 & vy1 & vx0, sxd, sxh, sxw)
        o7, w7, m7 = _tap(z0 + 1, y0 + 1, x0 + 1, wz1, wy1, wx1, vz1 & vy1 & vx1, sxd, sxh, sxw)
        c0 = c_lo
        while c0 < c_hi:
            c = c0 + tl.arange(0, BLOCK_C)
            cm = (c < c_hi)[:, None]
            base = xb + (c.to(tl.int64) * sxc)[:, None]
            acc = w0 * tl.load(base + o0, mask=cm & m0, other=0.0).to(tl.float32)
            acc += w1 * tl.load(base + o1, mask=cm & m1, other=0.0).to(tl.float32)
            acc += w2 * tl.load(base + o2, mask=cm & m2, other=0.0).to(tl.float32)
            acc += w3 * tl.load(base + o3, mask=cm & m3, other=0.0).to(tl.float32)
            acc += w4 * tl.load(base + o4, mask=cm & m4, other=0.0).to(tl.float32)
            acc += w5 * tl.load(base + o5, mask=cm & m5, other=0.0).to(tl.float32)
            acc += w6 * tl.load(base + o6, mask=cm & m6, other=0.0).to(tl.float32)
            acc += w7 * tl.load(base + o7, mask=cm & m7, other=0.0).to(tl.float32)
            tl.store(ob + (c.to(tl.int64) * P)[:, None] + p[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=cm & pm[None, :])
            c0 += BLOCK_C
    else:
        xn = _nearest_index(gx, W, PAD, ALIGN)
        yn = _nearest_index(gy, H, PAD, ALIGN)
        zn = _nearest_index(gz, D, PAD, ALIGN)
        mn = ((xn >= 0) & (xn < W) & (yn >= 0) & (yn < H) & (zn >= 0) & (zn < D) & pm)[None, :]
        on = (zn * sxd + yn * sxh + xn * sxw)[None, :]
        c0 = c_lo
        while c0 < c_hi:
            c = c0 + tl.arange(0, BLOCK_C)
            cm = (c < c_hi)[:, None]
            v = tl.load(xb + (c.to(tl.int64) * sxc)[:, None] + on, mask=cm & mn, other=0.0)
            tl.store(ob + (c.to(tl.int64) * P)[:, None] + p[None, :], v.to(out_ptr.dtype.element_ty),
                     mask=cm & pm[None, :])
            c0 += BLOCK_C

@triton.jit
def _grid_axis(i, size, ALIGN: tl.constexpr):
    if ALIGN:
        return tl.where(size > 1, i * 2.0 / tl.maximum(size - 1, 1) - 1.0, 1.0)   # unit axis at +1, as ORT
    else:
        return (i * 2.0 + 1.0) / size - 1.0

@triton.jit(do_not_specialize=["D", "H", "W"])
def _affine_grid_3d_kernel(theta_ptr, out_ptr, D, H, W, HW, DHW, stn, str_, stc, ALIGN: tl.constexpr,
                           BLOCK_P: tl.constexpr):
    pb = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < DHW
    xs = _grid_axis((p % W).to(tl.float32), W, ALIGN)[:, None]
    ys = _grid_axis(((p % HW) // W).to(tl.float32), H, ALIGN)[:, None]
    zs = _grid_axis((p // HW).to(tl.float32), D, ALIGN)[:, None]
    k = tl.arange(0, 4)          # output component x, y, z; lane 3 is padding
    km = k < 3
    row = theta_ptr + n * stn + k * str_
    t0 = tl.load(row, mask=km, other=0.0).to(tl.float32)[None, :]
    t1 = tl.load(row + stc, mask=km, other=0.0).to(tl.float32)[None, :]
    t2 = tl.load(row + 2 * stc, mask=km, other=0.0).to(tl.float32)[None, :]
    t3 = tl.load(row + 3 * stc, mask=km, other=0.0).to(tl.float32)[None, :]
    val = ((t0 * xs + t1 * ys) + t2 * zs) + t3
    o = out_ptr + n * DHW * 3 + p[:, None] * 3 + k[None, :]
    tl.store(o, val.to(out_ptr.dtype.element_ty), mask=pm[:, None] & km[None, :])



def grid_sample_launch_config(n: int, c: int, hw_out: int, mode: str) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_P, C_CHUNK, num_warps). Pixels across threads, one channel at a time per
    program (each step one coalesced row of taps); channels split across programs until about
    2048 programs keep the GPU busy (benchmarks/sweep_plugins.py sweeps the alternatives)."""
    block_p = 128 if n * hw_out >= 131072 else 64
    block_p = min(block_p, next_pow2(hw_out))
    block_c = 2 if mode == "bicubic" else 1
    programs = n * cdiv(hw_out, block_p)
    chunks = max(1, min(cdiv(c, block_c), cdiv(2048, programs)))
    c_chunk = cdiv(cdiv(c, chunks), block_c) * block_c
    return block_c, block_p, c_chunk, 4 if block_p >= 128 else 2


def _grid_sample_triton(p: GridSample, x: Any, grid: Any, out: Any, config: tuple | None = None) -> None:
    _util.require_triton("GridSample")
    if x.dim() == 5:
        _grid_sample_3d_triton(p, x, grid, out, config)
        return
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
    launch = (cdiv(ho * wo, block_p), n, cdiv(c, c_chunk))
    _grid_sample_kernel[launch](x, grid, out, c, h, w, ho * wo, wo, *x.stride(), grid.stride(0), grid.stride(1), grid.stride(2),
                 grid.stride(3), c_chunk, MODE=_MODES[p.mode], PAD=_PADS[p.padding_mode], ALIGN=bool(p.align_corners),
                 BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)


def _grid_sample_3d_triton(p: GridSample, x: Any, grid: Any, out: Any, config: tuple | None = None) -> None:
    if not out.is_contiguous():
        raise PluginError("Plugin GridSample writes a contiguous [N,C,Do,Ho,Wo] output; "
                          "the runtime gave a strided one.")
    n, c, d, h, w = x.shape
    do, ho, wo = grid.shape[1], grid.shape[2], grid.shape[3]
    if out.numel() == 0:
        return
    if d == 0 or h == 0 or w == 0:
        out.zero_()
        return
    pixels = do * ho * wo
    block_c, block_p, c_chunk, warps = config or grid_sample_launch_config(n, c, pixels, p.mode)
    launch = (cdiv(pixels, block_p), n, cdiv(c, c_chunk))
    _grid_sample_3d_kernel[launch](x, grid, out, c, d, h, w, pixels, ho * wo, wo, *x.stride(), *grid.stride()[:4],
                                   grid.stride(4), c_chunk, MODE=_MODES[p.mode], PAD=_PADS[p.padding_mode],
                                   ALIGN=bool(p.align_corners), BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)


def _affine_grid_triton(p: AffineGrid, theta: Any, spatial: tuple[int, ...], out: Any) -> None:
    _util.require_triton("AffineGrid")
    if not out.is_contiguous():
        raise PluginError(f"Plugin AffineGrid writes a contiguous [N,{','.join('DHW'[-len(spatial):])},"
                          f"{len(spatial)}] grid; the runtime gave a strided one.")
    n = theta.shape[0]
    if out.numel() == 0:
        return
    if len(spatial) == 3:
        d, h, w = spatial
        block_p = min(256, next_pow2(d * h * w))
        _affine_grid_3d_kernel[(cdiv(d * h * w, block_p), n)](
            theta, out, d, h, w, h * w, d * h * w, *theta.stride(), ALIGN=bool(p.align_corners), BLOCK_P=block_p,
            num_warps=4)
        return
    h, w = spatial
    block_p = min(256, next_pow2(h * w))
    _affine_grid_kernel[(cdiv(h * w, block_p), n)](theta, out, h, w, h * w, *theta.stride(),
                                                         ALIGN=bool(p.align_corners), BLOCK_P=block_p, num_warps=4)
