"""LSTM and GRU on the CPU as one oneDNN RNN primitive per layer and input shape, weights reordered once.

Tactics ``onednn_lstm`` and ``onednn_gru`` call oneDNN's C API (kernels/dnnl_api.py). torch's own oneDNN RNN
(``mkldnn_rnn_layer``, ``_VF.lstm``) reorders the weights on every call; here the first call for an input shape
makes the primitive (the weights in the layout it picks, its own scratchpad) and a call then points the source,
state and destination memories at the tensors and executes the whole sequence, every direction, in one call.

ONNX to oneDNN, once per weight tensor: LSTM gates i, o, f, c become oneDNN's i, f, c, o; GRU's z, r, h are
oneDNN's u, r, o already. W [dirs, G·H, I] and R [dirs, G·H, H] are read as oneDNN's ldgoi. Bias: LSTM and
GRU with linear_before_reset=0 (oneDNN ``gru``) take Wb + Rb; linear_before_reset=1 (``lbr_gru``) takes the
four rows Wb_z + Rb_z, Wb_r + Rb_r, Wb_h, Rb_h. Directions: forward, reverse (right to left) and bidirectional
(concatenated; Y is returned as ONNX's [T, dirs, N, H], a view of oneDNN's [T, N, dirs·H]). Outputs are new
tensors each call. ONNX semantics covered: default activations, no clip, layout 0, no sequence lengths; LSTM
without peepholes or input_forget. Without the library the tactics are not offered.

Tactics ``onednn_lstm_dirs`` and ``onednn_gru_dirs`` (bidirectional layers only) run each direction as its own
primitive made for one thread; with torch on two threads or more the reverse direction runs on a helper thread
while the forward one runs on the caller's (``_make_dirs``): one wake-up of a second thread per call, where the one
primitive on two OpenMP threads has a parallel region, and so a wake-up of a sleeping worker, per time step.

Making a primitive costs as much as many calls, so a range engine (several shape points) does not time these
tactics (``shape_setup``); a layer keeps the primitives of its last ``MAX_PACKED_SHAPES`` input shapes, which
share one reordered copy of W and R where they chose equal layouts. Where nothing is timed (an RNN in an If
branch, optimization level 0) they come first on the CPU.
"""
from __future__ import annotations

import ctypes
import os
import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch

from kiln.errors import IncompatibleEngineError, ShapeError
from kiln.kernels.cpu_conv import MAX_PACKED_SHAPES, fp32_cpu
from kiln.kernels.dnnl_api import (ALLOCATE, ANY, ARG_BIAS, ARG_DST, ARG_DST_1, ARG_DST_2, ARG_SCRATCHPAD, ARG_SRC,
                                   ARG_SRC_1, ARG_SRC_2, ARG_WEIGHTS, ARG_WEIGHTS_1, FORWARD_INFERENCE, LIBRARY_ENV,
                                   QUERY_EXEC_ARG_MD, QUERY_SCRATCHPAD_MD, Dnnl, P, PrimitiveBase, library)
from kiln.kernels.registry import KernelContext, tactic
from kiln.kernels.rnn import check_rnn_input, make_rnn
from kiln.kernels.rnn_steps import _plain

# oneDNN v3 C API values for RNNs (oneapi/dnnl/dnnl_types.h, 3.2)
_TNC, _LDNC, _LDGOI, _LDGO = 4, 5, 31, 5
_DIRECTION = {"forward": 1, "reverse": 2, "bidirectional": 3}     # left2right, right2left, bidirectional_concat
# cell -> (ONNX gate feeding each oneDNN gate, gates, bias rows)
_CELLS = {"lstm": ((0, 2, 3, 1), 4, 4), "gru": ((0, 1, 2), 3, 3), "lbr_gru": ((0, 1, 2), 3, 4)}


def _fp32_cpu(ctx: KernelContext) -> bool:
    return fp32_cpu(ctx) and library() is not None


