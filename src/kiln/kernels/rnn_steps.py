"""LSTM and GRU for short sequences: one input GEMM for all steps, then per step one GEMM and 5-6 gate ops.

A streaming model (a voice-activity detector fed one frame at a time) runs its RNN over one or a few steps
per call, so the count of torch ops decides its time, not the arithmetic. Per direction, the input
projection of every step is one ``addmm`` against W laid out once as [I, G·H] (contiguous rows, the layout a
one-row GEMM reads fastest), written into a gates buffer kept per input shape; the views each step works on
are made with that buffer. Every op of a step works in place on those views or writes a fresh result.

- LSTM (``lstm_steps``): both biases folded into the input GEMM; per step ``h @ R`` added in place into the
  step's gate rows (``addmm_`` on R laid out once as [H, 4H]), sigmoid over the i, o, f gates and tanh over
  the cell gate in place (ONNX's gate order i, o, f, c keeps the sigmoid gates contiguous), then
  ``c = f*c + i*g`` and ``h = o*tanh(c)`` in four ops. A zero initial state (no h0 or c0 input) skips the
  first step's recurrent GEMM or ``f*c``.
- GRU (``gru_steps``, linear_before_reset=1, torch's and cuDNN's form): per step ``h @ R + Rb`` into a
  scratch row, added into the z, r gates and sigmoid in place, ``n = tanh(xh + r*(h @ Rh + Rbh))`` in two
  ops and ``h = n + z*(h - n)`` (ONNX's ``(1 - z)*n + z*h``) as one ``lerp``.

The hidden states go into a per-shape [T, dirs, N, H] buffer; outputs are fresh copies of it, so a later
call never writes into an earlier call's results. A layer keeps the buffers of its last 8 input shapes, fewer
where they would hold more than 64 MB (the newest is always kept). ONNX semantics: default activations, no
clip, no sequence lengths, layout 0; LSTM without peepholes or input_forget; forward, reverse or bidirectional.

Where the build times nothing (optimization level 0, an RNN in an If branch whose input shapes it cannot know),
these tactics come first on the CPU after the oneDNN RNN tactics (kernels/cpu_dnnl_rnn.py, where that library
is installed), as they beat torch's fused RNN at short sequences, and after the fused tactics (cuDNN) on CUDA.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch

from kiln.kernels.registry import KernelContext, tactic
from kiln.kernels.rnn import check_rnn_input

MAX_SHAPES = 8              # buffer sets kept per layer (one per input shape met), oldest dropped first ...
MAX_KEPT_BYTES = 64 << 20   # ... and while they hold more than this, except the newest
_GATES = {"lstm": 4, "gru": 3}


def _plain(attrs: dict[str, Any], ctx: KernelContext, cell: str) -> bool:
    """Default activations, no clip, layout 0, no sequence lengths (input 4) nor peepholes (input 7)."""
    ins = tuple(ctx.input_dtypes) + (None,) * 8
    return (attrs.get("cell") == cell and not attrs.get("activations") and not attrs.get("clip")
            and not attrs.get("layout", 0) and ins[4] is None and ins[7] is None)


def _lstm_ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    return _plain(attrs, ctx, "lstm") and not attrs.get("input_forget", 0)


def _gru_ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    return _plain(attrs, ctx, "gru") and attrs.get("linear_before_reset", 0) == 1


def pack_rnn_weights(W: torch.Tensor, R: torch.Tensor, B: torch.Tensor | None, fold_bias: bool) -> list[tuple]:
    """Per direction: (W as [I, G·H], R as [H, G·H], the input GEMM's bias, the recurrent bias), contiguous,
    in ONNX's gate order. ``fold_bias``: the input bias is Wb + Rb and the recurrent one None (LSTM); else
    Wb and Rb (GRU). Biases are None without B."""
    out = []
    for d in range(W.shape[0]):
        wb = rb = None
        if B is not None:
            half = B.shape[1] // 2
            wb, rb = B[d, :half].contiguous(), B[d, half:].contiguous()
            if fold_bias:
                wb, rb = wb + rb, None
        out.append((W[d].t().contiguous(), R[d].t().contiguous(), wb, rb))
    return out


def _lstm_views(g: torch.Tensor, H: int) -> tuple:
    """A step's LSTM gate rows [N, 4H]: (all, the sigmoid gates i|o|f, then the cell gate, i, o, f as
    [1, N, H])."""
    g3 = g.unsqueeze(0)
    return g, g[:, :3 * H], g3[..., 3 * H:], g3[..., :H], g3[..., H:2 * H], g3[..., 2 * H:3 * H]


def _gru_views(g: torch.Tensor, H: int) -> tuple:
    """A step's GRU gate rows [N, 3H]: (z|r, z, r, the input part of the new gate)."""
    return g[:, :2 * H], g[:, :H], g[:, H:2 * H], g[:, 2 * H:]


