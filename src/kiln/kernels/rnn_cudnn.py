"""LSTM and GRU through torch's fused RNN kernels — cuDNN on the GPU, oneDNN/MKL on the CPU — one
call per layer instead of a Python loop per time step.

ONNX gate order (LSTM i,o,f,c; GRU z,r,h) is re-ordered to cuDNN's (LSTM i,f,g,o; GRU r,z,n)
once per weight tensor. Valid only for the default activations, no clip, no peepholes, no
sequence lengths, layout 0; GRU additionally needs linear_before_reset=1 (cuDNN's form).
"""
from __future__ import annotations

import torch

from kiln.kernels.registry import tactic


def _ok(attrs, ctx, cell):
    ins = tuple(ctx.input_dtypes) + (None,) * 8
    if ins[4] is not None or ins[7] is not None:      # sequence lengths or peepholes: the loop tactic
        return False
    return (attrs.get("cell") == cell and not attrs.get("activations") and not attrs.get("clip")
            and not attrs.get("layout", 0) and not attrs.get("input_forget", 0)
            and (cell != "gru" or attrs.get("linear_before_reset", 0) == 1))


def _reorder(t, order, H):
    parts = t.split(H, dim=0)
    return torch.cat([parts[i] for i in order], 0)


def _make(attrs, ctx, cell):
    H = attrs["hidden_size"]
    bidir = attrs.get("direction", "forward") == "bidirectional"
    reverse = attrs.get("direction", "forward") == "reverse"
    order = (0, 2, 3, 1) if cell == "lstm" else (1, 0, 2)
    gates = 4 if cell == "lstm" else 3
    cache: dict = {}          # one entry: the last weights' repacking (constant weights hit it every run)

    def weights(W, R, B):
        key = (id(W), id(R), id(B))
        hit = cache.get(key)
        if hit is not None and hit[0] is W and hit[1] is R and hit[2] is B:
            return hit[3]
        dirs = W.shape[0]
        flat = []
        for d in range(dirs):
            b = B[d] if B is not None else torch.zeros(2 * gates * H, dtype=W.dtype, device=W.device)
            flat += [_reorder(W[d], order, H).contiguous(), _reorder(R[d], order, H).contiguous(),
                     _reorder(b[:gates * H], order, H).contiguous(), _reorder(b[gates * H:], order, H).contiguous()]
        if W.is_cuda and not W.is_meta:
            # One contiguous buffer in cuDNN's layout, the list's tensors becoming views into it (what
            # nn.LSTM.flatten_parameters does): torch.lstm otherwise copies every weight into such a
            # buffer on every call.
            from torch.backends.cudnn import rnn as cudnn_rnn
            with torch.no_grad():
                torch._cudnn_rnn_flatten_weight(flat, 4, W.shape[2], cudnn_rnn.get_cudnn_mode(cell.upper()), H, 0, 1,
                                                False, bidir)
        cache.clear()             # weights computed at run time are new tensors each run: keep none of theirs
        cache[key] = (W, R, B, flat)
        return flat

    def run(X, W, R, B=None, seq_lens=None, h0=None, c0=None, P=None):
        if seq_lens is not None or P is not None:
            raise RuntimeError("fused RNN tactic: sequence lengths and peepholes need the loop tactic")
        T, N, _ = X.shape
        dirs = 2 if bidir else 1
        if X.is_meta:
            e = lambda *shape: torch.empty(shape, dtype=X.dtype, device="meta")      # noqa: E731
            return (e(T, dirs, N, H), e(dirs, N, H), e(dirs, N, H)) if cell == "lstm" else (e(T, dirs, N, H),
                                                                                          e(dirs, N, H))
        x = torch.flip(X, [0]) if reverse else X
        h = h0 if h0 is not None else torch.zeros(dirs, N, H, dtype=X.dtype, device=X.device)
        flat = weights(W, R, B)
        if cell == "lstm":
            c = c0 if c0 is not None else torch.zeros(dirs, N, H, dtype=X.dtype, device=X.device)
            y, hn, cn = torch.lstm(x, (h.contiguous(), c.contiguous()), flat, True, 1, 0.0, False, bidir, False)
        else:
            y, hn = torch.gru(x, h.contiguous(), flat, True, 1, 0.0, False, bidir, False)
        if reverse:
            y = torch.flip(y, [0])
        Y = y.view(T, N, dirs, H).permute(0, 2, 1, 3)
        return (Y, hn, cn) if cell == "lstm" else (Y, hn)
    return run


@tactic("RNN", "fused_lstm", supports=lambda a, c: _ok(a, c, "lstm"), priority=-1)
def make_cudnn_lstm(attrs, ctx):
    return _make(attrs, ctx, "lstm")


@tactic("RNN", "fused_gru", supports=lambda a, c: _ok(a, c, "gru"), priority=-1)
def make_cudnn_gru(attrs, ctx):
    return _make(attrs, ctx, "gru")
