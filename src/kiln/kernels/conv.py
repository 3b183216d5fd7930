"""Convolution, Deconvolution, Pooling, Padding and LRN on torch (cuDNN on the GPU)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.errors import BuildError
from kiln.kernels._util import ints, per_tensor
from kiln.kernels.pointwise import act_params, activation_fn
from kiln.kernels.registry import tactic

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CPU_CHANNELS_LAST = False      # NHWC oneDNN kernels are ~15% faster on the CPU but round less like ONNX Runtime
_DECONV = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _split_pads(pads: list[int], nd: int) -> tuple[list[int], list[int]]:
    return list(pads[:nd]), list(pads[nd:2 * nd])


def _torch_pad(begins: list[int], ends: list[int]) -> list[int]:
    """F.pad wants (last-dim begin, last-dim end, ...) order."""
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [b, e]
    return out


def _epilogue(attrs):
    act = attrs.get("activation")
    fn = activation_fn(act, *act_params(attrs)) if act else None
    return fn


def _channels_last(t, cache):
    """4-D convs run NHWC: fp16/bf16 on the GPU (tensor-core kernels) and fp32 on the CPU (oneDNN's
    blocked kernels); weights convert once."""
    if t.dim() != 4 or t.is_meta:
        return t
    if t.is_cuda and t.dtype not in (torch.float16, torch.bfloat16):
        return t
    if not t.is_cuda and (t.dtype != torch.float32 or not CPU_CHANNELS_LAST):
        return t
    if t.is_contiguous(memory_format=torch.channels_last):
        return t
    if cache is not None:
        return per_tensor(cache, t, lambda: t.contiguous(memory_format=torch.channels_last))
    return t.contiguous(memory_format=torch.channels_last)


@tactic("Convolution")
def make_convolution(attrs, ctx):
    stride, dil, groups = attrs["stride"], attrs["dilation"], attrs.get("groups", 1)
    nd = len(stride)
    if nd not in _CONV:
        raise BuildError(f"Convolution {ctx.layer_name!r} is {nd}-D; Kiln supports 1-, 2- and 3-D convolution.")
    conv = _CONV[nd]
    begins, ends = _split_pads(attrs["pads"], nd)
    symmetric = begins == ends
    act_name = attrs.get("activation")
    act = _epilogue(attrs)
    inplace = act_name in ("relu", "sigmoid", "tanh", "silu", "hard_swish", "hard_sigmoid", "leaky_relu")
    after = bool(attrs.get("residual_after_activation"))
    wcache: dict = {}

    def run(x, w, b=None, residual=None):
        x = match_weight(x, w)
        if x.dim() == 4 and (x.is_cuda or groups == 1):
            x = _channels_last(x, None)
            w = _channels_last(w, wcache)
        if symmetric:
            y = conv(x, w, b, stride, begins, dil, groups)
        else:
            y = conv(F.pad(x, _torch_pad(begins, ends)), w, b, stride, 0, dil, groups)
        if residual is not None and not after:
            y = y.add_(residual) if not y.is_meta else y + residual
        if act is not None:
            if inplace and not y.is_meta:
                y = _inplace_act(y, act_name, attrs)
            else:
                y = act(y)
        if residual is not None and after:
            y = y.add_(residual) if not y.is_meta else y + residual
        return (pool_after(y, attrs),)
    return run


def match_weight(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A stem convolution may read the engine's FP32 input directly (builder/precision.py moves the
    input's cast into it); tactics without a fused cast convert first."""
    if x.dtype != w.dtype and x.dtype.is_floating_point and w.dtype.is_floating_point:
        return x.to(w.dtype)
    return x


def pool_after(y: torch.Tensor, attrs) -> torch.Tensor:
    """The max pool fused into a stem convolution (passes/fuse_stem_pool.py), for tactics that run it
    as a second step."""
    p = attrs.get("pool")
    if not p:
        return y
    return F.max_pool2d(y, p["kernel"], p["stride"], p["pads"][:2])


def _inplace_act(y, name, attrs):
    if name == "relu":
        return y.relu_()
    if name == "sigmoid":
        return y.sigmoid_()
    if name == "tanh":
        return y.tanh_()
    if name == "silu":
        return F.silu(y, inplace=True)
    if name == "hard_swish":
        return F.hardswish(y, inplace=True)
    if name == "hard_sigmoid":
        alpha, beta = act_params(attrs)
        return y.mul_(alpha).add_(beta).clamp_(0, 1)
    if name == "leaky_relu":
        return F.leaky_relu(y, act_params(attrs)[0], inplace=True)
    return _epilogue(attrs)(y)


