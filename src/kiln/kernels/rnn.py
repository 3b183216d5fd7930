"""RNN, GRU and LSTM with ONNX semantics (gate order, activations, directions, layouts)."""
from __future__ import annotations

import torch

from kiln.errors import BuildError, ShapeError
from kiln.kernels.pointwise import activation_fn
from kiln.kernels.registry import tactic

_DEFAULT_ACTS = {"rnn": ["tanh"], "gru": ["sigmoid", "tanh"], "lstm": ["sigmoid", "tanh", "tanh"]}
_ONNX_ACT = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "affine": "affine", "leakyrelu": "leaky_relu",
             "thresholdedrelu": "thresholded_relu", "scaledtanh": "scaled_tanh", "hardsigmoid": "hard_sigmoid",
             "elu": "elu", "softsign": "softsign", "softplus": "softplus"}
_DEFAULT_AB = {"leaky_relu": (0.01, 0.0), "thresholded_relu": (1.0, 0.0), "hard_sigmoid": (0.2, 0.5),
               "elu": (1.0, 0.0), "scaled_tanh": (1.0, 1.0), "affine": (1.0, 0.0)}


def _acts(attrs, cell, num_dirs):
    names = attrs.get("activations") or (_DEFAULT_ACTS[cell] * num_dirs)
    alphas = list(attrs.get("activation_alpha") or [])
    betas = list(attrs.get("activation_beta") or [])
    fns = []
    ai = bi = 0
    for n in names:
        kind = _ONNX_ACT.get(n.lower(), n.lower())
        da, db = _DEFAULT_AB.get(kind, (0.0, 0.0))
        a = alphas[ai] if ai < len(alphas) and kind in _DEFAULT_AB else da
        b = betas[bi] if bi < len(betas) and kind in ("hard_sigmoid", "scaled_tanh", "affine") else db
        if kind in _DEFAULT_AB:
            ai += 1
        if kind in ("hard_sigmoid", "scaled_tanh", "affine"):
            bi += 1
        if kind == "affine":
            fns.append(lambda x, a=a, b=b: a * x + b)
        else:
            fns.append(activation_fn(kind, a, b))
    per = len(_DEFAULT_ACTS[cell])
    return [fns[d * per:(d + 1) * per] for d in range(num_dirs)]


def check_rnn_input(X: torch.Tensor, cell: str, layout: int = 0) -> None:
    """Refuse an X that is not 3-D, naming the shape ONNX's RNN/GRU/LSTM takes."""
    if X.dim() != 3:
        want = "[batch_size, seq_length, input_size]" if layout else "[seq_length, batch_size, input_size]"
        raise ShapeError(f"The {cell.upper()} input X has shape {list(X.shape)}; it must be 3-D, {want}.")


