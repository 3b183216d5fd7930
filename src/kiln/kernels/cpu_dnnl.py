"""2-D convolution on the CPU through a oneDNN primitive made once per layer and input shape.

Tactic ``onednn_cached`` calls oneDNN's C API (``ctypes``) in a ``libdnnl`` of its own: the PyPI package
``onednn-cpu-gomp`` (``pip install kiln[cpu-onednn]``), or the library named by ``KILN_ONEDNN_LIBRARY``. torch's
mkldnn op builds the primitive descriptor, attributes, memory descriptors and scratchpad on every call; here they
are made on the first call for an input shape, with the weight reordered once into the layout the primitive
chose, and a call only points the source and destination memories at the tensors and executes. The layer runs
NHWC in and out (channels-last tensors); bias, the activation (relu, sigmoid, tanh, silu, hard_swish: an eltwise
post-op) and a channels-last residual of the output's shape (a binary add post-op, before or after the activation
as the layer says) run as one primitive; a residual of another shape or layout is added in place after it.
Without the library the tactic is not offered.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kiln.errors import IncompatibleEngineError
from kiln.kernels.conv import match_weight
from kiln.kernels.cpu_conv import MAX_PACKED_SHAPES, activation_in_place, fp32_2d_cpu
from kiln.kernels.registry import KernelContext, tactic

LIBRARY_ENV = "KILN_ONEDNN_LIBRARY"
CL = torch.channels_last

# oneDNN v3 C API values (oneapi/dnnl/dnnl_types.h; the same in 3.2 and 3.12)
_CPU, _STREAM_DEFAULT, _F32, _ANY, _A, _OIHW, _NHWC = 1, 1, 3, 1, 2, 5, 22
_FORWARD_INFERENCE, _CONVOLUTION_DIRECT, _SCRATCHPAD_USER = 96, 1, 1
_QUERY_WEIGHTS_MD, _QUERY_SCRATCHPAD_MD = 131, 136
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS, _ARG_BIAS, _ARG_SCRATCHPAD = 1, 17, 33, 41, 80
_ARG_SRC_1, _ARG_POST_OP_BASE, _BINARY_ADD = 2, 32768, 131056     # a post-op's operand: BASE * (index + 1) | SRC_1
_ALLOCATE = ctypes.c_void_p(-1 & (2 ** 64 - 1))
# activation -> (eltwise algorithm, alpha, beta)
_ELTWISE = {"relu": (32, 0.0, 0.0), "tanh": (33, 0.0, 0.0), "sigmoid": (41, 0.0, 0.0), "silu": (44, 1.0, 0.0),
            "hard_swish": (52, 1 / 6, 0.5)}
_RUNTIME_OMP = 2

_Dims = ctypes.c_int64 * 12
_P = ctypes.c_void_p


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", _P)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int), ("hash", ctypes.c_char_p),
                ("cpu_runtime", ctypes.c_uint), ("gpu_runtime", ctypes.c_uint)]


class _Dnnl:
    """The loaded library and its CPU engine; an in-order stream per calling thread, whose OpenMP thread count
    follows torch's."""

    def __init__(self, path: str) -> None:
        lib = self.lib = ctypes.CDLL(path)
        lib.dnnl_version.restype = ctypes.POINTER(_Version)
        v = lib.dnnl_version().contents
        if v.major != 3 or v.cpu_runtime != _RUNTIME_OMP:
            raise OSError(f"{path} is oneDNN {v.major}.{v.minor} (CPU runtime {v.cpu_runtime}); the onednn_cached "
                          f"tactic needs oneDNN 3 on OpenMP")
        for name in ("dnnl_primitive_desc_query_md",):
            getattr(lib, name).restype = _P
        lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        lib.dnnl_memory_desc_get_size.argtypes = [_P]
        lib.dnnl_memory_set_data_handle.argtypes = [_P, _P]
        lib.dnnl_primitive_execute.argtypes = [_P, _P, ctypes.c_int, _P]
        lib.dnnl_stream_wait.argtypes = [_P]
        self.engine = _P()
        self.check(lib.dnnl_engine_create(ctypes.byref(self.engine), _CPU, ctypes.c_size_t(0)), "engine")
        self.set_threads = lib.omp_set_num_threads       # the OpenMP runtime libdnnl itself links
        self.local = threading.local()

    @staticmethod
    def check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"oneDNN could not create the {what} (status {status})")

    def stream(self) -> _P:
        """This thread's stream, its OpenMP thread count set to torch's."""
        local = self.local
        s = getattr(local, "stream", None)
        if s is None:
            s = local.stream = _P()
            self.check(self.lib.dnnl_stream_create(ctypes.byref(s), self.engine, _STREAM_DEFAULT), "stream")
            local.threads = None
        n = torch.get_num_threads()
        if local.threads != n:
            self.set_threads(n)
            local.threads = n
        return s