def _cudnn_fused_ok(attrs, ctx):
    return (len(attrs["stride"]) == 2 and attrs.get("activation") == "relu"
            and not attrs.get("residual_after_activation")
            and attrs["pads"][:2] == attrs["pads"][2:])


@tactic("Convolution", "cudnn_fused", devices=("cuda",), supports=_cudnn_fused_ok)
def make_convolution_cudnn_fused(attrs, ctx):
    """conv + bias (+ residual) + ReLU as one cuDNN kernel."""
    stride, dil, groups = list(attrs["stride"]), list(attrs["dilation"]), attrs.get("groups", 1)
    pads = list(attrs["pads"][:2])
    wcache: dict = {}

    def run(x, w, b=None, residual=None):
        x = _channels_last(match_weight(x, w), None)
        w = _channels_last(w, wcache)
        if x.is_meta:
            return (pool_after(F.conv2d(x, w, b, stride, pads, dil, groups), attrs),)
        if residual is not None:
            r = _channels_last(residual, None)
            return (pool_after(torch.cudnn_convolution_add_relu(x, w, r, 1.0, b, stride, pads, dil, groups), attrs),)
        return (pool_after(torch.cudnn_convolution_relu(x, w, b, stride, pads, dil, groups), attrs),)
    return run


def _gemm_1x1_ok(attrs, ctx):
    return (len(attrs["stride"]) == 2 and list(attrs["stride"]) == [1, 1] and not any(attrs["pads"])
            and list(attrs["dilation"]) == [1, 1] and attrs.get("groups", 1) == 1 and not attrs.get("residual")
            and not attrs.get("pool") and attrs.get("activation") in (None, "relu")
            and ctx.precision.split()[0] in ("fp16", "bf16"))


@tactic("Convolution", "cublaslt_1x1", devices=("cuda",), supports=_gemm_1x1_ok, priority=1)
def make_convolution_gemm(attrs, ctx):
    """A 1×1 stride-1 convolution on channels-last memory is the GEMM [N·H·W, Cin] @ [Cin, Cout]:
    one cuBLASLt call with its bias(+ReLU) epilogue, no cuDNN plan around it. cuDNN often picks the
    same cuBLAS kernels; the builder times both. torch's cuBLASLt path adds a small memset before each GEMM (a graph
    node of its own), which the per-layer timing includes."""
    relu = attrs.get("activation") == "relu"
    wcache: dict = {}

    def run(x, w, b=None, residual=None):
        if w.shape[2:] != (1, 1):
            raise BuildError("cublaslt_1x1 runs 1x1 convolutions only.")
        x = _channels_last(match_weight(x, w), None)
        n, cin, h, wd = x.shape
        cout = w.shape[0]
        if x.is_meta:
            return (x.new_empty((n, h, wd, cout)).permute(0, 3, 1, 2),)
        a = x.permute(0, 2, 3, 1).reshape(n * h * wd, cin)
        wt = per_tensor(wcache, w, lambda: w.reshape(cout, cin).t())
        if b is None:
            y = torch.mm(a, wt)
            y = y.relu_() if relu else y
        else:
            y = torch._addmm_activation(b, a, wt) if relu else torch.addmm(b, a, wt)
        return (y.view(n, h, wd, cout).permute(0, 3, 1, 2),)
    return run


@tactic("Deconvolution")
def make_deconvolution(attrs, ctx):
    stride, dil, groups = attrs["stride"], attrs["dilation"], attrs.get("groups", 1)
    nd = len(stride)
    if nd not in _DECONV:
        raise BuildError(f"Deconvolution {ctx.layer_name!r} is {nd}-D; Kiln supports 1-, 2- and 3-D.")
    deconv = _DECONV[nd]
    begins, ends = _split_pads(attrs["pads"], nd)
    out_pad = list(attrs.get("output_padding") or [0] * nd)

    def run(x, w, b=None):
        # Transposed conv with asymmetric pads: compute with zero padding, then crop. The output_padding
        # rows get no contribution from any input, so they are appended as zeros (any size works).
        y = deconv(x, w, None, stride, 0, 0, groups, dil)
        if any(out_pad):
            y = F.pad(y, _torch_pad([0] * nd, out_pad))
        slices = [slice(None), slice(None)]
        for i in range(nd):
            size = y.shape[2 + i]
            slices.append(slice(begins[i], size - ends[i]))
        y = y[tuple(slices)]
        if b is not None:
            y = y + b.reshape([1, -1] + [1] * nd)
        return (y,)
    return run


