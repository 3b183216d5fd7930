"""Shape and data-movement layers: Shuffle, Concatenation, Slice, Gather, Scatter, Cast, ..."""
from __future__ import annotations

import math

import torch

from kiln.errors import BuildError, ShapeError
from kiln.ir.dtypes import NARROW_TYPES, torch_dtype
from kiln.kernels._util import ints, norm_axis
from kiln.kernels.registry import tactic


def _reshape_dims(x_shape, dims: list[int], allowzero: bool) -> list[int]:
    out = list(dims)
    if not allowzero:
        for i, d in enumerate(out):
            if d == 0:
                if i >= len(x_shape):
                    raise ShapeError(f"Reshape copies dim {i} (0) but the input has rank {len(x_shape)}.")
                out[i] = x_shape[i]
    return out


@tactic("Shuffle")
def make_shuffle(attrs, ctx):
    p1, p2 = attrs.get("first_transpose"), attrs.get("second_transpose")
    static = attrs.get("reshape")
    allowzero = bool(attrs.get("allowzero", False))

    def run(x, shape=None):
        if p1 == "reverse":             # Transpose without perm on an input of unknown rank
            x = x.permute(list(reversed(range(x.dim()))))
        elif p1 is not None:
            x = x.permute(p1)
        dims = ints(shape) if shape is not None else static
        if dims is not None:
            x = x.reshape(_reshape_dims(x.shape, dims, allowzero))
        if p2 is not None:
            x = x.permute(p2)
        return (x,)
    return run


@tactic("Flatten")
def make_flatten(attrs, ctx):
    axis = attrs.get("axis", 1)

    def run(x):
        a = norm_axis(axis, x.dim())
        lead = 1
        for d in x.shape[:a]:
            lead *= d
        return (x.reshape(lead, -1) if x.numel() or lead else x.reshape(lead, 0),)
    return run


@tactic("Squeeze")
def make_squeeze(attrs, ctx):
    static = attrs.get("axes")

    def run(x, axes=None):
        ax = ints(axes) if axes is not None else static
        if ax is None:
            return (x.reshape([d for d in x.shape if d != 1]),)
        ax = sorted(norm_axis(a, x.dim()) for a in ax)
        return (x.reshape([d for i, d in enumerate(x.shape) if i not in ax]),)
    return run


@tactic("Unsqueeze")
def make_unsqueeze(attrs, ctx):
    static = attrs.get("axes")

    def run(x, axes=None):
        ax = ints(axes) if axes is not None else static
        r = x.dim() + len(ax)
        ax = sorted(norm_axis(a, r) for a in ax)
        shape = list(x.shape)
        for a in ax:
            shape.insert(a, 1)
        return (x.reshape(shape),)
    return run


@tactic("Concatenation")
def make_concat(attrs, ctx):
    axis = attrs["axis"]
    return lambda *xs: (torch.cat([x for x in xs if x is not None], norm_axis(axis, xs[0].dim())),)


@tactic("Identity")
def make_identity(attrs, ctx):
    return lambda x: (x,)


@tactic("Constant")
def make_constant(attrs, ctx):
    raise BuildError("Constant layers are folded into weights at build time.")


def _host_cast(attrs, ctx) -> bool:
    return attrs["to"] in NARROW_TYPES and attrs["to"] != "float8_e8m0fnu"


@tactic("Cast", supports=lambda attrs, ctx: not _host_cast(attrs, ctx))
def make_cast(attrs, ctx):
    to = torch_dtype(attrs["to"])
    saturate = attrs.get("saturate", 1)
    if attrs["to"] == "float8_e8m0fnu":
        return _e8m0_cast(attrs.get("round_mode", "up"), bool(saturate))

    def run(x):
        if x.dtype.is_floating_point and not to.is_floating_point and to != torch.bool:
            x = torch.trunc(x)
        return (x.to(to),)
    return run


def _e8m0_cast(round_mode: str, saturate: bool):
    """E8M0 holds only a (float32-biased) exponent: keep x's exponent, rounding the dropped mantissa
    by ``round_mode``; inf and NaN become the NaN code 0xFF; the sign is dropped."""
    def run(x):
        if x.is_meta:
            return (torch.empty(x.shape, dtype=torch.float8_e8m0fnu, device="meta"),)
        bits = x.float().contiguous().view(torch.int32).to(torch.int64) & 0x7FFFFFFF
        exp, man = bits >> 23, bits & 0x7FFFFF
        if round_mode == "up":
            inc = man > 0
        elif round_mode == "nearest":
            inc = (man > 0x400000) | ((man == 0x400000) & (exp > 0))
        else:
            inc = torch.zeros_like(man, dtype=torch.bool)
        special = exp == 0xFF
        if saturate:
            inc = inc & (exp < 0xFE)
        code = torch.where(special, torch.full_like(exp, 0xFF), exp + inc.to(torch.int64))
        return (code.to(torch.uint8).view(torch.float8_e8m0fnu),)
    return run


