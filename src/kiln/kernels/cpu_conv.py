"""Convolution on the CPU through oneDNN, with the layer's epilogue fused as post-ops.

Tactic ``onednn`` runs a 2-D FP32 Convolution layer as one call of torch's mkldnn pointwise-fused
convolution (``torch.ops.mkldnn._convolution_pointwise``): bias, the activation where oneDNN has it
as an eltwise post-op, and the residual add as a binary post-op (followed by ReLU where the
layer's epilogue is ``relu(conv + r)``). The weight is reordered once into oneDNN's blocked
layout for the input shape it meets (a few shapes are kept per layer) and activations run
channels-last, so consecutive convolutions pass NHWC tensors without reorders.

Epilogue parts oneDNN cannot fuse (other activations, an activation after a residual add other
than ReLU, a residual added after the activation) run as in-place torch ops on the fresh output.
Where torch lacks the ops (a build without mkldnn) the tactic is not offered and the ``torch``
tactic runs the layer; where ``onednn_cached`` (kernels/cpu_dnnl.py) runs the layer it is not offered either.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kiln.kernels.conv import match_weight, pool_after
from kiln.kernels.pointwise import act_params, activation_fn, gelu_tanh
from kiln.kernels.registry import KernelContext, tactic

# Packed weights kept per layer, one per input shape met (dynamic shapes): the oldest goes first.
MAX_PACKED_SHAPES = 4


def onednn_available() -> bool:
    """Whether this torch has oneDNN and the fused convolution and weight-reorder ops."""
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_convolution_pointwise") and hasattr(ops, "_reorder_convolution_weight")


def unary_post_op(attrs: dict[str, Any]) -> tuple[str, list, str | None] | None:
    """The oneDNN eltwise post-op (attr, scalars, algorithm) for the layer's activation; ("none", ...)
    for no activation; None when oneDNN has no exact equivalent."""
    act = attrs.get("activation")
    alpha, beta = act_params(attrs)
    if act is None:
        return "none", [], None
    simple = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "silu": "swish", "hard_swish": "hardswish"}
    if act in simple:
        return simple[act], [], None
    if act == "leaky_relu":
        return "leaky_relu", [float(alpha)], None
    if act == "clip":
        lo = float("-inf") if alpha is None else float(alpha)
        hi = float("inf") if beta is None else float(beta)
        return "hardtanh", [lo, hi], None
    if act == "gelu":
        return "gelu", [], "none"
    if act == "gelu_tanh":
        return "gelu", [], "tanh"
    if act == "hard_sigmoid" and alpha is not None and abs(float(alpha) - 1 / 6) < 1e-7 and beta == 0.5:
        return "hardsigmoid", [], None
    return None


def fp32_cpu(ctx: KernelContext) -> bool:
    """An FP32 layer on the CPU whose first input is FP32 (or of unknown dtype): what every CPU GEMM tactic needs."""
    fp32_in = not ctx.input_dtypes or ctx.input_dtypes[0] in (None, "float32")
    return ctx.device == "cpu" and ctx.precision.split()[0] == "fp32" and fp32_in


def fp32_2d_cpu(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    """A 2-D convolution of FP32 input on the CPU in an FP32 layer: what every oneDNN tactic needs first."""
    return fp32_cpu(ctx) and len(attrs["stride"]) == 2


def _onednn_ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    """Offered where ``onednn_cached`` (kernels/cpu_dnnl.py) does not run the layer: that tactic runs the same
    oneDNN convolutions without torch's per-call setup, so timing both only lets load noise pick the slower."""
    from kiln.kernels import cpu_dnnl       # imports this module
    return fp32_2d_cpu(attrs, ctx) and onednn_available() and not cpu_dnnl.cached_ok(attrs, ctx)