def _lstm_ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    return _plain(attrs, ctx, "lstm") and not attrs.get("input_forget", 0) and _fp32_cpu(ctx)


def _gru_ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    return _plain(attrs, ctx, "gru") and attrs.get("linear_before_reset", 0) in (0, 1) and _fp32_cpu(ctx)


def _onednn_weights(W: torch.Tensor, R: torch.Tensor, B: torch.Tensor | None, cell: str) -> tuple:
    """W and R in oneDNN's gate order (contiguous [dirs, G, H, ·], oneDNN's ldgoi), the bias as [dirs, rows, H]."""
    order, G, rows = _CELLS[cell]
    dirs, H = W.shape[0], R.shape[2]
    w = W.detach().float().reshape(dirs, G, H, -1)[:, list(order)].contiguous()
    r = R.detach().float().reshape(dirs, G, H, H)[:, list(order)].contiguous()
    if B is None:
        return w, r, torch.zeros(dirs, rows, H)
    wb, rb = B.detach().float().reshape(dirs, 2, G, H).unbind(1)
    if cell == "lbr_gru":
        b = torch.cat([wb[:, :2] + rb[:, :2], wb[:, 2:], rb[:, 2:]], 1)
    else:
        b = (wb + rb)[:, list(order)]
    return w, r, b.contiguous()