@tactic("Cast", "host_narrow", supports=_host_cast, dynamic=True)     # round trip through the host
def make_narrow_cast(attrs, ctx):
    return _narrow_cast(attrs["to"], torch_dtype(attrs["to"]), bool(attrs.get("saturate", 1)))


def _narrow_cast(name: str, storage: torch.dtype, saturate: bool):
    """Cast into a narrow ONNX type with ml_dtypes' rounding (what ONNX specifies), on the host.

    Float8 with ``saturate`` clamps out-of-range values and infinities to the largest finite value
    first; without it they become NaN (or inf for e5m2). Sub-byte integers wrap; float4 saturates.
    """
    import ml_dtypes
    import numpy as np
    target = np.dtype(getattr(ml_dtypes, name))
    is_f8 = name.startswith("float8")
    top = float(ml_dtypes.finfo(target).max) if is_f8 else None

    def run(x):
        if x.is_meta:
            return (torch.empty(x.shape, dtype=storage, device="meta"),)
        a = x.detach().cpu()
        a = (a.double() if a.dtype == torch.float64 else a.float()).numpy()
        if is_f8 and saturate:
            a = np.where(np.isnan(a), a, np.clip(a, -top, top))
        y = a.astype(target)
        if is_f8:
            t = torch.from_numpy(np.require(y, requirements="C").view(np.uint8)).view(storage)
        else:
            t = torch.from_numpy(y.astype(np.float32 if name == "float4_e2m1fn" else
                                          (np.int8 if name in ("int4", "int2") else np.uint8)))
        return (t.to(x.device),)
    return run