@tactic("RNN")
def make_rnn(attrs, ctx):
    cell = attrs["cell"]
    if cell not in _DEFAULT_ACTS:
        raise BuildError(f"Unknown RNN cell {cell!r}; use rnn, gru or lstm.")
    direction = attrs.get("direction", "forward")
    num_dirs = 2 if direction == "bidirectional" else 1
    H = attrs["hidden_size"]
    clip = attrs.get("clip")
    lbr = attrs.get("linear_before_reset", 0)
    layout = attrs.get("layout", 0)
    input_forget = attrs.get("input_forget", 0)
    acts = _acts(attrs, cell, num_dirs)
    gates = {"rnn": 1, "gru": 3, "lstm": 4}[cell]

    def run(X, W, R, B=None, seq_lens=None, h0=None, c0=None, P=None):
        check_rnn_input(X, cell, layout)
        if layout:
            X = X.transpose(0, 1)
            h0 = h0.transpose(0, 1) if h0 is not None else None
            c0 = c0.transpose(0, 1) if c0 is not None else None
        T, N, _ = X.shape
        dt = X.dtype
        if B is None:
            B = torch.zeros(num_dirs, 2 * gates * H, dtype=dt, device=X.device)
        if h0 is None:
            h0 = torch.zeros(num_dirs, N, H, dtype=dt, device=X.device)
        if c0 is None and cell == "lstm":
            c0 = torch.zeros(num_dirs, N, H, dtype=dt, device=X.device)
        lens = seq_lens.to(torch.int64).to(X.device) if seq_lens is not None else None
        ys, hs, cs = [], [], []
        for d in range(num_dirs):
            reverse = direction == "reverse" or d == 1
            f = acts[d]
            Wd, Rd = W[d], R[d]
            Wb, Rb = B[d][:gates * H], B[d][gates * H:]
            xw = torch.matmul(X, Wd.t()) + Wb      # [T, N, gates*H]
            h = h0[d]
            c = c0[d] if cell == "lstm" else None
            out = [None] * T
            for step in range(T):
                t = T - 1 - step if reverse else step
                if lens is not None and reverse:
                    # reverse direction starts at each sequence's own last element
                    t_idx = (lens - 1 - step)
                    valid = t_idx >= 0
                    xt = xw[t_idx.clamp(min=0), torch.arange(N, device=X.device)]
                else:
                    valid = (lens > t) if lens is not None else None
                    xt = xw[t]
                hr = torch.matmul(h, Rd.t())
                if cell == "rnn":
                    pre = xt + hr + Rb
                    if clip:
                        pre = pre.clamp(-clip, clip)
                    hn, cn = f[0](pre), None
                elif cell == "gru":
                    xz, xr, xh = xt.split(H, -1)
                    rz, rr, rh = Rd.split(H, 0)
                    bz, br, bh = Rb.split(H, -1)
                    hz, hrr = torch.matmul(h, rz.t()) + bz, torch.matmul(h, rr.t()) + br
                    pz, pr = xz + hz, xr + hrr
                    if clip:
                        pz, pr = pz.clamp(-clip, clip), pr.clamp(-clip, clip)
                    z, r = f[0](pz), f[0](pr)
                    if lbr:
                        ph = xh + r * (torch.matmul(h, rh.t()) + bh)
                    else:
                        ph = xh + torch.matmul(r * h, rh.t()) + bh
                    if clip:
                        ph = ph.clamp(-clip, clip)
                    hh = f[1](ph)
                    hn, cn = (1 - z) * hh + z * h, None
                else:
                    pre = xt + hr + Rb
                    if clip:
                        pre = pre.clamp(-clip, clip)
                    i_, o_, f_, c_ = pre.split(H, -1)
                    if P is not None:
                        pi, po, pf = P[d].split(H, -1)
                        i_ = i_ + pi * c
                        f_ = f_ + pf * c
                    ig = f[0](i_)
                    fg = 1 - ig if input_forget else f[0](f_)
                    cn = fg * c + ig * f[1](c_)
                    if P is not None:
                        o_ = o_ + po * cn
                    hn = f[0](o_) * f[2](cn)
                if valid is not None:
                    m = valid.reshape(N, 1).to(hn.dtype)
                    hn = hn * m + h * (1 - m)
                    if cn is not None:
                        cn = cn * m + c * (1 - m)
                    y_t = hn * m
                else:
                    y_t = hn
                h, c = hn, cn
                if lens is not None and reverse:
                    out[step] = (y_t, t_idx)
                else:
                    out[t] = y_t
            if lens is not None and reverse:
                Y = torch.zeros(T, N, H, dtype=dt, device=X.device)
                for y_t, t_idx in out:
                    ok = t_idx >= 0
                    if ok.any():
                        Y[t_idx[ok], torch.arange(N, device=X.device)[ok]] = y_t[ok]
                ys.append(Y)
            else:
                ys.append(torch.stack(out) if T else torch.zeros(0, N, H, dtype=dt, device=X.device))
            hs.append(h)
            cs.append(c)
        Y = torch.stack(ys, 1)      # [T, dirs, N, H]
        Yh = torch.stack(hs, 0)
        outs = [Y, Yh]
        if cell == "lstm":
            outs.append(torch.stack(cs, 0))
        if layout:
            outs = [Y.permute(2, 0, 1, 3)] + [o.transpose(0, 1) for o in outs[1:]]
        return tuple(outs)
    return run
