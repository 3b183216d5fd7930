"""2-D convolution on the CPU through a oneDNN primitive made once per layer and input shape.

Tactic ``onednn_cached`` calls oneDNN's C API (``ctypes``) in a ``libdnnl`` of its own: the PyPI package
``onednn-cpu-gomp`` (``pip install kiln[cpu-onednn]``), or the library named by ``KILN_ONEDNN_LIBRARY``. torch's
mkldnn op builds the primitive descriptor, attributes, memory descriptors and scratchpad on every call; here they
are made on the first call for an input shape, with the weight reordered once into the layout the primitive
chose, and a call only points the source and destination memories at the tensors and executes. The layer runs
NHWC in and out (channels-last tensors), any groups (depthwise too); bias, the activation (relu, leaky_relu,
sigmoid, tanh, silu, hard_swish, hard_sigmoid, clip, gelu, gelu_tanh: an eltwise post-op whose alpha and beta are
the layer's, checked to be finite numbers) and a channels-last residual of the output's shape (a binary add
post-op, before or after the activation as the layer says) run as one primitive; a residual of another shape or
layout is added in place after it. Called with ``into=True`` (runtime/residual_in_place.py: the residual dies at
this layer), a channels-last residual that shares its memory with no other tensor is the destination itself,
added by a sum post-op (the output is that tensor). An NCHW input of fewer than FIRST_CONV_CHANNELS channels (an
image) is read as it is, its output reordered into NHWC. Without the library the tactic is not offered. It comes
first in the CPU's preference order (priority -1), so a build that finds it tied with ``torch`` (the same oneDNN
kernels behind torch's per-call setup and weight re-pack) keeps it, and so does a build that times nothing.
"""
from __future__ import annotations

import ctypes
import math
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kiln.errors import IncompatibleEngineError
from kiln.kernels.conv import match_weight
from kiln.kernels.cpu_conv import MAX_PACKED_SHAPES, activation_in_place, fp32_2d_cpu
from kiln.kernels.dnnl_api import (ALLOCATE, ANY, ARG_BIAS, ARG_DST, ARG_SCRATCHPAD, ARG_SRC, ARG_SRC_1,
                                   ARG_WEIGHTS, FORWARD_INFERENCE, LIBRARY_ENV, QUERY_SCRATCHPAD_MD,
                                   QUERY_WEIGHTS_MD, Dims, Dnnl, ExecArg, P, PrimitiveBase, _loaded, library)
from kiln.kernels.pointwise import act_params
from kiln.kernels.registry import KernelContext, tactic

__all__ = ["LIBRARY_ENV", "Primitive", "_loaded", "cached_ok", "eltwise_post_op", "library",
           "make_convolution_onednn_cached", "out_shape"]

CL = torch.channels_last

# oneDNN v3 C API values for convolutions (oneapi/dnnl/dnnl_types.h; the same in 3.2 and 3.12)
_A, _OIHW, _GOIHW, _NHWC, _CONVOLUTION_DIRECT = 2, 5, 6, 22, 1
_NCHW = _OIHW                                       # both abcd
_QUERY_IMPL_INFO_STR, _QUERY_DST_MD = 8, 133
# an NCHW input with fewer channels (an image) is read as it is, into the blocked output oneDNN picks for a first
# convolution, reordered into NHWC after: cheaper than making the input NHWC first
FIRST_CONV_CHANNELS = 8
_ARG_POST_OP_BASE, _BINARY_ADD = 32768, 131056     # a post-op's operand: BASE * (index + 1) | SRC_1
# activation -> (eltwise algorithm, alpha, beta), each oneDNN's formula for Kiln's (kernels/pointwise.py); None:
# the layer's alpha or beta (relu with alpha is leaky relu; hardsigmoid clamp(alpha·x + beta, 0, 1); clip
# min(max(x, alpha), beta))
_ELTWISE = {"relu": (32, 0.0, 0.0), "tanh": (33, 0.0, 0.0), "sigmoid": (41, 0.0, 0.0), "silu": (44, 1.0, 0.0),
            "hard_swish": (52, 1 / 6, 0.5), "gelu": (49, 0.0, 0.0), "gelu_tanh": (43, 0.0, 0.0),
            "leaky_relu": (32, None, 0.0), "hard_sigmoid": (40, None, None), "clip": (46, None, None)}


def eltwise_post_op(attrs: dict[str, Any]) -> tuple[int, float, float] | None:
    """The oneDNN eltwise post-op (algorithm, alpha, beta) computing the layer's activation; None where it has
    none or the layer's alpha/beta are not finite numbers (a clip also needs alpha <= beta)."""
    act = attrs.get("activation")
    if act not in _ELTWISE:
        return None
    alg, a, b = _ELTWISE[act]
    alpha, beta = act_params(attrs)
    try:
        a, b = (float(alpha) if a is None else a), (float(beta) if b is None else b)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(a) and math.isfinite(b)) or (act == "clip" and a > b):
        return None
    return alg, a, b