@tactic("Slice")
def make_slice(attrs, ctx):
    def run(x, starts, ends, axes=None, steps=None):
        st, en = ints(starts), ints(ends)
        ax = ints(axes) if axes is not None else list(range(len(st)))
        sp = ints(steps) if steps is not None else [1] * len(st)
        index = [slice(None)] * x.dim()
        flips = []
        for s, e, a, k in zip(st, en, ax, sp):
            a = norm_axis(a, x.dim())
            n = x.shape[a]
            if k == 0:
                raise ShapeError("Slice step 0 is invalid; steps must be non-zero.")
            if k > 0:
                s = max(0, min(n, s + n if s < 0 else s))
                e = max(0, min(n, e + n if e < 0 else e))
                index[a] = slice(s, max(s, e), k)
            else:
                s = max(-1, min(n - 1, s + n if s < 0 else s))
                e = max(-1, min(n - 1, e + n if e < 0 else e)) if e >= -n else -1
                # walk backwards: take s, s+k, ... > e  ==> flip then forward slice
                cnt = max(0, -((e - s) // -k)) if s > e else 0
                cnt = max(0, (s - e + (-k) - 1) // (-k)) if s > e else 0
                if cnt == 0:
                    index[a] = slice(0, 0)
                else:
                    lo = s - (cnt - 1) * (-k)
                    index[a] = slice(lo, s + 1, -k)
                    flips.append(a)
        y = x[tuple(index)]
        if flips:
            y = torch.flip(y, flips)
        return (y,)
    return run


def _wrap_indices(idx, n):
    return torch.where(idx < 0, idx + n, idx)


@tactic("Gather")
def make_gather(attrs, ctx):
    axis = attrs.get("axis", 0)

    def run(x, idx):
        a = norm_axis(axis, x.dim())
        i = _wrap_indices(idx.to(torch.int64), x.shape[a]) if not idx.is_meta else idx.to(torch.int64)
        if i.device != x.device:
            i = i.to(x.device)
        if i.dim() == 0:
            # index_select keeps the index on the device: no host sync, so CUDA-graph capture works
            return (torch.index_select(x, a, i.reshape(1)).squeeze(a),)
        out = torch.index_select(x, a, i.reshape(-1))
        return (out.reshape(list(x.shape[:a]) + list(i.shape) + list(x.shape[a + 1:])),)
    return run


@tactic("GatherElements")
def make_gather_elements(attrs, ctx):
    axis = attrs.get("axis", 0)

    def run(x, idx):
        a = norm_axis(axis, x.dim())
        return (torch.gather(x, a, _wrap_indices(idx.to(torch.int64), x.shape[a]).to(x.device)),)
    return run


@tactic("GatherND")
def make_gather_nd(attrs, ctx):
    b = attrs.get("batch_dims", 0)

    def run(x, idx):
        idx = idx.to(torch.int64).to(x.device)
        k = idx.shape[-1]
        batch_shape = list(x.shape[:b])
        bsz = 1
        for d in batch_shape:
            bsz *= d
        xs = x.reshape([bsz] + list(x.shape[b:]))
        ids = idx.reshape([bsz, -1, k])
        dims = torch.tensor(x.shape[b:b + k], device=x.device)
        ids = torch.where(ids < 0, ids + dims, ids)
        out = []
        for i in range(bsz):
            sel = xs[i][tuple(ids[i, :, j] for j in range(k))]
            out.append(sel)
        y = torch.stack(out) if out else xs[:0]
        return (y.reshape(list(idx.shape[:-1]) + list(x.shape[b + k:])),)
    return run


_REDUCE = {"none": None, "add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


@tactic("ScatterND")
def make_scatter_nd(attrs, ctx):
    red = attrs.get("reduction", "none")

    def run(x, idx, upd):
        y = x.clone()
        idx = idx.to(torch.int64).to(x.device)
        k = idx.shape[-1]
        flat_idx = idx.reshape(-1, k)
        flat_upd = upd.reshape([flat_idx.shape[0]] + list(x.shape[k:]))
        for i in range(flat_idx.shape[0]):
            key = tuple(int(v) for v in flat_idx[i])
            if red == "none":
                y[key] = flat_upd[i]
            elif red == "add":
                y[key] = y[key] + flat_upd[i]
            elif red == "mul":
                y[key] = y[key] * flat_upd[i]
            elif red == "max":
                y[key] = torch.maximum(y[key], flat_upd[i])
            elif red == "min":
                y[key] = torch.minimum(y[key], flat_upd[i])
        return (y,)
    return run


@tactic("ScatterElements")
def make_scatter_elements(attrs, ctx):
    axis = attrs.get("axis", 0)
    red = attrs.get("reduction", "none")

    def run(x, idx, upd):
        a = norm_axis(axis, x.dim())
        idx = _wrap_indices(idx.to(torch.int64), x.shape[a]).to(x.device)
        if red == "none":
            return (x.scatter(a, idx, upd),)
        return (x.scatter_reduce(a, idx, upd, _REDUCE[red], include_self=True),)
    return run


@tactic("Expand")
def make_expand(attrs, ctx):
    def run(x, shape):
        s = ints(shape)
        r = max(len(s), x.dim())
        s = [1] * (r - len(s)) + s
        xs = [1] * (r - x.dim()) + list(x.shape)
        target = [max(a, b) if a == 1 or b == 1 else a for a, b in zip(xs, s)]
        target = [b if a == 1 else a for a, b in zip(xs, s)]
        return (x.reshape(xs).expand(target),)
    return run


@tactic("Tile")
def make_tile(attrs, ctx):
    return lambda x, repeats: (x.repeat(ints(repeats)) if x.dim() else x.clone(),)


@tactic("Shape")
def make_shape(attrs, ctx):
    start, end = attrs.get("start", 0), attrs.get("end")

    def run(x):
        dims = list(x.shape)
        r = len(dims)
        s = max(0, min(r, start + r if start < 0 else start))
        e = r if end is None else max(0, min(r, end + r if end < 0 else end))
        return (torch.tensor(dims[s:e], dtype=torch.int64),)
    return run


@tactic("Size")
def make_size(attrs, ctx):
    return lambda x: (torch.tensor(x.numel(), dtype=torch.int64),)


@tactic("ConstantOfShape")
def make_constant_of_shape(attrs, ctx):
    import numpy as np
    value = np.asarray(attrs.get("value", np.zeros(1, np.float32)))
    out_dtype = torch_dtype(ctx.output_dtypes[0]) if ctx.output_dtypes else torch.float32
    scalar = value.reshape(-1)[0].item() if value.size else 0
    device = "cuda" if ctx.device == "cuda" else "cpu"

    def run(shape):
        dev = "meta" if getattr(shape, "is_meta", False) else device
        return (torch.full(ints(shape), scalar, dtype=out_dtype, device=dev),)
    return run


@tactic("Range")
def make_range(attrs, ctx):
    name = ctx.layer_name

    def run(start, limit, delta):
        s, l, d = start.reshape(-1)[0].item(), limit.reshape(-1)[0].item(), delta.reshape(-1)[0].item()
        if d == 0 or not all(math.isfinite(v) for v in (s, l, d)):
            raise ShapeError(f"Range {name!r} got start={s}, limit={l}, delta={d}: the delta must be non-zero and "
                             f"all three finite (ONNX Range); check the values the model computes for them.")
        n = max(0, math.ceil((l - s) / d))
        return (torch.arange(n, dtype=start.dtype, device=start.device) * d + s if start.dtype.is_floating_point
                else (torch.arange(n, dtype=torch.int64, device=start.device) * int(d) + int(s)).to(start.dtype),)
    return run


@tactic("Split")
def make_split(attrs, ctx):
    axis = attrs.get("axis", 0)
    static = attrs.get("split")
    n_out = attrs.get("num_outputs") or len(ctx.output_dtypes)

    def run(x, split=None):
        a = norm_axis(axis, x.dim())
        sizes = ints(split) if split is not None else static
        if not sizes:
            n = x.shape[a]
            per = -(-n // n_out)
            sizes = [min(per, n - i * per) for i in range(n_out)]
        return tuple(torch.split(x, sizes, dim=a))
    return run


@tactic("Where")
def make_where(attrs, ctx):
    return lambda c, a, b: (torch.where(c.to(torch.bool), a, b),)


@tactic("DepthToSpace")
def make_d2s(attrs, ctx):
    bs, mode = attrs["blocksize"], attrs.get("mode", "DCR")

    def run(x):
        n, c, h, w = x.shape
        if mode == "DCR":
            y = x.reshape(n, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // (bs * bs), bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
        return (y.reshape(n, c // (bs * bs), h * bs, w * bs),)
    return run


@tactic("SpaceToDepth")
def make_s2d(attrs, ctx):
    bs = attrs["blocksize"]
    crd = attrs.get("mode", "DCR") == "CRD"       # opset 28: channel-major block order

    def run(x):
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // bs, bs, w // bs, bs)
        y = y.permute(0, 1, 3, 5, 2, 4) if crd else y.permute(0, 3, 5, 1, 2, 4)
        return (y.reshape(n, c * bs * bs, h // bs, w // bs),)
    return run


@tactic("Trilu")
def make_trilu(attrs, ctx):
    upper = attrs.get("upper", 1)

    def run(x, k=None):
        kk = ints(k)[0] if k is not None else 0
        return ((torch.triu(x, kk) if upper else torch.tril(x, kk)),)
    return run


@tactic("OneHot")
def make_onehot(attrs, ctx):
    axis = attrs.get("axis", -1)

    def run(idx, depth, values):
        d = int(depth.reshape(-1)[0].item())
        i = idx.to(torch.int64)
        i = torch.where(i < 0, i + d, i)
        valid = (i >= 0) & (i < d)
        oh = torch.nn.functional.one_hot(torch.where(valid, i, torch.zeros_like(i)), d) * valid.unsqueeze(-1)
        out = torch.where(oh.bool(), values[1], values[0])
        a = norm_axis(axis, idx.dim() + 1)
        return (out.movedim(-1, a),)
    return run


@tactic("NonZero", dynamic=True)
def make_nonzero(attrs, ctx):
    return lambda x: (torch.nonzero(x).t().contiguous().to(torch.int64) if x.dim() else
                      torch.zeros((0, int(bool(x.item()))), dtype=torch.int64, device=x.device),)


@tactic("CumSum")
def make_cumsum(attrs, ctx):
    excl, rev = attrs.get("exclusive", 0), attrs.get("reverse", 0)
    prod = attrs.get("op", "sum") == "prod"       # CumProd shares the layer

    def run(x, axis):
        a = norm_axis(ints(axis)[0], x.dim())
        y = torch.flip(x, [a]) if rev else x
        if excl:                 # shift by one along the axis, seeding with the identity (0 or 1)
            seed = torch.ones_like(y.narrow(a, 0, 1)) if prod else torch.zeros_like(y.narrow(a, 0, 1))
            y = torch.cat([seed, y.narrow(a, 0, y.shape[a] - 1)], a)
        c = torch.cumprod(y, a, dtype=x.dtype) if prod else torch.cumsum(y, a, dtype=x.dtype)
        return (torch.flip(c, [a]) if rev else c,)
    return run


@tactic("Select")
def make_select(attrs, ctx):
    axis, index = attrs.get("axis", 0), int(attrs["index"])

    def run(x):
        a = norm_axis(axis, x.dim())
        return (x.select(a, index + x.shape[a] if index < 0 else index),)
    return run