_loaded: dict[str, Any] = {}


def library() -> _Dnnl | None:
    """The oneDNN library this tactic runs on (loaded once); None where there is none."""
    if "lib" not in _loaded:
        path = os.environ.get(LIBRARY_ENV) or os.path.join(sys.prefix, "lib", "libdnnl.so.3")
        try:
            _loaded["lib"] = _Dnnl(path) if os.path.isfile(path) else None
        except (OSError, AttributeError, RuntimeError):
            _loaded["lib"] = None
    return _loaded["lib"]


def _md(lib: _Dnnl, dims: list[int], tag: int) -> _P:
    md = _P()
    lib.check(lib.lib.dnnl_memory_desc_create_with_tag(ctypes.byref(md), len(dims), _Dims(*dims), _F32, tag),
              "memory descriptor")
    return md


def out_shape(x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: list[int], dilation: list[int],
              pads: list[int]) -> tuple[int, int, int, int]:
    """[N, Cout, Ho, Wo] of a 2-D convolution with pads [top, left, bottom, right]."""
    n, _, h, wd = x_shape
    oc, _, kh, kw = w_shape
    return (n, oc, (h + pads[0] + pads[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1,
            (wd + pads[1] + pads[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1)


class Primitive:
    """One convolution primitive for one input shape: weights reordered into its layout, its own bias and
    scratchpad; ``posts`` its post-ops in order: ("eltwise", alg, alpha, beta) or ("add",), the residual added
    as a [N, Cout, Ho, Wo] NHWC operand. ``run(src, dst, residual)`` executes it on NHWC buffers."""

    def __init__(self, lib: _Dnnl, x_shape: tuple[int, ...], w: torch.Tensor, b: torch.Tensor | None,
                 stride: list[int], dilation: list[int], pads: list[int], posts: tuple[tuple, ...]) -> None:
        self.lib, d = lib, lib.lib
        n, c, h, wd = x_shape
        oc, _, kh, kw = w.shape
        self.out_shape = (n, oc, ho, wo) = out_shape(x_shape, w.shape, stride, dilation, pads)
        self.handles: list[tuple[str, _P]] = []
        src, dst = _md(lib, [n, c, h, wd], _NHWC), _md(lib, [n, oc, ho, wo], _NHWC)
        wany, bias, wuser = _md(lib, [oc, c, kh, kw], _ANY), _md(lib, [oc], _A), _md(lib, [oc, c, kh, kw], _OIHW)
        self.handles += [("memory_desc", m) for m in (src, dst, wany, bias, wuser)]
        attr, post = _P(), _P()
        lib.check(d.dnnl_primitive_attr_create(ctypes.byref(attr)), "attributes")
        self.handles.append(("primitive_attr", attr))
        lib.check(d.dnnl_primitive_attr_set_scratchpad_mode(attr, _SCRATCHPAD_USER), "scratchpad mode")
        operands = []
        if posts:
            lib.check(d.dnnl_post_ops_create(ctypes.byref(post)), "post-ops")
            self.handles.append(("post_ops", post))
            for i, op in enumerate(posts):
                if op[0] == "add":
                    lib.check(d.dnnl_post_ops_append_binary(post, _BINARY_ADD, dst), "residual post-op")
                    operands.append(_ARG_POST_OP_BASE * (i + 1) | _ARG_SRC_1)
                else:
                    lib.check(d.dnnl_post_ops_append_eltwise(post, op[1], ctypes.c_float(op[2]), ctypes.c_float(op[3])),
                              "eltwise post-op")
            lib.check(d.dnnl_primitive_attr_set_post_ops(attr, post), "post-ops")
        pd = _P()
        lib.check(d.dnnl_convolution_forward_primitive_desc_create(
            ctypes.byref(pd), lib.engine, _FORWARD_INFERENCE, _CONVOLUTION_DIRECT, src, wany, bias, dst,
            _Dims(*stride), _Dims(*(k - 1 for k in dilation)), _Dims(pads[0], pads[1]), _Dims(pads[2], pads[3]), attr),
            "convolution")
        self.handles.append(("primitive_desc", pd))
        wmd = _P(d.dnnl_primitive_desc_query_md(pd, _QUERY_WEIGHTS_MD, 0))
        smd = _P(d.dnnl_primitive_desc_query_md(pd, _QUERY_SCRATCHPAD_MD, 0))
        self.prim = self._primitive(pd)
        self.src, self.dst = self._memory(src, None), self._memory(dst, None)
        self.weights, self.bias, self.scratch = self._memory(wmd, _ALLOCATE), self._memory(bias, _ALLOCATE), \
            self._memory(smd, _ALLOCATE)
        wc = w.detach().contiguous()
        self._reorder(self._memory(wuser, ctypes.c_void_p(wc.data_ptr())), wuser, self.weights, wmd)
        bptr = _P()
        d.dnnl_memory_get_data_handle(self.bias, ctypes.byref(bptr))
        bias_values = b.detach().float().contiguous() if b is not None else torch.zeros(oc)    # alive for the copy
        ctypes.memmove(bptr, bias_values.data_ptr(), 4 * oc)
        self.residual = self._memory(dst, None) if operands else None
        bound = [(_ARG_SRC, self.src), (_ARG_WEIGHTS, self.weights), (_ARG_BIAS, self.bias), (_ARG_DST, self.dst),
                 (_ARG_SCRATCHPAD, self.scratch)] + [(a, self.residual) for a in operands]
        self.nargs = len(bound)
        self.args = (_ExecArg * self.nargs)(*(_ExecArg(a, m) for a, m in bound))
        self._set, self._exec, self._wait = d.dnnl_memory_set_data_handle, d.dnnl_primitive_execute, d.dnnl_stream_wait

    def _primitive(self, pd: _P) -> _P:
        prim = _P()
        self.lib.check(self.lib.lib.dnnl_primitive_create(ctypes.byref(prim), pd), "primitive")
        self.handles.append(("primitive", prim))
        return prim

    def _memory(self, md: _P, handle) -> _P:
        mem = _P()
        self.lib.check(self.lib.lib.dnnl_memory_create(ctypes.byref(mem), md, self.lib.engine, handle), "memory")
        self.handles.append(("memory", mem))
        return mem

    def _reorder(self, src: _P, src_md: _P, dst: _P, dst_md: _P) -> None:
        d, pd = self.lib.lib, _P()
        self.lib.check(d.dnnl_reorder_primitive_desc_create(ctypes.byref(pd), src_md, self.lib.engine, dst_md,
                                                             self.lib.engine, None), "weight reorder")
        self.handles.append(("primitive_desc", pd))
        prim = self._primitive(pd)
        args = (_ExecArg * 2)(_ExecArg(_ARG_SRC, src), _ExecArg(_ARG_DST, dst))
        stream = self.lib.stream()
        self.lib.check(d.dnnl_primitive_execute(prim, stream, 2, args), "weight reorder run")
        d.dnnl_stream_wait(stream)

    def run(self, x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor | None = None) -> None:
        stream = self.lib.stream()
        self._set(self.src, x.data_ptr())
        self._set(self.dst, y.data_ptr())
        if self.residual is not None:
            self._set(self.residual, residual.data_ptr())
        self._exec(self.prim, stream, self.nargs, self.args)
        self._wait(stream)

    def __del__(self) -> None:
        d = getattr(getattr(self, "lib", None), "lib", None)
        try:
            for kind, h in reversed(getattr(self, "handles", [])):
                if d is not None and h:
                    getattr(d, f"dnnl_{kind}_destroy")(h)
        except (AttributeError, TypeError):       # at interpreter exit, ctypes may be gone before us
            pass


def _cached_ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    return (fp32_2d_cpu(attrs, ctx) and attrs.get("groups", 1) == 1 and not attrs.get("pool")
            and attrs.get("activation") in (None, *_ELTWISE) and library() is not None)


@tactic("Convolution", "onednn_cached", devices=("cpu",), supports=_cached_ok, priority=1)
def make_convolution_onednn_cached(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    """conv + bias (+ residual) + activation as one oneDNN primitive made once per input shape, NHWC in and out."""
    lib = library()
    if lib is None:
        raise IncompatibleEngineError(
            f"Layer {ctx.layer_name[:60]!r} runs tactic onednn_cached, which needs oneDNN's library: pip install "
            f"'kiln[cpu-onednn]' (or set {LIBRARY_ENV}), or rebuild the engine here with kiln build.")
    stride, dil, pads = list(attrs["stride"]), list(attrs["dilation"]), list(attrs["pads"])
    after = bool(attrs.get("residual_after_activation"))
    act_op = (("eltwise", *_ELTWISE[attrs["activation"]]),) if attrs.get("activation") else ()
    # post-ops per mode: "act" the activation; "add" the residual too, in the layer's order; "none" nothing
    modes = {"act": act_op, "add": act_op + (("add",),) if after else (("add",),) + act_op, "none": ()}
    act = activation_in_place(attrs)
    kept: dict[str, Any] = {"w": None, "b": None}
    prims: OrderedDict[tuple, Primitive] = OrderedDict()

    def primitive(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, mode: str) -> Primitive:
        if kept["w"] is not w or kept["b"] is not b:
            kept["w"], kept["b"] = w, b
            prims.clear()
        key = (tuple(x.shape), mode)
        hit = prims.get(key)
        if hit is None:
            hit = prims[key] = Primitive(lib, key[0], w, b, stride, dil, pads, modes[mode])
            if len(prims) > MAX_PACKED_SHAPES:
                prims.popitem(last=False)
        return hit

    def run(x, w, b=None, residual=None):
        x = match_weight(x, w)
        # the primitive reads x's channel count of weights and oc biases: operands that disagree (a damaged
        # engine) take torch's path, whose check names the mismatch, and never reach oneDNN
        if x.is_meta or x.dim() != 4 or x.dtype != torch.float32 or w.dtype != torch.float32 or x.numel() == 0 \
                or w.dim() != 4 or x.shape[1] != w.shape[1] or (b is not None and b.numel() != w.shape[0]):
            y = F.conv2d(F.pad(x, [pads[1], pads[3], pads[0], pads[2]]), w, b, stride, 0, dil)
            if residual is not None and not after:
                y = y + residual
            y = act(y) if act is not None else y
            return (y + residual if residual is not None and after else y,)
        x = x.contiguous(memory_format=CL)
        if residual is None:
            mode = "act"
        elif (residual.dtype == torch.float32 and residual.dim() == 4 and residual.is_contiguous(memory_format=CL)
              and tuple(residual.shape) == out_shape(x.shape, w.shape, stride, dil, pads)):
            mode = "add"            # other layouts (a Split's channel slice) are added in place: no copy first
        else:
            mode = "act" if after else "none"
        p = primitive(x, w, b, mode)
        y = torch.empty(p.out_shape, dtype=torch.float32, memory_format=torch.channels_last)
        p.run(x, y, residual)
        if mode == "none":
            y = y.add_(residual)
            if act is not None:
                y = act(y)
        elif mode == "act" and residual is not None:
            y = y.add_(residual)
        return (y,)
    return run