def _pool_out(size, k, s, pb, pe, d, ceil):
    eff = d * (k - 1) + 1
    num = size + pb + pe - eff
    out = (-(-num // s) if ceil else num // s) + 1
    if ceil and (out - 1) * s >= size + pb:
        out -= 1
    return out


_SPATIAL = {3: (2,), 4: (2, 3), 5: (2, 3, 4)}     # the spatial dims of an N, C, ... tensor by rank


def _global_average(x):
    """mean over the spatial dims, keeping them; FP16/BF16 averaged in FP32."""
    dims = _SPATIAL.get(x.dim()) or tuple(range(2, x.dim()))
    if x.dtype is torch.float32:
        return (torch.mean(x, dims, keepdim=True),)
    return (torch.mean(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dims, keepdim=True).to(x.dtype),)


@tactic("Pooling")
def make_pooling(attrs, ctx):
    ptype = attrs["type"]
    kernel = attrs.get("kernel")
    if kernel is None:   # global
        if ptype == "max":
            return lambda x: (torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True),)
        if ptype == "average":
            return _global_average
        p = attrs.get("p", 2)
        return lambda x: (torch.sum(x.abs() ** p, dim=tuple(range(2, x.dim())), keepdim=True) ** (1.0 / p),)
    nd = len(kernel)
    stride = attrs.get("stride") or [1] * nd
    dil = attrs.get("dilation") or [1] * nd
    begins, ends = _split_pads(attrs.get("pads") or [0] * 2 * nd, nd)
    ceil = bool(attrs.get("ceil_mode", False))
    include_pad = bool(attrs.get("count_include_pad", False))

    if ptype == "max":
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
        want_idx = attrs.get("return_indices", False)
        storage_order = attrs.get("storage_order", 0)

        def run_max(x):
            if x.is_cuda and not x.dtype.is_floating_point and x.element_size() <= 2:
                # CUDA has no integer max-pool; 8/16-bit integers are exact in float32
                outs = run_max(x.float())
                return (outs[0].to(x.dtype),) + tuple(outs[1:])
            pb, pe = list(begins), list(ends)
            xs = x
            sym = pb == pe and all(pb[i] <= kernel[i] // 2 for i in range(nd))
            if not sym:
                fill = float("-inf") if x.dtype.is_floating_point else int(torch.iinfo(x.dtype).min)
                xs = F.pad(x, _torch_pad(pb, pe), value=fill)
                pb = [0] * nd
                pe = [0] * nd
                # ceil mode must not create windows starting in the end padding only
                outs = [_pool_out(x.shape[2 + i], kernel[i], stride[i], begins[i], ends[i], dil[i], ceil)
                        for i in range(nd)]
                need = [(outs[i] - 1) * stride[i] + dil[i] * (kernel[i] - 1) + 1 for i in range(nd)]
                extra = [max(0, need[i] - xs.shape[2 + i]) for i in range(nd)]
                if any(extra):
                    xs = F.pad(xs, _torch_pad([0] * nd, extra), value=fill)
                res = fn(xs, kernel, stride, 0, dil, False, return_indices=want_idx)
            else:
                res = fn(xs, kernel, stride, pb, dil, ceil, return_indices=want_idx)
            if want_idx:
                y, idx = res
                if not sym:
                    raise BuildError("MaxPool indices with asymmetric padding are not supported.")
                if storage_order == 1 and nd == 2:
                    h, w = x.shape[2], x.shape[3]
                    r, c = idx // w, idx % w
                    idx = c * h + r
                base = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(x.shape[0], x.shape[1],
                                                                                      *([1] * nd))
                spatial = 1
                for d in x.shape[2:]:
                    spatial *= d
                return (y, (idx + base * spatial).to(torch.int64))
            return (res,)
        return run_max

    if ptype == "average":
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
        if any(d != 1 for d in dil):
            return _avg_dilated(kernel, stride, dil, begins, ends, ceil, include_pad)

        def run_avg(x):
            xin = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            sym = begins == ends and all(begins[i] <= kernel[i] // 2 for i in range(nd))
            if sym:
                y = fn(xin, kernel, stride, begins, ceil, include_pad)
            else:
                y = _avg_general(xin, kernel, stride, begins, ends, ceil, include_pad, fn)
            return (y.to(x.dtype),)
        return run_avg

    if ptype == "lp":
        p = attrs.get("p", 2)

        def run_lp(x):
            # a sum over each (dilated) window of |x|^p: a depthwise convolution with ones
            outs = [_pool_out(x.shape[2 + i], kernel[i], stride[i], begins[i], ends[i], dil[i], ceil) for i in range(nd)]
            xp = F.pad(x.abs() ** p, _torch_pad(begins, ends))
            need = [(outs[i] - 1) * stride[i] + dil[i] * (kernel[i] - 1) + 1 for i in range(nd)]
            extra = [max(0, need[i] - xp.shape[2 + i]) for i in range(nd)]
            if any(extra):
                xp = F.pad(xp, _torch_pad([0] * nd, extra))
            c = x.shape[1]
            w = torch.ones([c, 1] + list(kernel), dtype=xp.dtype, device=x.device)
            y = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd](xp, w, None, stride, 0, dil, c)
            return (y ** (1.0 / p),)
        return run_lp
    raise BuildError(f"Unknown pooling type {ptype!r}; use max, average or lp.")


def _avg_general(x, kernel, stride, begins, ends, ceil, include_pad, fn):
    nd = len(kernel)
    xp = F.pad(x, _torch_pad(begins, ends))
    ones = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(begins, ends))
    outs = [_pool_out(x.shape[2 + i], kernel[i], stride[i], begins[i], ends[i], 1, ceil) for i in range(nd)]
    need = [(outs[i] - 1) * stride[i] + kernel[i] for i in range(nd)]
    extra = [max(0, need[i] - xp.shape[2 + i]) for i in range(nd)]
    if any(extra):
        xp = F.pad(xp, _torch_pad([0] * nd, extra))
        ones_ext = F.pad(ones, _torch_pad([0] * nd, extra))
    else:
        ones_ext = ones
    s = fn(xp, kernel, stride, 0, False, True)
    if include_pad:
        # padded positions count, positions beyond the padding (ceil overhang) do not
        valid = F.pad(torch.ones_like(ones), _torch_pad([0] * nd, extra)) if any(extra) else torch.ones_like(ones)
        cnt = fn(valid, kernel, stride, 0, False, True)
    else:
        cnt = fn(ones_ext, kernel, stride, 0, False, True)
    return s / cnt


def _avg_dilated(kernel, stride, dil, begins, ends, ceil, include_pad):
    nd = len(kernel)

    def run(x):
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        outs = [_pool_out(x.shape[2 + i], kernel[i], stride[i], begins[i], ends[i], dil[i], ceil) for i in range(nd)]
        need = [(outs[i] - 1) * stride[i] + dil[i] * (kernel[i] - 1) + 1 for i in range(nd)]
        xp = F.pad(xf, _torch_pad(begins, ends))
        extra = [max(0, need[i] - xp.shape[2 + i]) for i in range(nd)]
        xp = F.pad(xp, _torch_pad([0] * nd, extra))
        mask = F.pad(F.pad(torch.ones_like(xf[:1, :1]), _torch_pad(begins, ends), value=1.0 if include_pad else 0.0)
                     if include_pad else F.pad(torch.ones_like(xf[:1, :1]), _torch_pad(begins, ends)),
                     _torch_pad([0] * nd, extra))
        c = x.shape[1]
        w = torch.ones([c, 1] + list(kernel), dtype=xf.dtype, device=x.device)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        s = conv(xp, w, None, stride, 0, dil, c)
        cnt = conv(mask, w[:1], None, stride, 0, dil, 1)
        return ((s / cnt).to(x.dtype),)
    return run


MAX_PAD_PLANS = 16      # (input shape, pads, axes) geometries a Padding layer keeps; then it starts afresh


@tactic("Padding")
def make_padding(attrs, ctx):
    mode = attrs.get("mode", "constant")
    tmode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if tmode is None:
        raise BuildError(f"Unknown padding mode {mode!r}; use constant, reflect, edge or wrap.")
    static = tuple(attrs["pads"]) if attrs.get("pads") is not None else None
    plans: dict[tuple, tuple] = {}

    def plan(shape: tuple[int, ...], p: tuple[int, ...], axes_key: tuple[int, ...] | None) -> tuple:
        """(crop of the negative pads or None, begins, ends, first padded axis, F.pad's list) for one input shape,
        pads and axes."""
        r = len(shape)
        ax = [a + r if a < 0 else a for a in axes_key] if axes_key is not None else list(range(r))
        n = len(ax)
        begins = [0] * r
        ends = [0] * r
        for i, a in enumerate(ax):
            begins[a], ends[a] = p[i], p[i + n]
        # torch pads only trailing dims for non-constant modes; crop negatives ourselves
        crop = tuple(slice(max(0, -b), shape[i] - max(0, -e)) for i, (b, e) in enumerate(zip(begins, ends)))
        cropped = any(b < 0 or e < 0 for b, e in zip(begins, ends))
        begins = [max(0, b) for b in begins]
        ends = [max(0, e) for e in ends]
        first = next((i for i in range(r) if begins[i] or ends[i]), r)
        return crop if cropped else None, begins, ends, first, _torch_pad(begins, ends)

    def run(x, pads=None, value=None, axes=None):
        p = tuple(ints(pads)) if pads is not None else static
        axes_key = tuple(ints(axes)) if axes is not None else None
        key = (tuple(x.shape), p, axes_key)
        hit = plans.get(key)
        if hit is None:
            if len(plans) >= MAX_PAD_PLANS:
                plans.clear()
            hit = plans[key] = plan(key[0], p, axes_key)
        crop, begins, ends, first, torch_pads = hit
        val = attrs.get("value", 0.0)
        if value is not None and value.numel():
            val = (value if value.numel() == 1 else value.reshape(-1)[0]).item()
        if crop is not None:
            x = x[crop]
        r = len(begins)
        if first == r:
            return (x.clone() if not x.is_meta else x,)
        if tmode == "constant":
            return (F.pad(x, torch_pads, value=val),)
        if tmode == "circular":
            return (_wrap_pad(x, begins, ends),)
        # reflect/replicate: torch handles up to 3 trailing dims on batched input
        lead = first
        pads_t = _torch_pad(begins[lead:], ends[lead:])
        moved = x.reshape((1,) * max(0, 2 - lead) + tuple(x.shape)) if lead < 2 else x
        extra = max(0, 2 - lead)
        y = F.pad(moved, pads_t, mode=tmode)
        if extra:
            y = y.reshape(y.shape[extra:])
        return (y,)
    return run


def _wrap_pad(x, begins, ends):
    for d in range(x.dim()):
        b, e = begins[d], ends[d]
        if b or e:
            parts = []
            n = x.shape[d]
            if b:
                parts.append(x.narrow(d, n - b, b))
            parts.append(x)
            if e:
                parts.append(x.narrow(d, 0, e))
            x = torch.cat(parts, d)
    return x


@tactic("LRN")
def make_lrn(attrs, ctx):
    size, alpha, beta, bias = attrs["size"], attrs.get("alpha", 1e-4), attrs.get("beta", 0.75), attrs.get("bias", 1.0)

    def run(x):
        sq = (x.float() ** 2).unsqueeze(1)
        lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
        pad = [0, 0] * (x.dim() - 2) + [lo, hi]
        sq = F.pad(sq, pad)
        s = sq.unfold(2, size, 1).sum(-1).squeeze(1)
        return ((x.float() / (bias + alpha / size * s) ** beta).to(x.dtype),)
    return run


@tactic("MaxUnpool")
def make_max_unpool(attrs, ctx):
    kernel, stride = attrs["kernel"], attrs.get("stride") or [1] * len(attrs["kernel"])
    nd = len(kernel)
    pads = attrs.get("pads") or [0] * (2 * nd)

    def run(x, indices, output_shape=None):
        shape = list(x.shape[:2]) + [(x.shape[2 + i] - 1) * stride[i] + kernel[i] - pads[i] - pads[nd + i]
                                     for i in range(nd)]
        # MaxPool's indices are flat over the whole (N, C, spatial) tensor of the natural unpooled shape
        numel = 1
        for d in shape:
            numel *= d
        y = torch.zeros(numel, dtype=x.dtype, device=x.device)
        y[indices.reshape(-1).to(torch.int64)] = x.reshape(-1)
        y = y.reshape(shape)
        if output_shape is not None:      # a larger requested shape grows at the end of each spatial axis
            want = ints(output_shape)[-nd:]
            y = F.pad(y, _torch_pad([0] * nd, [want[i] - shape[2 + i] for i in range(nd)]))
        return (y,)
    return run
