"""Data-dependent selection and small tensor utilities: Unique, Compress, ReverseSequence,
TensorScatter, EyeLike, CenterCropPad, BitCast, Col2Im, Hardmax, Det, TfIdfVectorizer.

These are rare in vision/transformer graphs but part of the ONNX vocabulary; they
run on torch (Unique goes through numpy, whose ordering ONNX specifies).
"""
from __future__ import annotations

import numpy as np
import torch

from kiln.ir.dtypes import torch_dtype

from kiln.kernels._util import ints, norm_axis
from kiln.kernels.registry import tactic


@tactic("Unique", dynamic=True)
def make_unique(attrs, ctx):
    axis = attrs.get("axis")
    want_sorted = bool(attrs.get("sorted", 1))

    def run(x):
        low = x.dtype in (torch.bfloat16, torch.float16)
        a = x.detach().cpu().float().numpy() if low else x.detach().cpu().numpy()      # numpy has no bfloat16
        if axis is None:
            a = a.reshape(-1)
            y, idx, inv, cnt = np.unique(a, return_index=True, return_inverse=True, return_counts=True)
            ax = 0
        else:
            ax = norm_axis(axis, a.ndim)
            y, idx, inv, cnt = np.unique(a, axis=ax, return_index=True, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        if not want_sorted:      # order of first occurrence
            order = np.argsort(idx, kind="stable")
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            y, idx, cnt, inv = np.take(y, order, axis=ax), idx[order], cnt[order], rank[inv]
        dev = x.device
        return (torch.from_numpy(np.ascontiguousarray(y)).to(dev, x.dtype),
                *(torch.from_numpy(np.asarray(v, np.int64)).to(dev) for v in (idx, inv, cnt)))
    return run


@tactic("Compress", dynamic=True)
def make_compress(attrs, ctx):
    axis = attrs.get("axis")

    def run(x, cond):
        if axis is None:
            x = x.reshape(-1)
            a = 0
        else:
            a = norm_axis(axis, x.dim())
        keep = torch.nonzero(cond.reshape(-1).to(torch.bool)).reshape(-1)
        keep = keep[keep < x.shape[a]].to(x.device)
        return (torch.index_select(x, a, keep),)
    return run


@tactic("ReverseSequence")
def make_reverse_sequence(attrs, ctx):
    b_axis, t_axis = attrs.get("batch_axis", 1), attrs.get("time_axis", 0)

    def run(x, lens):
        t_len = x.shape[t_axis]
        t = torch.arange(t_len, device=x.device).reshape(-1, 1)
        n = lens.to(torch.int64).to(x.device).reshape(1, -1)
        src = torch.where(t < n, n - 1 - t, t)            # [T, B]
        if t_axis > b_axis:
            src = src.t()
        shape = [1] * x.dim()
        shape[t_axis], shape[b_axis] = x.shape[t_axis], x.shape[b_axis]
        return (torch.gather(x, t_axis, src.reshape(shape).expand(x.shape)),)
    return run


@tactic("TensorScatter", dynamic=True)     # reads write_indices on the host: not graph-capturable
def make_tensor_scatter(attrs, ctx):
    axis, circular = attrs.get("axis", -2), attrs.get("mode", "linear") == "circular"

    def run(cache, update, write=None):
        a = norm_axis(axis, cache.dim())
        y = cache.clone()
        cap, seq = cache.shape[a], update.shape[a]
        starts = write.to(torch.int64).tolist() if write is not None else [0] * cache.shape[0]
        for b, s in enumerate(starts):
            pos = torch.arange(seq, device=cache.device) + int(s)
            if circular:
                pos = pos % cap
            y[b].index_copy_(a - 1, pos, update[b])
        return (y,)
    return run


@tactic("EyeLike")
def make_eye_like(attrs, ctx):
    k = int(attrs.get("k", 0))
    out = torch_dtype(ctx.output_dtypes[0]) if ctx.output_dtypes else None

    def run(x):
        n, m = x.shape
        i = torch.arange(n, device=x.device).reshape(-1, 1)
        j = torch.arange(m, device=x.device).reshape(1, -1)
        return ((j - i == k).to(out or x.dtype),)
    return run


@tactic("CenterCropPad")
def make_center_crop_pad(attrs, ctx):
    axes_attr = attrs.get("axes")

    def run(x, shape):
        target = ints(shape)
        axes = [norm_axis(a, x.dim()) for a in axes_attr] if axes_attr is not None else list(range(x.dim()))
        out_shape = list(x.shape)
        src = [slice(None)] * x.dim()
        dst = [slice(None)] * x.dim()
        for a, s in zip(axes, target):
            d = x.shape[a]
            out_shape[a] = s
            if d >= s:
                start = (d - s) // 2
                src[a] = slice(start, start + s)
            else:
                left = (s - d) // 2
                dst[a] = slice(left, left + d)
        y = torch.zeros(out_shape, dtype=x.dtype, device=x.device)
        y[tuple(dst)] = x[tuple(src)]
        return (y,)
    return run


@tactic("BitCast")
def make_bitcast(attrs, ctx):
    to = torch_dtype(attrs["to"])
    return lambda x: (x.contiguous().view(to),)


@tactic("Col2Im", dynamic=True)     # builds its index map on the host per call: not graph-capturable
def make_col2im(attrs, ctx):
    dil_attr, pads_attr, strides_attr = attrs.get("dilations"), attrs.get("pads"), attrs.get("strides")

    def run(x, image_shape, block_shape):
        img, blk = ints(image_shape), ints(block_shape)
        nd = len(img)
        dil = list(dil_attr or [1] * nd)
        pads = list(pads_attr or [0] * (2 * nd))
        strides = list(strides_attr or [1] * nd)
        counts = [(img[d] + pads[d] + pads[nd + d] - (dil[d] * (blk[d] - 1) + 1)) // strides[d] + 1 for d in range(nd)]
        n, ck, length = x.shape
        kprod = int(np.prod(blk))
        c = ck // kprod
        # coordinate of every (kernel offset, block position) pair, per spatial dim
        kgrid = np.stack(np.meshgrid(*[np.arange(k) for k in blk], indexing="ij"), -1).reshape(-1, nd)
        pgrid = np.stack(np.meshgrid(*[np.arange(m) for m in counts], indexing="ij"), -1).reshape(-1, nd)
        coord = pgrid[None, :, :] * np.asarray(strides) + kgrid[:, None, :] * np.asarray(dil) - np.asarray(pads[:nd])
        valid = np.all((coord >= 0) & (coord < np.asarray(img)), -1)          # [K, L]
        flat = np.ravel_multi_index(tuple(np.clip(coord, 0, np.asarray(img) - 1).transpose(2, 0, 1)), img)
        idx = torch.from_numpy(np.where(valid, flat, 0).reshape(-1)).to(x.device)
        vals = x.reshape(n, c, kprod * length) * torch.from_numpy(valid.reshape(-1)).to(x.device, x.dtype)
        y = torch.zeros(n, c, int(np.prod(img)), dtype=x.dtype, device=x.device)
        y.index_add_(2, idx, vals)
        return (y.reshape([n, c] + img),)
    return run


@tactic("Hardmax")
def make_hardmax(attrs, ctx):
    axis = attrs.get("axis", -1)

    def run(x):
        a = norm_axis(axis, x.dim())
        idx = torch.argmax(x, a, keepdim=True)
        return (torch.zeros_like(x).scatter(a, idx, 1),)
    return run


@tactic("Det")
def make_det(attrs, ctx):
    def run(x):
        if x.dtype in (torch.float16, torch.bfloat16):
            return (torch.linalg.det(x.float()).to(x.dtype),)
        return (torch.linalg.det(x),)
    return run


@tactic("TfIdfVectorizer", dynamic=True)   # counts on the host: not graph-capturable
def make_tfidf(attrs, ctx):
    """N-gram counts over integer token rows (host loop; these are short text rows).

    The pool lists all 1-grams, then all 2-grams, ...; ``ngram_counts[i]`` is where the (i+1)-grams
    start and ``ngram_indexes`` maps each pool entry to an output column. An n-gram (n ≥ 2) may
    skip up to ``max_skip_count`` tokens between its items, the same skip throughout.
    """
    pool = list(attrs["pool_int64s"])
    starts = list(attrs["ngram_counts"]) + [len(pool)]
    cols = list(attrs["ngram_indexes"])
    lo, hi, max_skip = attrs["min_gram_length"], attrs["max_gram_length"], attrs["max_skip_count"]
    mode = attrs.get("mode", "TF")
    weights = attrs.get("weights")
    table: dict[tuple[int, ...], int] = {}
    entry = 0
    for n in range(1, len(starts)):
        for j in range(starts[n - 1], starts[n], n):
            table[tuple(pool[j:j + n])] = cols[entry]
            entry += 1
    width = max(cols) + 1 if cols else 0

    def counts(row: list[int]) -> list[float]:
        out = [0.0] * width
        for n in range(lo, hi + 1):
            for skip in range(0, (max_skip if n > 1 else 0) + 1):
                step = skip + 1
                for i in range(len(row) - (n - 1) * step):
                    col = table.get(tuple(row[i + m * step] for m in range(n)))
                    if col is not None:
                        out[col] += 1
        return out

    def run(x):
        rows = [x.tolist()] if x.dim() == 1 else x.reshape(x.shape[0], -1).tolist()
        y = torch.tensor([counts(r) for r in rows], dtype=torch.float32).reshape(len(rows), width)
        if mode in ("IDF", "TFIDF"):
            w = torch.tensor(weights if weights is not None else [1.0] * width, dtype=torch.float32)
            w = torch.zeros(width).index_copy_(0, torch.tensor(cols), w) if weights is not None else w
            y = (y > 0).float() * w if mode == "IDF" else y * w
        return ((y[0] if x.dim() == 1 else y).to(x.device),)
    return run