def out_shape(x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: list[int], dilation: list[int],
              pads: list[int]) -> tuple[int, int, int, int]:
    """[N, Cout, Ho, Wo] of a 2-D convolution with pads [top, left, bottom, right]."""
    n, _, h, wd = x_shape
    oc, _, kh, kw = w_shape
    return (n, oc, (h + pads[0] + pads[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1,
            (wd + pads[1] + pads[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1)


class Primitive(PrimitiveBase):
    """One convolution primitive for one input shape: weights reordered into its layout, its own bias and
    scratchpad; ``posts`` its post-ops in order: ("eltwise", alg, alpha, beta), ("add",), the residual added
    as a [N, Cout, Ho, Wo] NHWC operand, or ("sum",), what the destination holds before the call added. ``groups`` > 1 reads the [Cout, Cin/groups, kh, kw] weight as oneDNN's
    [groups, Cout/groups, Cin/groups, kh, kw] (the same memory). With ``nchw`` the source is read NCHW into the
    output layout the primitive picks, then reordered into the NHWC destination (eltwise post-ops only); a
    primitive that would be oneDNN's reference implementation there raises NotImplementedError.
    ``run(src, dst, residual)`` executes it."""

    def __init__(self, lib: Dnnl, x_shape: tuple[int, ...], w: torch.Tensor, b: torch.Tensor | None,
                 stride: list[int], dilation: list[int], pads: list[int], groups: int, posts: tuple[tuple, ...],
                 nchw: bool = False) -> None:
        super().__init__(lib)
        d = lib.lib
        n, c, h, wd = x_shape
        oc, icg, kh, kw = w.shape
        self.out_shape = (n, oc, ho, wo) = out_shape(x_shape, w.shape, stride, dilation, pads)
        src, dst = self._md([n, c, h, wd], _NCHW if nchw else _NHWC), self._md([n, oc, ho, wo], ANY if nchw else _NHWC)
        wdims, wtag = ([oc, icg, kh, kw], _OIHW) if groups == 1 else ([groups, oc // groups, icg, kh, kw], _GOIHW)
        wany, bias, wuser = self._md(wdims, ANY), self._md([oc], _A), self._md(wdims, wtag)
        attr, post = self._attr_user_scratchpad(), P()
        operands = []
        if posts:
            lib.check(d.dnnl_post_ops_create(ctypes.byref(post)), "post-ops")
            self.handles.append(("post_ops", post))
            for i, op in enumerate(posts):
                if op[0] == "sum":
                    lib.check(d.dnnl_post_ops_append_sum(post, ctypes.c_float(1.0), 0, 0), "sum post-op")
                elif op[0] == "add":
                    lib.check(d.dnnl_post_ops_append_binary(post, _BINARY_ADD, dst), "residual post-op")
                    operands.append(_ARG_POST_OP_BASE * (i + 1) | ARG_SRC_1)
                else:
                    lib.check(d.dnnl_post_ops_append_eltwise(post, op[1], ctypes.c_float(op[2]), ctypes.c_float(op[3])),
                              "eltwise post-op")
            lib.check(d.dnnl_primitive_attr_set_post_ops(attr, post), "post-ops")
        pd = P()
        lib.check(d.dnnl_convolution_forward_primitive_desc_create(
            ctypes.byref(pd), lib.engine, FORWARD_INFERENCE, _CONVOLUTION_DIRECT, src, wany, bias, dst,
            Dims(*stride), Dims(*(k - 1 for k in dilation)), Dims(pads[0], pads[1]), Dims(pads[2], pads[3]), attr),
            "convolution")
        self.handles.append(("primitive_desc", pd))
        if nchw:
            info = ctypes.c_char_p()
            d.dnnl_primitive_desc_query(pd, _QUERY_IMPL_INFO_STR, 0, ctypes.byref(info))
            if (info.value or b"ref").startswith(b"ref"):
                raise NotImplementedError("oneDNN has only its reference convolution for this NCHW input")
            dst = self._query(pd, _QUERY_DST_MD, 0)
        wmd, smd = self._query(pd, QUERY_WEIGHTS_MD, 0), self._query(pd, QUERY_SCRATCHPAD_MD, 0)
        self.prim = self._primitive(pd)
        self.src, self.dst = self._memory(src, None), self._memory(dst, ALLOCATE if nchw else None)
        self.reorder = None
        if nchw:                        # the primitive's own output, reordered into the caller's NHWC tensor
            user, rpd = self._md([n, oc, ho, wo], _NHWC), P()
            lib.check(d.dnnl_reorder_primitive_desc_create(ctypes.byref(rpd), dst, lib.engine, user, lib.engine, None),
                      "output reorder")
            self.handles.append(("primitive_desc", rpd))
            self.out = self._memory(user, None)
            self.reorder = (self._primitive(rpd), (ExecArg * 2)(ExecArg(ARG_SRC, self.dst), ExecArg(ARG_DST, self.out)))
        self.weights = self._reordered(w.detach().contiguous(), wuser, wmd)
        self.bias, self.scratch = self._memory(bias, ALLOCATE), self._memory(smd, ALLOCATE)
        bptr = P()
        d.dnnl_memory_get_data_handle(self.bias, ctypes.byref(bptr))
        bias_values = b.detach().float().contiguous() if b is not None else torch.zeros(oc)    # alive for the copy
        ctypes.memmove(bptr, bias_values.data_ptr(), 4 * oc)
        self.residual = self._memory(dst, None) if operands else None
        self.ptrs = [-1, -1, -1]        # the addresses src, dst (or out) and residual point at now
        n_, oc_, ho_, wo_ = self.out_shape
        self.out_strides = (oc_ * ho_ * wo_, 1, wo_ * oc_, oc_)     # NHWC
        self._bind([(ARG_SRC, self.src), (ARG_WEIGHTS, self.weights), (ARG_BIAS, self.bias), (ARG_DST, self.dst),
                    (ARG_SCRATCHPAD, self.scratch)] + [(a, self.residual) for a in operands])

    def run(self, x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor | None = None) -> None:
        # oneDNN's memories are pointed at an operand only where its address changed since the last call (the
        # allocator mostly hands a layer the same addresses run after run; each pointing is a ctypes call)
        ptrs = self.ptrs
        p = x.data_ptr()
        if p != ptrs[0]:
            self._set(self.src, p)
            ptrs[0] = p
        p = y.data_ptr()
        if p != ptrs[1]:
            self._set(self.dst if self.reorder is None else self.out, p)
            ptrs[1] = p
        if self.reorder is not None:
            stream = self.lib.stream(self.threads)
            self._exec(self.prim, stream, self.nargs, self.args)
            self._exec(self.reorder[0], stream, 2, self.reorder[1])
            self._wait(stream)
            return
        if self.residual is not None:
            p = residual.data_ptr()
            if p != ptrs[2]:
                self._set(self.residual, p)
                ptrs[2] = p
        # libdnnl's OpenMP runtime (dnnl_api checks it at load) runs a primitive to completion within the execute
        # call, so there is nothing for a stream wait to wait for
        self._exec(self.prim, self.lib.stream(self.threads), self.nargs, self.args)


def _storage_users() -> Callable[[torch.Tensor], int] | None:
    """tensor -> how many tensors share its memory, counted so that 1 is the tensor alone; None where this torch
    has no such count or it does not tell a tensor from one with a view alive (checked here, once)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    try:
        with torch.inference_mode():
            t = torch.empty(4)
            alone = count(t.untyped_storage()._cdata)
            view = t[1:]
            shared = count(t.untyped_storage()._cdata)
            del view
            if shared != alone + 1 or count(t.untyped_storage()._cdata) != alone:
                return None
    except (AttributeError, RuntimeError, TypeError):
        return None
    return lambda x: count(x.untyped_storage()._cdata) - alone + 1


_USERS = _storage_users()


def sole_owner(x: torch.Tensor) -> bool:
    """Whether no other tensor (a view, a reshape) shares ``x``'s memory; False where that cannot be told."""
    return _USERS is not None and _USERS(x) == 1


def cached_ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    """Whether ``onednn_cached`` runs this convolution here: 2-D FP32 on the CPU, no fused pool, an activation
    with an exact eltwise post-op (or none), and the library loaded."""
    return (fp32_2d_cpu(attrs, ctx) and not attrs.get("pool")
            and (not attrs.get("activation") or eltwise_post_op(attrs) is not None) and library() is not None)


@tactic("Convolution", "onednn_cached", devices=("cpu",), supports=cached_ok, priority=-1)
def make_convolution_onednn_cached(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    """conv + bias (+ residual) + activation as one oneDNN primitive made once per input shape, NHWC in and out."""
    lib = library()
    if lib is None:
        raise IncompatibleEngineError(
            f"Layer {ctx.layer_name[:60]!r} runs tactic onednn_cached, which needs oneDNN's library: pip install "
            f"'kiln[cpu-onednn]' (or set {LIBRARY_ENV}), or rebuild the engine here with kiln build.")
    stride, dil, pads = list(attrs["stride"]), list(attrs["dilation"]), list(attrs["pads"])
    groups = int(attrs.get("groups", 1))
    after = bool(attrs.get("residual_after_activation"))
    act_op = (("eltwise", *eltwise_post_op(attrs)),) if attrs.get("activation") else ()
    # post-ops per mode: "act" the activation; "add" the residual too, in the layer's order; "none" nothing
    # "sum": the residual is the destination, added by a sum post-op in the layer's order
    modes = {"act": act_op, "add": act_op + (("add",),) if after else (("add",),) + act_op, "none": (),
             "nchw": act_op, "sum": act_op + (("sum",),) if after else (("sum",),) + act_op}
    act = activation_in_place(attrs)
    kept: dict[str, Any] = {"w": None, "b": None}
    prims: OrderedDict[tuple, Primitive] = OrderedDict()
    # (shape, strides) of FP32 inputs (channels-last, or an NCHW image) already checked against the kept weights ->
    # the primitive that reads them as they are: a call without a residual on such an input goes straight to it
    checked: dict[tuple, Primitive] = {}
    reference_only: set[tuple] = set()      # NCHW input shapes oneDNN has no fast kernel for
    no_sum: set[tuple] = set()              # input shapes whose primitive oneDNN would not make with a sum post-op

    def primitive(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, mode: str) -> Primitive | None:
        if kept["w"] is not w or kept["b"] is not b:
            kept["w"], kept["b"] = w, b
            prims.clear()
            checked.clear()
        key = (tuple(x.shape), mode)
        hit = prims.get(key)
        if hit is None:
            try:
                hit = Primitive(lib, key[0], w, b, stride, dil, pads, groups, modes[mode], nchw=mode == "nchw")
            except NotImplementedError:
                reference_only.add(key[0])
                return None
            except RuntimeError:
                if mode != "sum":
                    raise
                no_sum.add(key[0])
                return None
            prims[key] = hit
            if len(prims) > MAX_PACKED_SHAPES:
                prims.popitem(last=False)
                checked.clear()
        return hit

    def run(x, w, b=None, residual=None, into=False):
        if residual is None and w is kept["w"] and b is kept["b"] and x.dtype == torch.float32 and not x.is_meta:
            p = checked.get((x.shape, x.stride()))
            if p is not None:
                y = torch.empty_strided(p.out_shape, p.out_strides, dtype=torch.float32)     # NHWC
                p.run(x, y)
                return (y,)
        x = match_weight(x, w)
        # the primitive reads x's channel count of weights (per group) and oc biases: operands that disagree (a
        # damaged engine) take torch's path, whose check names the mismatch, and never reach oneDNN
        if x.is_meta or x.dim() != 4 or x.dtype != torch.float32 or w.dtype != torch.float32 or x.numel() == 0 \
                or w.dim() != 4 or x.shape[1] != w.shape[1] * groups or w.shape[0] % groups \
                or (b is not None and b.numel() != w.shape[0]):
            y = F.conv2d(F.pad(x, [pads[1], pads[3], pads[0], pads[2]]), w, b, stride, 0, dil, groups)
            if residual is not None and not after:
                y = y + residual
            y = act(y) if act is not None else y
            return (y + residual if residual is not None and after else y,)
        if residual is None and x.shape[1] < FIRST_CONV_CHANNELS and x.is_contiguous() \
                and not x.is_contiguous(memory_format=CL) and tuple(x.shape) not in reference_only:
            p = primitive(x, w, b, "nchw")
            if p is not None:
                checked[(x.shape, x.stride())] = p
                y = torch.empty(p.out_shape, dtype=torch.float32, memory_format=CL)
                p.run(x, y)
                return (y,)
        as_is = x.is_contiguous(memory_format=CL)
        x = x.contiguous(memory_format=CL)
        if into and residual is not None and residual.dtype == torch.float32 and residual.dim() == 4 \
                and residual.is_contiguous(memory_format=CL) and tuple(x.shape) not in no_sum \
                and tuple(residual.shape) == out_shape(x.shape, w.shape, stride, dil, pads) and sole_owner(residual):
            p = primitive(x, w, b, "sum")
            if p is not None:
                p.run(x, residual)
                return (residual,)
        if residual is None:
            mode = "act"
        elif (residual.dtype == torch.float32 and residual.dim() == 4 and residual.is_contiguous(memory_format=CL)
              and tuple(residual.shape) == out_shape(x.shape, w.shape, stride, dil, pads)):
            mode = "add"            # other layouts (a Split's channel slice) are added in place: no copy first
        else:
            mode = "act" if after else "none"
        p = primitive(x, w, b, mode)
        if residual is None and as_is:
            checked[(x.shape, x.stride())] = p
        y = torch.empty(p.out_shape, dtype=torch.float32, memory_format=torch.channels_last)
        p.run(x, y, residual)
        if mode == "none":
            y = y.add_(residual)
            if act is not None:
                y = act(y)
        elif mode == "act" and residual is not None:
            y = y.add_(residual)
        return (y,)
    run.sums_into_residual = True       # type: ignore[attr-defined]
    return run
