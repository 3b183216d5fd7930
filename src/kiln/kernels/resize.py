"""Resize with ONNX semantics, as separable per-axis interpolation.

Each resized axis maps output coordinates to input coordinates by the
coordinate-transformation mode, then gathers neighbours and blends them
(nearest: 1 tap, linear: 2, cubic: 4). Integer nearest upsampling takes a
fast path through ``F.interpolate``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.errors import BuildError
from kiln.kernels._util import ints, norm_axis
from kiln.kernels.registry import tactic


def _src_coords(mode: str, out_len: int, in_len: int, scale: float, roi: tuple[float, float] | None):
    x = torch.arange(out_len, dtype=torch.float64)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        adj = out_len / (scale * in_len)
        center = in_len / 2
        offset = center * (1 - adj)
        return offset + (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_len > 1 else torch.zeros_like(x)
    if mode == "align_corners":
        # ONNX divides by the unrounded resized length (in_len * scale), not by out_len
        denom = in_len * scale - 1
        return x * (in_len - 1) / denom if out_len > 1 and denom != 0 else torch.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_crop_and_resize":
        s, e = roi
        if out_len > 1:
            return s * (in_len - 1) + x * (e - s) * (in_len - 1) / (out_len - 1)
        return torch.full_like(x, 0.5 * (s + e) * (in_len - 1))
    raise BuildError(f"Unknown Resize coordinate_transformation_mode {mode!r}.")


def _nearest(c: torch.Tensor, how: str) -> torch.Tensor:
    if how == "round_prefer_floor":
        return torch.where(c - torch.floor(c) == 0.5, torch.floor(c), torch.round(c))
    if how == "round_prefer_ceil":
        return torch.where(c - torch.floor(c) == 0.5, torch.ceil(c), torch.round(c))
    if how == "floor":
        return torch.floor(c)
    if how == "ceil":
        return torch.ceil(c)
    raise BuildError(f"Unknown Resize nearest_mode {how!r}.")


def _cubic_weights(t: torch.Tensor, a: float) -> list[torch.Tensor]:
    def w(d):
        d = d.abs()
        return torch.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                           torch.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, torch.zeros_like(d)))
    return [w(t + 1), w(t), w(1 - t), w(2 - t)]


def _resize_axis(x, axis, out_len, scale, attrs, roi):
    in_len = x.shape[axis]
    mode = attrs.get("mode", "nearest")
    ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
    c = _src_coords(ctm, out_len, in_len, scale, roi)
    dev = x.device
    outside = None
    if ctm == "tf_crop_and_resize":
        outside = (c < 0) | (c > in_len - 1)
    if mode == "nearest":
        idx = _nearest(c, attrs.get("nearest_mode", "round_prefer_floor")).clamp(0, in_len - 1).long()
        y = torch.index_select(x, axis, idx.to(dev))
    elif mode == "linear":
        antialias = attrs.get("antialias", 0) and scale < 1
        if antialias:
            return _antialias_axis(x, axis, out_len, scale, c, in_len, "linear", attrs)
        cc = c.clamp(0, in_len - 1)
        lo = torch.floor(cc).long()
        hi = (lo + 1).clamp(max=in_len - 1)
        t = (cc - lo).to(torch.float64)
        shape = [1] * x.dim()
        shape[axis] = out_len
        xl, xh = torch.index_select(x, axis, lo.to(dev)), torch.index_select(x, axis, hi.to(dev))
        tt = t.to(x.dtype if x.dtype.is_floating_point else torch.float32).reshape(shape).to(dev)
        y = xl + (xh - xl) * tt
    elif mode == "cubic":
        if attrs.get("antialias", 0) and scale < 1:
            return _antialias_axis(x, axis, out_len, scale, c, in_len, "cubic", attrs)
        a = attrs.get("cubic_coeff_a", -0.75)
        base = torch.floor(c)
        t = c - base
        ws = _cubic_weights(t, a)
        idxs = [base.long() + k for k in (-1, 0, 1, 2)]
        if attrs.get("exclude_outside", 0):
            ws = [torch.where((i >= 0) & (i < in_len), w, torch.zeros_like(w)) for w, i in zip(ws, idxs)]
            total = sum(ws)
            ws = [w / total for w in ws]
        shape = [1] * x.dim()
        shape[axis] = out_len
        y = 0
        for w, i in zip(ws, idxs):
            g = torch.index_select(x, axis, i.clamp(0, in_len - 1).to(dev))
            y = y + g * w.to(x.dtype).reshape(shape).to(dev)
    else:
        raise BuildError(f"Unknown Resize mode {mode!r}; use nearest, linear or cubic.")
    if outside is not None and outside.any():
        shape = [1] * x.dim()
        shape[axis] = out_len
        y = torch.where(outside.reshape(shape).to(dev), torch.tensor(attrs.get("extrapolation_value", 0.0),
                                                                       dtype=y.dtype, device=dev), y)
    return y


def _antialias_axis(x, axis, out_len, scale, c, in_len, mode, attrs):
    """Downsampling with the filter widened by 1/scale (ONNX antialias=1)."""
    support = (1.0 if mode == "linear" else 2.0) / scale
    a = attrs.get("cubic_coeff_a", -0.75)
    rows = torch.zeros(out_len, in_len, dtype=torch.float64)
    for o in range(out_len):
        center = float(c[o])
        lo = int(math.floor(center - support)) + 1
        hi = int(math.floor(center + support))
        ws, ids = [], []
        for i in range(lo, hi + 1):
            d = abs((i - center) * scale)
            if mode == "linear":
                w = max(0.0, 1 - d)
            else:
                w = ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else (((a * d - 5 * a) * d + 8 * a) * d - 4 * a
                                                                         if d < 2 else 0.0)
            if attrs.get("exclude_outside", 0) and not 0 <= i < in_len:
                w = 0.0
            ws.append(w)
            ids.append(min(max(i, 0), in_len - 1))
        total = sum(ws)
        for w, i in zip(ws, ids):
            rows[o, i] += w / total if total else 0.0
    m = rows.to(x.dtype).to(x.device)
    xm = x.movedim(axis, -1)
    y = xm @ m.t()
    return y.movedim(-1, axis)


def resize_plan(attrs, x, scales, sizes) -> tuple[list[int], list[float]]:
    """The output shape and the per-axis scale of every axis of ``x`` (1.0 where it is not resized)."""
    r = x.dim()
    axes = [norm_axis(a, r) for a in attrs["axes"]] if attrs.get("axes") else list(range(r))
    in_shape = list(x.shape)
    sc = [float(v) for v in scales.reshape(-1).tolist()] if scales is not None and scales.numel() else None
    sz = ints(sizes) if sizes is not None and sizes.numel() else None
    full_scales = [1.0] * r
    out = list(in_shape)
    if sz is not None:
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            ratios = [sz[i] / in_shape[a] for i, a in enumerate(axes)]
            s = min(ratios) if policy == "not_larger" else max(ratios)
            for a in axes:
                full_scales[a] = s
                out[a] = int(math.floor(s * in_shape[a] + 0.5))
        else:
            for i, a in enumerate(axes):
                out[a] = sz[i]
                full_scales[a] = sz[i] / in_shape[a] if in_shape[a] else 1.0
    elif sc is not None:
        for i, a in enumerate(axes):
            full_scales[a] = sc[i]
            out[a] = int(math.floor(in_shape[a] * sc[i]))
    return out, full_scales


@tactic("Resize")
def make_resize(attrs, ctx):
    def run(x, roi=None, scales=None, sizes=None):
        r = x.dim()
        axes = [norm_axis(a, r) for a in attrs["axes"]] if attrs.get("axes") else list(range(r))
        in_shape = list(x.shape)
        out, full_scales = resize_plan(attrs, x, scales, sizes)
        roi_l = [float(v) for v in roi.reshape(-1).tolist()] if roi is not None and roi.numel() else None
        if x.is_meta:
            return (torch.empty(out, dtype=x.dtype, device="meta"),)
        mode = attrs.get("mode", "nearest")
        ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
        # fast path: integer nearest upsampling on the spatial axes
        if (mode == "nearest" and ctm == "asymmetric" and attrs.get("nearest_mode", "round_prefer_floor") == "floor"
                and r >= 3 and all(full_scales[a] == 1.0 and out[a] == in_shape[a] for a in range(2))
                and all(float(full_scales[a]).is_integer() and out[a] == in_shape[a] * int(full_scales[a])
                        for a in range(2, r)) and r <= 5 and x.dtype.is_floating_point):
            return (F.interpolate(x, size=out[2:], mode="nearest"),)
        y = x if x.dtype.is_floating_point else x.float()
        for a in range(r):
            if out[a] != in_shape[a] or full_scales[a] != 1.0 or ctm == "tf_crop_and_resize":
                roi_a = None
                if roi_l is not None:
                    k = axes.index(a) if a in axes else None
                    n = len(roi_l) // 2
                    roi_a = (roi_l[k], roi_l[k + n]) if k is not None else (0.0, 1.0)
                if ctm == "tf_crop_and_resize" and roi_a is None:
                    roi_a = (0.0, 1.0)
                y = _resize_axis(y, a, out[a], full_scales[a], attrs, roi_a)
        return (y.to(x.dtype) if y.dtype != x.dtype else y,)
    return run