class _Scratch:
    """Per input shape: a [dirs, T·N, G·H] gates buffer, a [T, dirs, N, H] hidden-state buffer, [1, N, H] and
    [N, G·H] scratch rows, and per (direction, step in the order run) the views of its gate rows with the
    step's hidden state as [N, H] (the next GEMM's operand) and [1, N, H]."""

    def __init__(self, x: torch.Tensor, dirs: int, hidden: int, cell: str, reverse: bool) -> None:
        T, N, I = x.shape
        H, gates = hidden, _GATES[cell]
        self.flat = (T * N, I)
        views = _lstm_views if cell == "lstm" else _gru_views
        buf = x.new_empty(dirs, T * N, gates * H)
        self.hidden = x.new_empty(T, dirs, N, H)
        self.rows = [buf[d] for d in range(dirs)]
        self.tmp = x.new_empty(1, N, H)
        self.tmp2 = self.tmp[0]
        self.rec = x.new_empty(N, gates * H)
        self.rec_zr, self.rec_h = self.rec[:, :2 * H], self.rec[:, 2 * H:]
        self.nbytes = sum(t.numel() * t.element_size() for t in (buf, self.hidden, self.tmp, self.rec))
        self.steps = []
        for d in range(dirs):
            order = range(T - 1, -1, -1) if (reverse or d == 1) else range(T)
            self.steps.append([views(buf[d, t * N:(t + 1) * N], H) + (self.hidden[t, d],
                                                                        self.hidden[t, d].unsqueeze(0))
                               for t in order])
        # the hidden state each direction ends on: Y_h's [1, N, H] for one direction, else its [N, H] parts
        ends = [0 if (reverse or d == 1) else T - 1 for d in range(dirs)]
        self.last = [self.hidden[ends[0]]] if dirs == 1 else [self.hidden[t, d] for d, t in enumerate(ends)]

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Y [T, dirs, N, H] and Y_h [dirs, N, H], fresh."""
        if len(self.last) == 1:
            return self.hidden.clone(), self.last[0].clone()
        return self.hidden.clone(), torch.stack(self.last)


class _Layer:
    """One layer's packed weights (the last W, R, B seen; constants hit every run) and per-shape buffers."""

    def __init__(self, attrs: dict[str, Any]) -> None:
        self.cell = attrs["cell"]
        self.hidden = attrs["hidden_size"]
        direction = attrs.get("direction", "forward")
        self.dirs = 2 if direction == "bidirectional" else 1
        self.reverse = direction == "reverse"
        self.packed: tuple | None = None
        self.buffers: OrderedDict[tuple, _Scratch] = OrderedDict()
        self.kept_bytes = 0

    def weights(self, W: torch.Tensor, R: torch.Tensor, B: torch.Tensor | None) -> list[tuple]:
        hit = self.packed
        if hit is None or hit[0] is not W or hit[1] is not R or hit[2] is not B:
            hit = self.packed = (W, R, B, pack_rnn_weights(W, R, B, fold_bias=self.cell == "lstm"))
        return hit[3]

    def scratch(self, x: torch.Tensor) -> _Scratch:
        key = (x.shape, x.dtype, x.device)
        hit = self.buffers.get(key)
        if hit is None:
            hit = self.buffers[key] = _Scratch(x, self.dirs, self.hidden, self.cell, self.reverse)
            self.kept_bytes += hit.nbytes
            while len(self.buffers) > 1 and (len(self.buffers) > MAX_SHAPES or self.kept_bytes > MAX_KEPT_BYTES):
                self.kept_bytes -= self.buffers.popitem(last=False)[1].nbytes
        return hit

    def start(self, X: torch.Tensor, W, R, B) -> tuple[list[tuple], _Scratch]:
        """The packed weights and this shape's buffers, each direction's input projection written."""
        packs, buf = self.weights(W, R, B), self.scratch(X)
        x2 = X.reshape(*buf.flat)
        for (wt, _, wb, _), rows in zip(packs, buf.rows):
            if wb is None:
                torch.mm(x2, wt, out=rows)
            else:
                torch.addmm(wb, x2, wt, out=rows)
        return packs, buf

    def empty(self, X: torch.Tensor, *states: torch.Tensor | None) -> tuple:
        """Outputs on meta tensors or for a zero-length sequence: Y empty, the states as given (or zeros)."""
        N, shape = X.shape[1], (self.dirs, X.shape[1], self.hidden)
        keep = lambda s: X.new_zeros(shape) if s is None or X.is_meta else s.clone()     # noqa: E731
        return (X.new_zeros(X.shape[0], self.dirs, N, self.hidden),) + tuple(keep(s) for s in states)


