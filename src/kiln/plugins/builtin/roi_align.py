"""RoiAlign (ONNX opset 10/16): pool a fixed-size feature patch for each region of interest.

Two-stage detectors (Faster/Mask R-CNN) run it on every FPN level. Semantics follow
ONNX Runtime exactly, including its ``max`` mode (the max of the bilinear-*weighted*
corner values, not of the interpolated samples) and the legacy ``output_half_pixel``
mode that forces malformed ROIs to at least 1x1.

GPU: one Triton program per (ROI, block of channels) computes the sample coordinates
and weights once for all bins and reuses them for every channel in its block.
"""
from __future__ import annotations

import math
from typing import Any

from kiln.errors import PluginError
from kiln.plugins.base import Plugin, TensorDesc, field
from kiln.plugins.builtin import _util
from kiln.plugins.registry import register
from kiln.triton_support import cdiv, next_pow2, tl, triton

_FLOATS = ("float32", "float16", "bfloat16")


def roi_align_fields(attrs: dict, opset: int) -> dict:
    """Field values for an ONNX RoiAlign node; opset 16 changed only the default transformation mode."""
    default_ctm = "output_half_pixel" if opset < 16 else "half_pixel"
    return {
        "mode": _util.attr_str(attrs.get("mode", "avg")),
        "output_height": int(attrs.get("output_height", 1)),
        "output_width": int(attrs.get("output_width", 1)),
        "sampling_ratio": int(attrs.get("sampling_ratio", 0)),
        "spatial_scale": float(attrs.get("spatial_scale", 1.0)),
        "coordinate_transformation_mode": _util.attr_str(attrs.get("coordinate_transformation_mode", default_ctm)),
    }


@register
class RoiAlign(Plugin):
    """ONNX RoiAlign: inputs X [N,C,H,W], rois [R,4] (x1,y1,x2,y2), batch_indices [R] -> [R,C,oh,ow]."""

    name = "RoiAlign"
    namespace = "kiln"
    version = "1"
    # "torch" also runs on CUDA tensors, but syncs with the host: eager use only, not a GPU tactic.
    tactics = {"cuda": ("triton",), "cpu": ("torch",)}

    mode = field(str, "avg", "avg or max pooling inside each bin", choices=("avg", "max"))
    output_height = field(int, 1, "pooled output height")
    output_width = field(int, 1, "pooled output width")
    sampling_ratio = field(int, 0, "samples per bin side; 0 = adaptive ceil(roi_size / output_size)")
    spatial_scale = field(float, 1.0, "multiplies ROI coordinates into feature-map pixels")
    coordinate_transformation_mode = field(str, "half_pixel", "half_pixel shifts by -0.5 (opset 16 default)",
                                           choices=("half_pixel", "output_half_pixel"))

    @classmethod
    def onnx_fields(cls, attrs: dict, opset: int) -> dict:
        return roi_align_fields(attrs, opset)

    def output_descs(self, inputs: list[TensorDesc]) -> list[TensorDesc]:
        if len(inputs) != 3:
            raise PluginError(f"Plugin RoiAlign takes 3 inputs (X, rois, batch_indices), got {len(inputs)}.")
        x, rois = inputs[0], inputs[1]
        if x.rank != 4 or rois.rank != 2:
            raise PluginError(f"Plugin RoiAlign needs X of rank 4 and rois of rank 2, got {x.shape} and {rois.shape}.")
        return [TensorDesc((rois.shape[0], x.shape[1], self.output_height, self.output_width), x.dtype)]

    def supports(self, index: int, desc: TensorDesc, num_inputs: int) -> bool:
        if desc.layout != "linear":
            return False
        return desc.dtype in (("int64", "int32") if index == 2 else _FLOATS)

    def forward(self, inputs: list[Any], outputs: list[Any], workspace: Any, tactic: str) -> None:
        x, rois, bidx = inputs
        out = outputs[0]
        if tactic == "triton":
            _roi_align_triton(self, x, rois, bidx, out)
        elif tactic == "torch":
            out.copy_(roi_align_torch(x, rois, bidx, self.output_height, self.output_width, self.sampling_ratio,
                                      self.spatial_scale, self.coordinate_transformation_mode == "half_pixel",
                                      self.mode))
        else:
            raise PluginError(f"Plugin RoiAlign has no tactic {tactic!r}; use 'triton' or 'torch'.")


# ---- CPU: torch ------------------------------------------------------------------------------

