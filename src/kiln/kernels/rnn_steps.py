"""LSTM for short sequences: one GEMM per time step over [x_t, h] and the concatenated weights [W; R].

A streaming model (a voice-activity detector fed one frame at a time) runs its LSTM over one or a few steps
per call: torch's fused ``lstm`` then costs more in per-call setup than in arithmetic, and the general loop
(rnn.py) multiplies x and h by W and R separately. Here each step is ``addmm(b_W + b_R, [x_t, h], [W; R]^T)``
on weights concatenated once per weight tensor, one sigmoid over the i, o, f gates (ONNX's order puts them
first) and one tanh over the cell gate. ONNX semantics: default activations, no clip, no peepholes, no
sequence lengths, layout 0, input_forget 0; forward, reverse or bidirectional.
"""
from __future__ import annotations

import torch

from kiln.kernels.registry import tactic


def _ok(attrs, ctx) -> bool:
    ins = tuple(ctx.input_dtypes) + (None,) * 8
    return (attrs.get("cell") == "lstm" and not attrs.get("activations") and not attrs.get("clip")
            and not attrs.get("layout", 0) and not attrs.get("input_forget", 0) and ins[4] is None
            and ins[7] is None)


@tactic("RNN", "lstm_steps", supports=_ok, priority=1)
def make_lstm_steps(attrs, ctx):
    H = attrs["hidden_size"]
    direction = attrs.get("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    cache: dict = {}          # one entry: the last weights' concatenation (constant weights hit it every run)

    def packed(W, R, B):
        hit = cache.get("w")
        if hit is not None and hit[0] is W and hit[1] is R and hit[2] is B:
            return hit[3]
        out = []
        for d in range(W.shape[0]):
            wr = torch.cat([W[d], R[d]], 1).t().contiguous()                  # [I + H, 4H]
            b = (B[d][:4 * H] + B[d][4 * H:]) if B is not None else torch.zeros(4 * H, dtype=W.dtype,
                                                                                 device=W.device)
            out.append((wr, b.contiguous()))
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
            wr, b = weights[d]
            h = h0[d] if h0 is not None else X.new_zeros(N, H)
            c = c0[d] if c0 is not None else X.new_zeros(N, H)
            steps = range(T - 1, -1, -1) if (direction == "reverse" or d == 1) else range(T)
            out = [None] * T
            for t in steps:
                g = torch.addmm(b, torch.cat([X[t], h], 1), wr)
                s = torch.sigmoid(g[:, :3 * H])
                c = torch.addcmul(s[:, 2 * H:] * c, s[:, :H], torch.tanh(g[:, 3 * H:]))
                h = s[:, H:2 * H] * torch.tanh(c)
                out[t] = h
            ys.append(torch.stack(out) if T else X.new_zeros(0, N, H))
            hs.append(h)
            cs.append(c)
        return torch.stack(ys, 1), torch.stack(hs, 0), torch.stack(cs, 0)
    return run