class RnnPrimitive(PrimitiveBase):
    """One RNN primitive for one input shape [T, N, I], with or without initial states: its weights reordered
    into the layout it chose (or another primitive's of the layer holding them in an equal layout: ``shared``),
    its bias and scratchpad. ``run(x, h0, c0, y, hn, cn)`` executes it; the states may be None (zeros), ``cn`` is
    the LSTM's alone."""

    def __init__(self, lib: Dnnl, cell: str, direction: str, shape: tuple[int, int, int], states: bool,
                 weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor], shared: list,
                 threads: int | None = None) -> None:
        super().__init__(lib, threads)
        self.keep: list[RnnPrimitive] = []                  # the primitives whose weights this one reads
        self.layouts: dict[int, P] = {}                     # weight argument -> the layout the primitive chose
        d = lib.lib
        T, N, I = shape
        w, r, b = weights
        dirs, G, H = w.shape[0], w.shape[1], w.shape[2]
        lstm = cell == "lstm"
        src, dst = self._md([T, N, I], _TNC), self._md([T, N, dirs * H], _TNC)
        state = self._md([1, dirs, N, H], _LDNC)
        wl_any, wi_any = self._md([1, dirs, I, G, H], ANY), self._md([1, dirs, H, G, H], ANY)
        wl_user, wi_user = self._md([1, dirs, I, G, H], _LDGOI), self._md([1, dirs, H, G, H], _LDGOI)
        bias = self._md([1, dirs, b.shape[1], H], _LDGO)
        attr, pd = self._attr_user_scratchpad(), P()
        src_iter = state if states else None
        common = (ctypes.byref(pd), lib.engine, FORWARD_INFERENCE, _DIRECTION[direction], src)
        if lstm:
            status = d.dnnl_lstm_forward_primitive_desc_create(
                *common, src_iter, src_iter, wl_any, wi_any, None, None, bias, dst, state, state, 0, attr)
        else:
            create = d.dnnl_lbr_gru_forward_primitive_desc_create if cell == "lbr_gru" else \
                d.dnnl_gru_forward_primitive_desc_create
            status = create(*common, src_iter, wl_any, wi_any, bias, dst, state, 0, attr)
        lib.check(status, f"{cell} primitive")
        self.handles.append(("primitive_desc", pd))
        self.prim = self._primitive(pd)
        self.weights_layer = self._packed(w, wl_user, pd, ARG_WEIGHTS, shared)
        self.weights_iter = self._packed(r, wi_user, pd, ARG_WEIGHTS_1, shared)
        self.bias_values = b                                # the bias memory reads it in place
        self.scratch = self._memory(self._query(pd, QUERY_SCRATCHPAD_MD, 0), ALLOCATE)
        self.src, self.dst = self._memory(src, None), self._memory(dst, None)
        self.h0 = self.c0 = self.cn = None
        bound = [(ARG_SRC, self.src), (ARG_WEIGHTS, self.weights_layer), (ARG_WEIGHTS_1, self.weights_iter),
                 (ARG_BIAS, self._memory(bias, ctypes.c_void_p(b.data_ptr()))), (ARG_DST, self.dst),
                 (ARG_SCRATCHPAD, self.scratch)]
        self.hn = self._memory(state, None)
        self.ptrs: list[int | None] = [None] * 6         # the address each of src, dst, hn, h0, cn, c0 points at
        bound.append((ARG_DST_1, self.hn))
        if states:
            self.h0 = self._memory(state, None)
            bound.append((ARG_SRC_1, self.h0))
        if lstm:
            self.cn = self._memory(state, None)
            bound.append((ARG_DST_2, self.cn))
            if states:
                self.c0 = self._memory(state, None)
                bound.append((ARG_SRC_2, self.c0))
        self._bind(bound)

    def _packed(self, values: torch.Tensor, user_md: P, pd: P, arg: int, shared: list) -> P:
        """The weight ``arg`` in the layout the primitive chose: from a live primitive in ``shared`` (entries
        (weak reference, arg, layout, memory)) that holds it in an equal layout, else reordered now and added."""
        md = self.layouts[arg] = self._query(pd, QUERY_EXEC_ARG_MD, arg)
        shared[:] = [e for e in shared if e[0]() is not None]
        for ref, a, other_md, mem in shared:
            if a == arg and self.lib.lib.dnnl_memory_desc_equal(md, other_md):
                self.keep.append(ref())
                return mem
        mem = self._reordered(values, user_md, md)
        shared.append((weakref.ref(self), arg, md, mem))
        return mem

    def run(self, x: torch.Tensor, h0: torch.Tensor | None, c0: torch.Tensor | None, y: torch.Tensor,
            hn: torch.Tensor, cn: torch.Tensor | None) -> None:
        """Point the memories at the tensors (only those whose address changed since the last call: the
        allocator mostly hands a layer the same addresses run after run) and execute."""
        s, last = self._set, self.ptrs
        p = x.data_ptr()
        if p != last[0]:
            s(self.src, p)
            last[0] = p
        p = y.data_ptr()
        if p != last[1]:
            s(self.dst, p)
            last[1] = p
        p = hn.data_ptr()
        if p != last[2]:
            s(self.hn, p)
            last[2] = p
        if self.h0 is not None:
            p = h0.data_ptr()
            if p != last[3]:
                s(self.h0, p)
                last[3] = p
        if self.cn is not None:
            p = cn.data_ptr()
            if p != last[4]:
                s(self.cn, p)
                last[4] = p
            if self.c0 is not None:
                p = c0.data_ptr()
                if p != last[5]:
                    s(self.c0, p)
                    last[5] = p
        self._execute()


def _check_operands(name: str, X: torch.Tensor, W, R, B, h0, c0, dirs: int, G: int, H: int) -> None:
    """Refuse operands whose shapes or dtypes disagree with the layer before oneDNN reads them."""
    T, N, I = X.shape
    want = {"W": (W, (dirs, G * H, I)), "R": (R, (dirs, G * H, H)), "B": (B, (dirs, 2 * G * H)),
            "initial_h": (h0, (dirs, N, H)), "initial_c": (c0, (dirs, N, H))}
    for what, (t, shape) in {"X": (X, (T, N, I)), **want}.items():
        if t is not None and (tuple(t.shape) != shape or t.dtype != torch.float32):
            raise ShapeError(f"{name}: its {what} is {t.dtype} of shape {list(t.shape)}, but this layer (hidden_size "
                             f"{H}, {dirs} direction(s), X {list(X.shape)}) needs float32 of shape {list(shape)}; "
                             f"rebuild the engine from the model with kiln build.")