def _axis(start: Any, bins: Any, grid: Any, pooled: int, gmax: int, size: int) -> tuple:
    """Sample positions along one axis for a chunk of ROIs: [r, pooled, gmax] indices/weights."""
    import torch

    p = torch.arange(pooled, dtype=torch.float32, device=start.device)
    i = torch.arange(gmax, dtype=torch.float32, device=start.device)
    # Same float32 evaluation order as ONNX Runtime: (start + p*bin) + (i+0.5)*bin/grid.
    pos = (start[:, None, None] + p[None, :, None] * bins[:, None, None]) \
        + (i[None, None, :] + 0.5) * bins[:, None, None] / grid.clamp(min=1).float()[:, None, None]
    inside = i[None, None, :] < grid[:, None, None]
    oob = (pos < -1.0) | (pos > size)
    v = pos.clamp(min=0.0)
    low = v.long()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    high = torch.where(edge, low, low + 1)
    v = torch.where(edge, low.float(), v)
    frac = v - low.float()
    return low, high, frac, oob, inside


def _axis_matrix(start: Any, bins: Any, grid: Any, pooled: int, size: int) -> tuple:
    """Per ROI, the [pooled, size] matrix of summed bilinear weights along one axis, and the
    row/column window it touches. Bilinear weights and out-of-range rules are separable."""
    import torch

    r = start.shape[0]
    gmax = max(1, int(grid.max()))
    low, high, frac, oob, inside = _axis(start, bins, grid, pooled, gmax, size)
    ok = (~oob & inside).float()
    mat = torch.zeros(r, pooled, size, dtype=torch.float32, device=start.device)
    mat.scatter_add_(2, low, (1.0 - frac) * ok)
    mat.scatter_add_(2, high, frac * ok)
    used = ok > 0
    lo = torch.where(used, low, torch.full_like(low, size)).amin(dim=(1, 2))
    hi = torch.where(used, high, torch.full_like(high, -1)).amax(dim=(1, 2)) + 1
    return mat, lo.tolist(), hi.tolist()


def _roi_align_avg_separable(x: Any, bidx: Any, x1: Any, y1: Any, bin_h: Any, bin_w: Any, gh: Any, gw: Any,
                             count: Any, ph: int, pw: int, out: Any) -> Any:
    """avg mode as Ay @ X[window] @ Ax^T per ROI: two small GEMMs instead of C*bins*samples gathers."""
    import torch

    n, c, h, w = x.shape
    ay, ylo, yhi = _axis_matrix(y1, bin_h, gh, ph, h)
    ax, xlo, xhi = _axis_matrix(x1, bin_w, gw, pw, w)
    xf = x.float()
    for i, b in enumerate(bidx.long().tolist()):
        if ylo[i] >= yhi[i] or xlo[i] >= xhi[i]:
            continue
        window = xf[b, :, ylo[i]:yhi[i], xlo[i]:xhi[i]]                              # [C, hy, wx]
        wx = xhi[i] - xlo[i]
        cols = (window.reshape(-1, wx) @ ax[i, :, xlo[i]:xhi[i]].T).view(c, -1, pw)     # [C, hy, pw]
        out[i] = torch.einsum("py,cyq->cpq", ay[i, :, ylo[i]:yhi[i]], cols) / count[i]
    return out.to(x.dtype)


