"""LSTM for short sequences: one ``torch.lstm_cell`` call per time step, on weights reordered once.

A streaming model (a voice-activity detector fed one frame at a time) runs its LSTM over one or a few steps
per call: torch's fused ``lstm`` then costs more in per-call setup than in arithmetic, and a step written as
separate torch ops (GEMM, gate slices, sigmoid, tanh, products) pays torch's per-op cost a dozen times. Here
each step is one ``torch.lstm_cell`` (its GEMMs and gate arithmetic inside ATen) on W, R and the biases
reordered once per weight tensor from ONNX's gate order (i, o, f, c) to torch's (i, f, c, o). ONNX semantics:
default activations, no clip, no peepholes, no sequence lengths, layout 0, input_forget 0; forward, reverse or
bidirectional.
"""
from __future__ import annotations

import torch

from kiln.kernels.registry import tactic


def _ok(attrs, ctx) -> bool:
    ins = tuple(ctx.input_dtypes) + (None,) * 8
    return (attrs.get("cell") == "lstm" and not attrs.get("activations") and not attrs.get("clip")
            and not attrs.get("layout", 0) and not attrs.get("input_forget", 0) and ins[4] is None
            and ins[7] is None)


def _torch_gate_order(m: torch.Tensor) -> torch.Tensor:
    """Rows (or entries) in ONNX's gate order i, o, f, c as torch's i, f, c, o."""
    i, o, f, c = m.chunk(4, 0)
    return torch.cat([i, f, c, o], 0).contiguous()


@tactic("RNN", "lstm_steps", supports=_ok, priority=1)
def make_lstm_steps(attrs, ctx):
    H = attrs["hidden_size"]
    direction = attrs.get("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    cache: dict = {}          # one entry: the last weights, reordered (constant weights hit it every run)

    def packed(W, R, B):
        hit = cache.get("w")
        if hit is not None and hit[0] is W and hit[1] is R and hit[2] is B:
            return hit[3]
        out = []
        for d in range(W.shape[0]):
            biases = (None, None) if B is None else (_torch_gate_order(B[d][:4 * H]),
                                                     _torch_gate_order(B[d][4 * H:]))
            out.append((_torch_gate_order(W[d]), _torch_gate_order(R[d])) + biases)
        cache["w"] = (W, R, B, out)
        return out

    def run(X, W, R, B=None, seq_lens=None, h0=None, c0=None, P=None):
        if seq_lens is not None or P is not None:
            raise RuntimeError("lstm_steps: sequence lengths and peepholes need the loop tactic")
        T, N, _ = X.shape
        if X.is_meta:
            e = lambda *shape: torch.empty(shape, dtype=X.dtype, device="meta")      # noqa: E731
            return e(T, dirs, N, H), e(dirs, N, H), e(dirs, N, H)
        weights = packed(W, R, B)
        ys, hs, cs = [], [], []
        for d in range(dirs):
            w, r, bw, br = weights[d]
            h = h0[d] if h0 is not None else X.new_zeros(N, H)
            c = c0[d] if c0 is not None else X.new_zeros(N, H)
            steps = range(T - 1, -1, -1) if (direction == "reverse" or d == 1) else range(T)
            out = [None] * T
            for t in steps:
                h, c = torch.lstm_cell(X[t], (h, c), w, r, bw, br)
                out[t] = h
            ys.append(torch.stack(out) if T else X.new_zeros(0, N, H))
            hs.append(h)
            cs.append(c)
        if dirs == 1:
            return ys[0].unsqueeze(1), hs[0].unsqueeze(0), cs[0].unsqueeze(0)
        return torch.stack(ys, 1), torch.stack(hs, 0), torch.stack(cs, 0)
    return run