def _no_lengths(seq_lens, P, name: str) -> None:
    if seq_lens is not None or P is not None:
        raise RuntimeError(f"{name}: sequence lengths and peepholes need the loop tactic")


@tactic("RNN", "lstm_steps", supports=_lstm_ok, priority={"cpu": -2, "cuda": 1})
def make_lstm_steps(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    """LSTM as per-step in-place gate ops on per-shape buffers (see the module docstring)."""
    layer = _Layer(attrs)
    dirs = layer.dirs

    def run(X, W, R, B=None, seq_lens=None, h0=None, c0=None, P=None):
        _no_lengths(seq_lens, P, "lstm_steps")
        check_rnn_input(X, "lstm")
        if X.is_meta or X.shape[0] == 0:
            return layer.empty(X, h0, c0)
        packs, buf = layer.start(X, W, R, B)
        cs = []
        for d in range(dirs):
            rt = packs[d][1]
            h = h0[d] if h0 is not None else None
            c = None if c0 is None else c0 if dirs == 1 else c0[d:d + 1]
            for g, sig, cell, i, o, f, h2, h3 in buf.steps[d]:
                if h is not None:
                    g.addmm_(h, rt)
                sig.sigmoid_()
                cell.tanh_()
                if c is None:
                    c = torch.mul(i, cell)
                else:
                    c = torch.mul(f, c)
                    c.addcmul_(i, cell)
                torch.mul(o, torch.tanh(c, out=buf.tmp), out=h3)
                h = h2
            cs.append(c)
        return buf.outputs() + (cs[0] if dirs == 1 else torch.cat(cs),)
    return run


@tactic("RNN", "gru_steps", supports=_gru_ok, priority={"cpu": -2, "cuda": 1})
def make_gru_steps(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    """GRU (linear_before_reset=1) as per-step in-place gate ops on per-shape buffers (module docstring)."""
    layer = _Layer(attrs)
    H, dirs = layer.hidden, layer.dirs

    def run(X, W, R, B=None, seq_lens=None, h0=None, c0=None, P=None):
        _no_lengths(seq_lens, P, "gru_steps")
        check_rnn_input(X, "gru")
        if X.is_meta or X.shape[0] == 0:
            return layer.empty(X, h0)
        packs, buf = layer.start(X, W, R, B)
        rec, rec_zr, rec_h, n = buf.rec, buf.rec_zr, buf.rec_h, buf.tmp2
        for d in range(dirs):
            rt, rb = packs[d][1], packs[d][3]
            h = h0[d] if h0 is not None else X.new_zeros(X.shape[1], H)
            for zr, z, r, xh, h2, _ in buf.steps[d]:
                if rb is None:
                    torch.mm(h, rt, out=rec)
                else:
                    torch.addmm(rb, h, rt, out=rec)
                zr.add_(rec_zr).sigmoid_()
                torch.addcmul(xh, r, rec_h, out=n).tanh_()
                h = torch.lerp(n, h, z, out=h2)
        return buf.outputs()
    return run