def _make(attrs: dict[str, Any], ctx: KernelContext, cell: str, threads: int | None = None,
          tactic_name: str | None = None) -> Callable[..., tuple]:
    """The layer as one primitive per input shape, made for ``threads`` (None: torch's count at its making)."""
    lib = library()
    tactic_name = tactic_name or ("onednn_lstm" if cell == "lstm" else "onednn_gru")
    if lib is None:
        raise IncompatibleEngineError(
            f"Layer {ctx.layer_name[:60]!r} runs tactic {tactic_name}, which needs oneDNN's library: pip install "
            f"'kiln[cpu-onednn]' (or set {LIBRARY_ENV}), or rebuild the engine here with kiln build.")
    kind = "lbr_gru" if cell == "gru" and attrs.get("linear_before_reset", 0) == 1 else cell
    lstm = cell == "lstm"
    direction = attrs.get("direction", "forward")
    H, dirs, G = attrs["hidden_size"], 2 if direction == "bidirectional" else 1, _CELLS[kind][1]
    loop = make_rnn(attrs, ctx)             # the torch loop: meta tensors, empty sequences or batches
    name = f"Layer {ctx.layer_name[:60]!r} ({tactic_name})"
    kept: dict[str, Any] = {"key": None}
    prims: OrderedDict[tuple, RnnPrimitive] = OrderedDict()
    shared: list = []               # reordered weights of the layer's live primitives, by layout

    def primitive(X: torch.Tensor, W, R, B, h0, c0) -> RnnPrimitive:
        k = kept["key"]
        if k is None or k[0] is not W or k[1] is not R or k[2] is not B:
            kept["key"], kept["weights"] = None, None
            prims.clear()
            shared.clear()
        # every operand's shape and dtype is in the key: a new one is checked once, before oneDNN reads it
        key = (X.shape, X.dtype, None if h0 is None else (h0.shape, h0.dtype),
               None if c0 is None else (c0.shape, c0.dtype))
        hit = prims.get(key)
        if hit is None:
            _check_operands(name, X, W, R, B, h0, c0, dirs, G, H)
            if kept["key"] is None:
                kept["key"], kept["weights"] = (W, R, B), _onednn_weights(W, R, B, kind)
            states = h0 is not None or c0 is not None
            hit = prims[key] = RnnPrimitive(lib, kind, direction, tuple(X.shape), states, kept["weights"], shared,
                                            threads)
            if len(prims) > MAX_PACKED_SHAPES:
                prims.popitem(last=False)
        return hit

    def run(X, W, R, B=None, seq_lens=None, h0=None, c0=None, P=None):
        if seq_lens is not None or P is not None:
            raise RuntimeError(f"{tactic_name}: sequence lengths and peepholes need the loop tactic")
        check_rnn_input(X, cell)
        if X.is_meta or X.numel() == 0:
            return loop(X, W, R, B, None, h0, c0)
        T, N, _ = X.shape
        c0 = c0 if lstm else None
        p = primitive(X, W, R, B, h0, c0)
        states = p.h0 is not None
        if states:
            zeros = torch.zeros(dirs, N, H)
            h0 = zeros if h0 is None else h0.contiguous()
            c0 = zeros if c0 is None else c0.contiguous()
        # oneDNN's [T, N, dirs·H]: for one direction, the same memory as ONNX's [T, 1, N, H]
        y, hn = torch.empty(T, 1, N, H) if dirs == 1 else torch.empty(T, N, dirs * H), torch.empty(dirs, N, H)
        cn = torch.empty(dirs, N, H) if lstm else None
        p.run(X.contiguous(), h0, c0, y, hn, cn)
        Y = y if dirs == 1 else y.view(T, N, 2, H).permute(0, 2, 1, 3)
        return (Y, hn, cn) if lstm else (Y, hn)
    return run


@tactic("RNN", "onednn_lstm", devices=("cpu",), supports=_lstm_ok, priority=-3,
        shape_setup=True)