def _out_hw(x: torch.Tensor, w: torch.Tensor, pads: list[int], stride: list[int], dil: list[int]) -> tuple[int, int]:
    return tuple((x.shape[2 + i] + 2 * pads[i] - dil[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1
                 for i in range(2))  # type: ignore[return-value]


class PackedWeight:
    """A layer's weight in oneDNN's blocked layout, ``pack(w, input_shape)``, one copy per input shape
    (at most MAX_PACKED_SHAPES); a different weight tensor (a weight computed at run time) starts afresh."""

    def __init__(self, pack: Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]) -> None:
        self.pack = pack
        self.weight: torch.Tensor | None = None
        self.packed: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()

    def get(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if w is not self.weight:
            self.weight, self.packed = w, OrderedDict()
        shape = tuple(x.shape)
        hit = self.packed.get(shape)
        if hit is None:
            hit = self.packed[shape] = self.pack(w.contiguous(), shape)
            if len(self.packed) > MAX_PACKED_SHAPES:
                self.packed.popitem(last=False)
        else:
            self.packed.move_to_end(shape)
        return hit


_IN_PLACE = {"relu": torch.relu_, "sigmoid": torch.sigmoid_, "tanh": torch.tanh_,
             "silu": lambda y: F.silu(y, inplace=True), "hard_swish": lambda y: F.hardswish(y, inplace=True),
             "gelu": lambda y: torch.ops.aten.gelu_(y), "gelu_tanh": lambda y: gelu_tanh(y, inplace=True)}


def activation_in_place(attrs: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The layer's activation for a fresh output tensor: in place where torch has it so; None without one."""
    act = attrs.get("activation")
    if not act:
        return None
    return _IN_PLACE.get(act) or activation_fn(act, *act_params(attrs))


@tactic("Convolution", "onednn", devices=("cpu",), supports=_onednn_ok, priority=1)
def make_convolution_onednn(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    """conv + bias (+ residual) + activation as one oneDNN primitive on prepacked weights, NHWC."""
    stride, dil, groups = list(attrs["stride"]), list(attrs["dilation"]), attrs.get("groups", 1)
    begins, ends = list(attrs["pads"][:2]), list(attrs["pads"][2:4])
    symmetric = begins == ends
    pads = begins if symmetric else [0, 0]
    pre_pad = [begins[1], ends[1], begins[0], ends[0]]
    after = bool(attrs.get("residual_after_activation"))
    unary = unary_post_op(attrs)
    act = activation_in_place(attrs)
    packs = PackedWeight(lambda w, shape: torch.ops.mkldnn._reorder_convolution_weight(
        w, pads, stride, dil, groups, list(shape)))
    # the resolved overloads: calling the packet matches each call's arguments against its schemas in turn
    conv, conv_add = torch.ops.mkldnn._convolution_pointwise.default, torch.ops.mkldnn._convolution_pointwise.binary

    def reference(x, w, b, residual):
        y = F.conv2d(x if symmetric else F.pad(x, pre_pad), w, b, stride, pads, dil, groups)
        if residual is not None and not after:
            y = y + residual
        y = act(y) if act is not None else y
        return y + residual if residual is not None and after else y

    def run(x, w, b=None, residual=None):
        x = match_weight(x, w)
        if x.is_meta:
            return (pool_after(reference(x, w, b, residual), attrs),)
        x = x.contiguous(memory_format=torch.channels_last)
        if not symmetric:
            x = F.pad(x, pre_pad).contiguous(memory_format=torch.channels_last)
        wp = packs.get(w, x)
        fuse_add = (residual is not None and not after and residual.dim() == 4
                    and tuple(residual.shape) == (x.shape[0], w.shape[0], *_out_hw(x, w, pads, stride, dil)))
        if fuse_add:
            relu = attrs.get("activation") == "relu"
            y = conv_add(x, residual, wp, b, pads, stride, dil, groups, "add", 1.0, "relu" if relu else None, [], None)
            if act is not None and not relu:
                y = act(y)
        elif residual is not None and not after:
            y = conv(x, wp, b, pads, stride, dil, groups, "none", [], None).add_(residual)
            y = act(y) if act is not None else y
        elif unary is not None:
            y = conv(x, wp, b, pads, stride, dil, groups, *unary)
        else:
            y = act(conv(x, wp, b, pads, stride, dil, groups, "none", [], None))
        if residual is not None and after:
            y = y.add_(residual)
        return (pool_after(y, attrs),)
    return run


# Largest im2col matrix made at once; bigger convolutions are done in slices of output rows.
IM2COL_BYTES = 64 << 20


def _gemm_ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    return fp32_2d_cpu(attrs, ctx) and attrs.get("groups", 1) == 1


@tactic("Convolution", "gemm", devices=("cpu",), supports=_gemm_ok, priority=2)
def make_convolution_gemm_cpu(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    """conv as one GEMM on channels-last memory: [N·Ho·Wo, kh·kw·Cin] patches (the input itself for
    a 1x1 stride-1 convolution) times the weight prepared once as [kh·kw·Cin, Cout], bias in the
    GEMM, the rest of the epilogue in place on its output (NHWC)."""
    stride, dil = list(attrs["stride"]), list(attrs["dilation"])
    begins, ends = list(attrs["pads"][:2]), list(attrs["pads"][2:4])
    nhwc_pad = [0, 0, begins[1], ends[1], begins[0], ends[0]]
    after = bool(attrs.get("residual_after_activation"))
    act = activation_in_place(attrs)
    cache: dict[str, Any] = {"w": None}

    def weight(w: torch.Tensor) -> torch.Tensor:
        if cache["w"] is not w:
            cache["w"], cache["wt"] = w, w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).t().contiguous()
        return cache["wt"]

    def run(x, w, b=None, residual=None):
        x = match_weight(x, w)
        cout, cin, kh, kw = w.shape
        if x.is_meta:
            y = F.conv2d(F.pad(x, nhwc_pad[2:]), w, b, stride, 0, dil)
        else:
            xh = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
            if any(nhwc_pad):
                xh = F.pad(xh, nhwc_pad)
            n, h, wd, c = xh.shape
            ho = (h - dil[0] * (kh - 1) - 1) // stride[0] + 1
            wo = (wd - dil[1] * (kw - 1) - 1) // stride[1] + 1
            patches = xh.as_strided((n, ho, wo, kh, kw, c), (h * wd * c, stride[0] * wd * c, stride[1] * c,
                                                            dil[0] * wd * c, dil[1] * c, 1))
            out = torch.empty((n, ho, wo, cout), dtype=x.dtype)
            _gemm(patches, weight(w), b, out)
            y = out.permute(0, 3, 1, 2)
        if residual is not None and not after:
            y = y.add_(residual)
        y = act(y) if act is not None else y
        if residual is not None and after:
            y = y.add_(residual)
        return (pool_after(y, attrs),)
    return run


def _gemm(patches: torch.Tensor, wt: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> None:
    """out[n, i, j, :] = patches[n, i, j].flatten() @ wt + b, in slices of at most IM2COL_BYTES of patches."""
    n, ho, wo = patches.shape[:3]
    k = wt.shape[0]
    row_bytes = wo * k * patches.element_size()
    rows = max(1, IM2COL_BYTES // max(1, row_bytes))
    if rows >= n * ho:
        spans = [(slice(None), slice(None))]
    else:
        spans = [(i, slice(r, min(ho, r + rows))) for i in range(n) for r in range(0, ho, rows)]
    for ni, hi in spans:
        cols = patches[ni, hi].reshape(-1, k)
        dest = out[ni, hi].view(-1, out.shape[-1])
        if b is None:
            torch.mm(cols, wt, out=dest)
        else:
            torch.addmm(b, cols, wt, out=dest)


def _gemm1d_ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    return (fp32_cpu(ctx) and len(attrs["stride"]) == 1 and attrs.get("groups", 1) == 1
            and not attrs.get("pool"))


@tactic("Convolution", "gemm1d", devices=("cpu",), supports=_gemm1d_ok, priority=2)
def make_convolution_gemm1d_cpu(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    """1-D conv as one GEMM: the input's [N·Lo, k·Cin] patches copied into a buffer kept per input shape
    (which ends in a column of ones where there is a bias), times the weight laid out once as [k·Cin (+1),
    Cout] (the bias as its last row), the epilogue in place on the [N·Lo, Cout] product, returned as its
    [N, Cout, Lo] view (channels-last memory, which the next 1-D GEMM reads in runs of Cin). A padded
    convolution copies its input into the middle of a zero-bordered buffer kept per shape. A call without a
    residual at an input (shape, strides) already run with the kept weight and bias finds those buffers and the
    weight in one lookup. Small audio
    convolutions (a few output positions) skip oneDNN's per-call setup this way and run four torch ops;
    the builder times it against the others."""
    stride, dil = attrs["stride"][0], attrs["dilation"][0]
    pads = (attrs["pads"][0], attrs["pads"][1])
    after = bool(attrs.get("residual_after_activation"))
    act = activation_in_place(attrs)
    weights: dict[str, Any] = {"w": None, "b": None}
    buffers: OrderedDict[tuple, tuple] = OrderedDict()      # per input shape: (padded input, patch matrix)
    # (shape, strides) of an input already run with the kept weight and bias -> what a call without a residual
    # needs: (padded buffer's middle or None, its patches or None, where patches go, patch matrix, weight,
    # the patches' size and strides on x, the output's size and strides); emptied with the weight or the buffers
    known: dict[tuple, tuple] = {}

    def weight(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if weights["w"] is not w or weights["b"] is not b:
            wt = w.permute(2, 1, 0).reshape(-1, w.shape[0])                       # [k·Cin, Cout]
            weights["wt"] = (wt if b is None else torch.cat([wt, b.reshape(1, -1).to(wt.dtype)])).contiguous()
            weights["w"], weights["b"] = w, b
            known.clear()
        return weights["wt"]

    def scratch(x: torch.Tensor, k: int, lo: int, bias: bool) -> tuple:
        """(the padded buffer's middle or None, its patches or None, the patch matrix, where patches go in it)"""
        key = (tuple(x.shape), x.dtype, k, lo, bias)
        hit = buffers.get(key)
        if hit is None:
            n, c, length = x.shape
            cols = x.new_empty(n * lo, k * c + bias)
            if bias:
                cols[:, -1] = 1
            middle = patches = None
            if any(pads):
                xp = x.new_zeros(n, length + pads[0] + pads[1], c)                 # N, L, C: zero borders
                middle = xp[:, pads[0]:pads[0] + length].transpose(1, 2)           # N, C, L view
                patches = xp.as_strided((n, lo, k, c), (xp.stride(0), stride * c, dil * c, 1))
            hit = buffers[key] = (middle, patches, cols, cols[:, :k * c].view(n, lo, k, c))
            if len(buffers) > MAX_PACKED_SHAPES:
                buffers.popitem(last=False)
                known.clear()
        return hit

    def run(x, w, b=None, residual=None):
        if residual is None and w is weights["w"] and b is weights["b"] and x.dtype == w.dtype and not x.is_meta:
            hit = known.get((x.shape, x.stride()))
            if hit is not None:         # the same steps as below, their operands looked up once
                middle, patches, into, cols, wt, geometry, out = hit
                if middle is not None:
                    middle.copy_(x)
                    into.copy_(patches)
                else:
                    into.copy_(x.as_strided(*geometry, x.storage_offset()))
                y = torch.mm(cols, wt)
                if act is not None:
                    y = act(y)
                return (y.as_strided(*out),)
        x = match_weight(x, w)
        cout, cin, k = w.shape
        if x.is_meta:
            return (F.conv1d(F.pad(x, pads), w, b, stride, 0, dil),)
        n, _, length = x.shape
        lo = (length + pads[0] + pads[1] - dil * (k - 1) - 1) // stride + 1
        middle, patches, cols, into = scratch(x, k, lo, b is not None)
        geometry = None
        if middle is not None:
            middle.copy_(x)
        else:
            sn, sc, sl = x.stride()
            geometry = ((n, lo, k, cin), (sn, stride * sl, dil * sl, sc))
            patches = x.as_strided(*geometry, x.storage_offset())
        into.copy_(patches)
        wt = weight(w, b)
        y = torch.mm(cols, wt)                                                        # [N·Lo, Cout]
        if residual is None:
            out = ((n, cout, lo), (lo * cout, 1, cout))
            if x.dtype == w.dtype:
                if len(known) >= 2 * MAX_PACKED_SHAPES:
                    known.clear()
                known[(x.shape, x.stride())] = (middle, None if middle is None else patches, into, cols, wt,
                                                geometry, out)
            if act is not None:
                y = act(y)
            return (y.as_strided(*out),)
        y3, r = y.view(n, lo, cout), residual.transpose(1, 2)
        if not after:
            y3.add_(r)
        if act is not None:
            y3 = act(y3)
        if after:
            y3 = y3.add_(r)
        return (y3.transpose(1, 2),)
    return run
