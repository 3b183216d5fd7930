"""LSTM for short sequences: one input GEMM for all steps, then one GEMM and five gate ops per step.

A streaming model (a voice-activity detector fed one frame at a time) runs its LSTM over one or a few steps
per call, so the count of torch ops decides its time, not the arithmetic. Per direction, the input
projection of every step is one ``addmm`` against W laid out once as [I, 4H] (contiguous rows, the layout a
one-row GEMM reads fastest) with both biases folded into one vector, written into a gates buffer kept per
input shape. Each step then adds ``h @ R`` into its rows of that buffer in place (``addmm_`` on R laid out
once as [H, 4H]), applies sigmoid to the i, o, f gates and tanh to the cell gate in place (ONNX's gate order
i, o, f, c keeps the three sigmoid gates contiguous), and makes ``c = f*c + i*g`` and ``h = o*tanh(c)`` in
three more ops. A zero initial state (no h0 or c0 input) skips the step's recurrent GEMM or ``f*c``.
ONNX semantics: default activations, no clip, no peepholes, no sequence lengths, layout 0, input_forget 0;
forward, reverse or bidirectional.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch

from kiln.kernels.registry import KernelContext, tactic

_MAX_SHAPES = 8         # gates buffers kept per layer (one per input shape met), oldest dropped first


def _ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    ins = tuple(ctx.input_dtypes) + (None,) * 8
    return (attrs.get("cell") == "lstm" and not attrs.get("activations") and not attrs.get("clip")
            and not attrs.get("layout", 0) and not attrs.get("input_forget", 0) and ins[4] is None
            and ins[7] is None)


def pack_lstm_weights(W: torch.Tensor, R: torch.Tensor, B: torch.Tensor | None) -> list[tuple]:
    """Per direction: (W as [I, 4H], R as [H, 4H], Wb + Rb or None), contiguous, in ONNX's gate order."""
    out = []
    for d in range(W.shape[0]):
        bias = None
        if B is not None:
            half = B.shape[1] // 2
            bias = (B[d, :half] + B[d, half:]).contiguous()
        out.append((W[d].t().contiguous(), R[d].t().contiguous(), bias))
    return out


class _Scratch:
    """Per input shape: a [dirs, T·N, 4H] gates buffer and a [T, dirs, N, H] hidden-state buffer, with the
    views each (direction, step) works on made once."""

    def __init__(self, x: torch.Tensor, dirs: int, hidden: int, reverse: bool) -> None:
        T, N, _ = x.shape
        H = hidden
        gates = x.new_empty(dirs, T * N, 4 * H)
        self.hidden = x.new_empty(T, dirs, N, H)
        self.rows = [gates[d] for d in range(dirs)]
        self.tanh_c = x.new_empty(1, N, H)
        self.steps = []
        for d in range(dirs):
            order = range(T - 1, -1, -1) if (reverse or d == 1) else range(T)
            self.steps.append([self._views(gates[d, t * N:(t + 1) * N], self.hidden[t, d], H) for t in order])
        # the hidden state each direction ends on: Y_h's [1, N, H] for one direction, else its [N, H] parts
        ends = [0 if (reverse or d == 1) else T - 1 for d in range(dirs)]
        self.last = [self.hidden[ends[0]]] if dirs == 1 else [self.hidden[t, d] for d, t in enumerate(ends)]

    @staticmethod
    def _views(g: torch.Tensor, h: torch.Tensor, H: int) -> tuple:
        """One step's views: its [N, 4H] gate rows, the sigmoid gates i|o|f, then the cell gate, i, o and f
        as [1, N, H], and its hidden state as [N, H] (the next GEMM's operand) and [1, N, H]."""
        g3 = g.unsqueeze(0)
        return (g, g[:, :3 * H], g3[..., 3 * H:], g3[..., :H], g3[..., H:2 * H], g3[..., 2 * H:3 * H],
                h, h.unsqueeze(0))


@tactic("RNN", "lstm_steps", supports=_ok, priority=1)
def make_lstm_steps(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    """LSTM as per-step in-place gate ops on per-shape buffers (see the module docstring)."""
    H = attrs["hidden_size"]
    direction = attrs.get("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    reverse = direction == "reverse"
    packed: dict[str, Any] = {}                 # the last weights and their packing (constants hit it every run)
    buffers: OrderedDict[tuple, _Scratch] = OrderedDict()

    def weights(W, R, B) -> list[tuple]:
        hit = packed.get("w")
        if hit is None or hit[0] is not W or hit[1] is not R or hit[2] is not B:
            hit = packed["w"] = (W, R, B, pack_lstm_weights(W, R, B))
        return hit[3]

    def scratch(x: torch.Tensor) -> _Scratch:
        key = (tuple(x.shape), x.dtype, x.device)
        hit = buffers.get(key)
        if hit is None:
            hit = buffers[key] = _Scratch(x, dirs, H, reverse)
            if len(buffers) > _MAX_SHAPES:
                buffers.popitem(last=False)
        return hit

    def run(X, W, R, B=None, seq_lens=None, h0=None, c0=None, P=None):
        if seq_lens is not None or P is not None:
            raise RuntimeError("lstm_steps: sequence lengths and peepholes need the loop tactic")
        T, N, I = X.shape
        if X.is_meta or T == 0:
            e = lambda state: X.new_zeros(dirs, N, H) if state is None or X.is_meta else state.clone()  # noqa: E731
            return X.new_zeros(T, dirs, N, H), e(h0), e(c0)
        packs = weights(W, R, B)
        buf = scratch(X)
        x2 = X.reshape(T * N, I)
        cs = []
        for d in range(dirs):
            wt, rt, bias = packs[d]
            if bias is None:
                torch.mm(x2, wt, out=buf.rows[d])
            else:
                torch.addmm(bias, x2, wt, out=buf.rows[d])
            h = h0[d] if h0 is not None else None
            c = None if c0 is None else c0 if dirs == 1 else c0[d:d + 1]
            tanh_c = buf.tanh_c
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
                torch.mul(o, torch.tanh(c, out=tanh_c), out=h3)
                h = h2
            cs.append(c)
        if dirs == 1:
            return buf.hidden.clone(), buf.last[0].clone(), cs[0]
        return buf.hidden.clone(), torch.stack(buf.last), torch.cat(cs)
    return run