def make_lstm_onednn(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    """LSTM as one oneDNN primitive execution per call (module docstring)."""
    return _make(attrs, ctx, "lstm")


@tactic("RNN", "onednn_gru", devices=("cpu",), supports=_gru_ok, priority=-3,
        shape_setup=True)
def make_gru_onednn(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    """GRU (either linear_before_reset) as one oneDNN primitive execution per call (module docstring)."""
    return _make(attrs, ctx, "gru")


def _bidirectional(attrs: dict[str, Any]) -> bool:
    return attrs.get("direction", "forward") == "bidirectional"


_helper: dict[int, Any] = {}    # process id -> the one thread that runs the second direction of ``*_dirs`` layers


def _second_thread():
    """This process's helper thread (an executor of one), made at first use (again in a forked child)."""
    pid = os.getpid()
    pool = _helper.get(pid)
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor
        _helper.clear()
        pool = _helper[pid] = ThreadPoolExecutor(1, thread_name_prefix="kiln-rnn-direction")
    return pool


def _make_dirs(attrs: dict[str, Any], ctx: KernelContext, cell: str, name: str) -> Callable[..., tuple]:
    """A bidirectional layer as two one-direction layers, each one primitive made for one thread: with torch on
    two threads or more the reverse direction runs on a second thread (``_second_thread``) while the forward one
    runs on the caller's, so a call wakes a second thread once instead of in every time step's parallel region;
    on one thread they run one after the other. Outputs as ONNX's: Y [T, 2, N, H], Y_h (and Y_c) [2, N, H]."""
    lstm = cell == "lstm"
    runs = [_make({**attrs, "direction": d}, ctx, cell, threads=1, tactic_name=name) for d in ("forward", "reverse")]
    halves: dict[str, Any] = {"key": None}

    def half(t: torch.Tensor | None, d: int) -> torch.Tensor | None:
        return None if t is None else t[d:d + 1]

    def run(X, W, R, B=None, seq_lens=None, h0=None, c0=None, P=None):
        if seq_lens is not None or P is not None:
            raise RuntimeError(f"{name}: sequence lengths and peepholes need the loop tactic")
        if halves["key"] is None or halves["key"][0] is not W or halves["key"][1] is not R or \
                halves["key"][2] is not B:      # each direction's weights as the same tensors every call
            halves["key"] = (W, R, B)
            halves["w"] = [(half(W, d), half(R, d), half(B, d)) for d in (0, 1)]
        (wf, rf, bf), (wr, rr, br) = halves["w"]
        c0 = c0 if lstm else None
        args_r = (X, wr, rr, br, None, half(h0, 1), half(c0, 1))
        if torch.get_num_threads() > 1:
            pending = _second_thread().submit(runs[1], *args_r)
            try:
                fwd = runs[0](X, wf, rf, bf, None, half(h0, 0), half(c0, 0))
            finally:
                rev = pending.result()          # never leave the other direction running past this call
        else:
            fwd = runs[0](X, wf, rf, bf, None, half(h0, 0), half(c0, 0))
            rev = runs[1](*args_r)
        return tuple(torch.cat([f, r], 1 if i == 0 else 0) for i, (f, r) in enumerate(zip(fwd, rev)))
    return run


@tactic("RNN", "onednn_lstm_dirs", devices=("cpu",), supports=lambda a, c: _lstm_ok(a, c) and _bidirectional(a),
        priority=-3, shape_setup=True)
def make_lstm_onednn_dirs(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    """A bidirectional LSTM's directions as two one-thread primitives, side by side on two threads (_make_dirs)."""
    return _make_dirs(attrs, ctx, "lstm", "onednn_lstm_dirs")


@tactic("RNN", "onednn_gru_dirs", devices=("cpu",), supports=lambda a, c: _gru_ok(a, c) and _bidirectional(a),
        priority=-3, shape_setup=True)
def make_gru_onednn_dirs(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    """A bidirectional GRU's directions as two one-thread primitives, side by side on two threads (_make_dirs)."""
    return _make_dirs(attrs, ctx, "gru", "onednn_gru_dirs")