def roi_align_torch(x: Any, rois: Any, bidx: Any, ph: int, pw: int, sampling_ratio: int, spatial_scale: float,
                    half_pixel: bool, mode: str) -> Any:
    """avg: separable GEMMs per ROI; max (not separable): gathers vectorized over chunks of ROIs.
    Computes in float32."""
    import torch

    n, c, h, w = x.shape
    r = rois.shape[0]
    out = torch.zeros((r, c, ph, pw), dtype=torch.float32, device=x.device)
    if r == 0 or c == 0:
        return out.to(x.dtype)
    xt = x.float().permute(1, 0, 2, 3).reshape(c, n * h * w)     # channels first: one gather serves all
    roi = rois.float() * spatial_scale - (0.5 if half_pixel else 0.0)
    x1, y1, x2, y2 = roi.unbind(1)
    rw, rh = x2 - x1, y2 - y1
    if not half_pixel:
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    bin_h, bin_w = rh / ph, rw / pw
    if sampling_ratio > 0:
        gh = torch.full((r,), sampling_ratio, dtype=torch.long, device=x.device)
        gw = gh
    else:
        gh = torch.ceil(rh / ph).long().clamp(min=0)
        gw = torch.ceil(rw / pw).long().clamp(min=0)
    count = (gh * gw).clamp(min=1).float()
    if mode == "avg":
        return _roi_align_avg_separable(x, bidx, x1, y1, bin_h, bin_w, gh, gw, count, ph, pw, out)
    # Visit ROIs by sample-grid size: a chunk pads every ROI to its largest grid.
    order = torch.argsort(gh * gw)
    x1, y1, bin_h, bin_w, gh, gw, count = (t[order] for t in (x1, y1, bin_h, bin_w, gh, gw, count))
    b_all = bidx.long()[order]
    out_sorted = torch.zeros_like(out)
    size = [c * ph * pw * 4 * max(g, 1) for g in (gh * gw).tolist()]     # floats per ROI in a chunk
    s = 0
    while s < r:
        e = s + 1
        while e < r and (e - s + 1) * size[e] <= 1 << 23:
            e += 1
        gy, gx = int(gh[s:e].max()), int(gw[s:e].max())
        if gy == 0 or gx == 0:
            s = e
            continue
        yl, yh, ly, yoob, yin = _axis(y1[s:e], bin_h[s:e], gh[s:e], ph, gy, h)
        xl, xh, lx, xoob, xin = _axis(x1[s:e], bin_w[s:e], gw[s:e], pw, gx, w)
        # Samples ordered [r, ph, pw, gy, gx, corner] so each bin reduces over one contiguous run.
        Y = (slice(None), slice(None), None, slice(None), None)
        X = (slice(None), None, slice(None), None, slice(None))
        valid = ~(yoob[Y] | xoob[X])
        inside = (yin[Y] & xin[X])[..., None]
        hy, hx = 1.0 - ly, 1.0 - lx
        idx = torch.stack([yl[Y] * w + xl[X], yl[Y] * w + xh[X], yh[Y] * w + xl[X], yh[Y] * w + xh[X]], -1)
        wts = torch.stack([hy[Y] * hx[X], hy[Y] * lx[X], ly[Y] * hx[X], ly[Y] * lx[X]], -1)
        idx = torch.where(valid[..., None], idx, torch.zeros_like(idx))
        wts = torch.where(valid[..., None], wts, torch.zeros_like(wts))
        n_r = e - s
        idx = idx + (b_all[s:e] * (h * w)).view(n_r, 1, 1, 1, 1, 1)
        vals = torch.index_select(xt, 1, idx.reshape(-1))                       # [c, r * samples]
        prod = (vals.view(c, n_r, -1) * wts.reshape(1, n_r, -1)).view(c, n_r, ph * pw, -1)
        keep = inside.expand_as(wts).reshape(1, n_r, ph * pw, -1)
        if mode == "avg":
            res = (prod * keep).sum(-1) / count[s:e].view(1, n_r, 1)
        else:
            m = torch.where(keep, prod, torch.full_like(prod, -math.inf)).amax(-1)
            res = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
        out_sorted[s:e] = res.permute(1, 0, 2).reshape(n_r, c, ph, pw)
        s = e
    out[order] = out_sorted
    return out.to(x.dtype)


# ---- GPU: Triton -----------------------------------------------------------------------------

@triton.jit
def _roi_axis(v, size, stride):
    """ONNX Runtime's per-axis sample prep: out-of-range flag, low/high offsets, weights."""
    oob = (v < -1.0) | (v > size * 1.0)
    v = tl.maximum(v, 0.0)
    lo = v.to(tl.int32)
    edge = lo >= size - 1
    lo = tl.where(edge, size - 1, lo)
    hi = tl.where(edge, size - 1, lo + 1)
    v = tl.where(edge, lo.to(tl.float32), v)
    frac = v - lo.to(tl.float32)
    return oob, lo * stride, hi * stride, frac, 1.0 - frac


@triton.jit
def _roi_sample(acc, base, m2, y_oob, row_lo, row_hi, ly, hy, xx, W, sxw, MAX_MODE: tl.constexpr):
    """Add (or max in) one bilinear sample per bin, for every channel of the tile."""
    x_oob, col_lo, col_hi, lx, hx = _roi_axis(xx, W, sxw)
    oob = y_oob | x_oob
    w1 = tl.where(oob, 0.0, hy * hx)[None, :]
    w2 = tl.where(oob, 0.0, hy * lx)[None, :]
    w3 = tl.where(oob, 0.0, ly * hx)[None, :]
    w4 = tl.where(oob, 0.0, ly * lx)[None, :]
    lm = m2 & (~oob)[None, :]
    v1 = tl.load(base + (row_lo + col_lo)[None, :], mask=lm, other=0.0).to(tl.float32)
    v2 = tl.load(base + (row_lo + col_hi)[None, :], mask=lm, other=0.0).to(tl.float32)
    v3 = tl.load(base + (row_hi + col_lo)[None, :], mask=lm, other=0.0).to(tl.float32)
    v4 = tl.load(base + (row_hi + col_hi)[None, :], mask=lm, other=0.0).to(tl.float32)
    if MAX_MODE:
        return tl.maximum(acc, tl.maximum(tl.maximum(tl.maximum(w1 * v1, w2 * v2), w3 * v3), w4 * v4))
    else:
        return acc + (w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4)


@triton.jit
def _roi_align_kernel(x_ptr, rois_ptr, bidx_ptr, out_ptr, C, H, W, sxn, sxc, sxh, sxw, srr, src, sbi,
                      spatial_scale, PH: tl.constexpr, PW: tl.constexpr, SR: tl.constexpr,
                      HALF_PIXEL: tl.constexpr, MAX_MODE: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    r = tl.program_id(0)
    cb = tl.program_id(1)
    rp = rois_ptr + r.to(tl.int64) * srr
    off = 0.5 if HALF_PIXEL else 0.0
    x1 = tl.load(rp).to(tl.float32) * spatial_scale - off
    y1 = tl.load(rp + src).to(tl.float32) * spatial_scale - off
    x2 = tl.load(rp + 2 * src).to(tl.float32) * spatial_scale - off
    y2 = tl.load(rp + 3 * src).to(tl.float32) * spatial_scale - off
    b = tl.load(bidx_ptr + r.to(tl.int64) * sbi).to(tl.int64)
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not HALF_PIXEL:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_h = roi_h / PH
    bin_w = roi_w / PW

    p = tl.arange(0, BLOCK_P)
    pmask = p < PH * PW
    y0 = y1 + (p // PW).to(tl.float32) * bin_h           # bin origins; ORT's order of float operations
    x0 = x1 + (p % PW).to(tl.float32) * bin_w
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    base = x_ptr + b * sxn + (c * sxc)[:, None]
    m2 = cmask[:, None] & pmask[None, :]
    if MAX_MODE:
        acc = tl.full([BLOCK_C, BLOCK_P], float("-inf"), tl.float32)
    else:
        acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    if SR > 0:
        # A fixed grid unrolls, so all of a bin's loads are in flight together.
        for iy in tl.static_range(SR):
            y_oob, row_lo, row_hi, ly, hy = _roi_axis(y0 + (iy + 0.5) * bin_h / SR, H, sxh)
            for ix in tl.static_range(SR):
                acc = _roi_sample(acc, base, m2, y_oob, row_lo, row_hi, ly, hy, x0 + (ix + 0.5) * bin_w / SR,
                                  W, sxw, MAX_MODE)
        count = SR * SR
    else:
        gh = tl.maximum(tl.ceil(roi_h / PH), 0.0).to(tl.int32)
        gw = tl.maximum(tl.ceil(roi_w / PW), 0.0).to(tl.int32)
        gh_f = tl.maximum(gh, 1).to(tl.float32)
        gw_f = tl.maximum(gw, 1).to(tl.float32)
        iy = tl.full([], 0, tl.int32)
        while iy < gh:
            y_oob, row_lo, row_hi, ly, hy = _roi_axis(y0 + (iy.to(tl.float32) + 0.5) * bin_h / gh_f, H, sxh)
            ix = tl.full([], 0, tl.int32)
            while ix < gw:
                acc = _roi_sample(acc, base, m2, y_oob, row_lo, row_hi, ly, hy,
                                  x0 + (ix.to(tl.float32) + 0.5) * bin_w / gw_f, W, sxw, MAX_MODE)
                ix += 1
            iy += 1
        count = gh * gw
    if MAX_MODE:
        res = tl.where(count > 0, acc, 0.0)
    else:
        res = acc / tl.maximum(count, 1).to(tl.float32)
    o = out_ptr + r.to(tl.int64) * C * PH * PW + (c * (PH * PW))[:, None] + p[None, :]
    tl.store(o, res.to(out_ptr.dtype.element_ty), mask=m2)


def roi_align_launch_config(c: int, ph: int, pw: int, sampling_ratio: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps): all bins of a ROI in one tile, channels filling it to ~1K
    elements (~110 registers on sm_90, 4 programs per SM); half that when a fixed sampling
    grid is unrolled, which keeps 4x more loads in flight per thread."""
    block_p = next_pow2(ph * pw)
    elems = 512 if sampling_ratio > 1 else 1024
    block_c = max(1, min(next_pow2(c), elems // block_p))
    return block_c, block_p, 4


def _roi_align_triton(p: RoiAlign, x: Any, rois: Any, bidx: Any, out: Any) -> None:
    _util.require_triton("RoiAlign")
    if not out.is_contiguous():
        raise PluginError("Plugin RoiAlign writes a contiguous [R,C,oh,ow] output; the runtime gave a strided one.")
    n, c, h, w = x.shape
    r = rois.shape[0]
    if r == 0 or c == 0:
        return
    block_c, block_p, warps = roi_align_launch_config(c, p.output_height, p.output_width, p.sampling_ratio)
    grid = (r, cdiv(c, block_c))
    _roi_align_kernel[grid](x, rois, bidx, out, c, h, w, *x.stride(), *rois.stride(), bidx.stride(0), float(p.spatial_scale),
                 PH=p.output_height, PW=p.output_width, SR=max(0, p.sampling_ratio),
                 HALF_PIXEL=p.coordinate_transformation_mode == "half_pixel", MAX_MODE=p.mode == "max",
                 BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)
