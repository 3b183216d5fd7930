"""DynamicQuantizeLSTM (ONNX Runtime's com.microsoft contrib op) computed the way ONNX Runtime's CPU kernel does.

W [dirs, input, 4H] and R [dirs, H, 4H] hold 8-bit codes (int8 or uint8) with a float32 scale per direction or
per column and one zero point per direction. Each matrix product quantizes its float operand to uint8 from that
operand's own range, as DynamicQuantizeLinear does (range widened to hold 0, scale = (max - min) / 255, zero point
round-half-even(-min / scale), codes round-half-even(x / scale) + zero point, saturated), multiplies the codes
minus their zero points exactly, and scales the integer sums by float32(operand scale · weight scale):

- the input product once per direction over the first max(sequence_lens) steps of X (every batch row),
- the recurrent product once per step and direction over that step's hidden-state rows (the previous step's
  outputs: zeros for a row whose sequence has ended, or the held state where the node has no Y output), added
  into the step's input product; then the folded bias (Wb + Rb), the peepholes, clip and the gate activations
  of ONNX's LSTM (gate order i, o, f, c).

Integer sums are computed as a float product of the zero-point-corrected codes: in float32 when no partial sum
of a weight column can exceed 2**24 (exact), else in float64. The float steps keep ONNX Runtime's order of
operations (``((x·W + h·R) + peephole·c) + bias``, ``c = c·f + i·g``, ``h = tanh(c)·o``). Both directions run
in the same step loop, batched along the direction axis. The layer computes in float32 whatever its inputs'
float type, and returns that type.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from kiln.errors import ShapeError
from kiln.kernels._util import per_tensor
from kiln.kernels.registry import tactic
from kiln.kernels.rnn import _acts, check_rnn_input

EXACT_F32 = float(1 << 24)     # float32 holds every integer up to this exactly


def quantize_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per leading index of ``a`` [D, ...] (float32): the uint8 codes minus their zero point (float32) and the
    scale [D], as ONNX Runtime's dynamic quantization computes them over each a[d]."""
    flat = a.reshape(a.shape[0], -1)
    if flat.shape[1]:
        lo, hi = torch.aminmax(flat, dim=1)
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    else:
        lo = hi = flat.new_zeros(flat.shape[0])
    scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 255.0)
    zp = torch.round(torch.clamp((0.0 - lo) / scale, 0.0, 255.0))
    shape = (-1,) + (1,) * (a.dim() - 1)
    s, z = scale.reshape(shape), zp.reshape(shape)
    centered = torch.clamp(torch.round(a / s), -z, 255.0 - z)
    return centered, scale


def centered_weights(w: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """W's codes minus their zero point (one per direction), as float32 where every partial sum of a product
    with codes in [-255, 255] stays exact in float32, else float64."""
    z = zp.reshape(zp.shape[0], -1)[:, :1].to(torch.float64).unsqueeze(-1)       # [D, 1, 1]
    wc = w.to(torch.float64) - z
    worst = 255.0 * float(wc.abs().sum(dim=1).max()) if wc.numel() else 0.0
    return wc.to(torch.float32) if worst < EXACT_F32 else wc


# ONNX Runtime's logistic and tanh (MLAS, x86-64 FMA3 kernels): odd rational polynomials on a clamped input,
# Horner steps as fused multiply-adds (emulated in float64: each product of two float32 values is exact there)
_LOGISTIC_P = (4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05, 8.51377133304701e-03,
               2.48287947061529e-01)
_LOGISTIC_Q = (6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06, 1.70198817374094e-03,
               1.16817656904453e-01, 9.93151921023180e-01)
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


def _horner(x2: torch.Tensor, coefs: tuple[float, ...]) -> torch.Tensor:
    """c0·x2^n + ... + cn in float32, each step fma(x2, acc, c) rounded once to float32."""
    f32 = torch.float32
    x2d = x2.to(torch.float64)
    acc = torch.full_like(x2, float(torch.tensor(coefs[0], dtype=f32)))
    for c in coefs[1:]:
        acc = torch.addcmul(x2d.new_tensor(float(torch.tensor(c, dtype=f32))), x2d, acc.to(torch.float64)).to(f32)
    return acc


def _rational(x: torch.Tensor, bound: float, p: tuple[float, ...], q: tuple[float, ...]) -> torch.Tensor:
    """(x·P(x²)) / Q(x²) with x clamped to ±bound, float32."""
    x = x.clamp(-bound, bound)
    x2 = x * x
    return (x * _horner(x2, p)) / _horner(x2, q)


def ort_logistic(x: torch.Tensor) -> torch.Tensor:
    """ONNX Runtime's sigmoid: max(0, x·P(x²)/Q(x²) + 0.5) on x clamped to ±18."""
    return (_rational(x, 18.0, _LOGISTIC_P, _LOGISTIC_Q) + 0.5).clamp(min=0.0)


def ort_tanh(x: torch.Tensor) -> torch.Tensor:
    """ONNX Runtime's tanh: x·P(x²)/Q(x²) on x clamped to ±9."""
    return _rational(x, 9.0, _TANH_P, _TANH_Q)


def _gate_fns(attrs: dict[str, Any], dirs: int) -> list[list[Callable]]:
    """Per direction the f, g, h activations: ONNX Runtime's sigmoid and tanh, the others as kernels/rnn.py
    computes them."""
    fns = _acts(attrs, "lstm", dirs)
    names = attrs.get("activations") or ["sigmoid", "tanh", "tanh"] * dirs
    exact = {"sigmoid": ort_logistic, "tanh": ort_tanh}
    return [[exact.get(names[3 * d + k].lower(), fns[d][k]) for k in range(3)] for d in range(dirs)]


def _scales(s: torch.Tensor, dirs: int) -> torch.Tensor:
    """The weight scale as [D, 1, 4H] (per column) or [D, 1, 1] (per direction), float32."""
    s = s.to(torch.float32)
    return s.reshape(dirs, 1, -1)


def _product(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float32 of the exact integer product of centered codes ``a`` [D, M, K] and ``w`` [D, K, N]."""
    if w.dtype == torch.float64:
        return torch.bmm(a.to(torch.float64), w).to(torch.float32)
    return torch.bmm(a, w)


@tactic("DynamicQuantizeLSTM")
def make_dynamic_quantize_lstm(attrs: dict[str, Any], ctx) -> Callable[..., tuple]:
    """The step loop described in the module docstring (every device)."""
    H = attrs["hidden_size"]
    direction = attrs.get("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    reverse = [direction == "reverse" or d == 1 for d in range(dirs)]
    clip = attrs.get("clip")
    input_forget = bool(attrs.get("input_forget", 0))
    hold = not attrs.get("sequence_output", True)
    acts = _gate_fns(attrs, dirs)
    f_act, g_act, h_act = ([a[k] for a in acts] for k in range(3))
    same = all(f is f_act[0] for f in f_act) and all(g is g_act[0] for g in g_act) and \
        all(h is h_act[0] for h in h_act)
    cache: dict = {}

    def per_dir(fns, v: torch.Tensor) -> torch.Tensor:
        """fns[d](v[d]) for each direction (one call where every direction has the same function)."""
        if same or dirs == 1:
            return fns[0](v)
        return torch.stack([fns[d](v[d]) for d in range(dirs)])

    def run(X, W, R, B=None, seq_lens=None, h0=None, c0=None, P=None, w_scale=None, w_zp=None, r_scale=None,
            r_zp=None):
        check_rnn_input(X, "lstm")
        T, N, I = X.shape
        out_dt = X.dtype
        if X.is_meta:
            z = X.new_empty(dirs, N, H)
            return X.new_empty(T, dirs, N, H), z, z.clone()
        if W.shape != (dirs, I, 4 * H) or R.shape != (dirs, H, 4 * H):
            raise ShapeError(f"DynamicQuantizeLSTM needs W of shape [{dirs}, {I}, {4 * H}] and R of shape "
                             f"[{dirs}, {H}, {4 * H}] for X {list(X.shape)}; got {list(W.shape)} and {list(R.shape)}.")
        dev, f32 = X.device, torch.float32
        x = X.to(f32)
        wc = per_tensor(cache, W, lambda: centered_weights(W, w_zp))
        rc = per_tensor(cache, R, lambda: centered_weights(R, r_zp))
        ws, rs = _scales(w_scale, dirs), _scales(r_scale, dirs)
        bias = None
        if B is not None:
            bias = (B[:, :4 * H].to(f32) + B[:, 4 * H:].to(f32)).unsqueeze(1)        # [D, 1, 4H]
        lens = seq_lens.to(torch.int64).to(dev) if seq_lens is not None else None
        if lens is not None and N and (lens.min() < 0 or lens.max() > T):
            raise ShapeError(f"DynamicQuantizeLSTM sequence_lens must lie in [0, {T}]; got {lens.tolist()}.")
        L = int(lens.max()) if lens is not None and N else T
        steps = torch.arange(L, device=dev)
        # time index each (direction, step, row) reads and writes: ONNX Runtime's reversed sequences
        tidx = steps.reshape(1, L, 1).expand(dirs, L, N).clone()
        for d in range(dirs):
            if reverse[d]:
                if lens is None:
                    tidx[d] = (L - 1 - steps).reshape(L, 1)
                else:
                    back = lens.reshape(1, N) - 1 - steps.reshape(L, 1)
                    tidx[d] = torch.where(back >= 0, back, steps.reshape(L, 1))
        # input product over X[:L], quantized once (the same values feed both directions)
        xq, xs = quantize_rows(x[:L].reshape(1, L * N, I))
        xw = _product(xq.expand(dirs, -1, -1), wc) * (xs.reshape(1, 1, 1) * ws)      # [D, L*N, 4H]
        xw = xw.reshape(dirs, L, N, 4 * H)
        gidx = tidx.reshape(dirs, L, N, 1).expand(dirs, L, N, 4 * H)
        xw = torch.gather(xw, 1, gidx)                                                 # step order
        h = h0.to(f32).clone() if h0 is not None else x.new_zeros(dirs, N, H)
        c = c0.to(f32).clone() if c0 is not None else x.new_zeros(dirs, N, H)
        pi = po = pf = None
        if P is not None:
            pi, po, pf = (p.unsqueeze(1) for p in P.to(f32).reshape(dirs, 3, H).unbind(1))
        ys = x.new_zeros(L, dirs, N, H)
        last_h = h.clone() if lens is not None else None
        a = h
        for s in range(L):
            aq, a_s = quantize_rows(a)
            pre = xw[:, s] + _product(aq, rc) * (a_s.reshape(dirs, 1, 1) * rs)
            gi, go, gf, gc = pre.split(H, -1)
            if pi is not None:
                gi = gi + pi * c
                gf = gf + pf * c
            if bias is not None:
                bi, bo, bf, bc = bias.split(H, -1)
                gi, gf, gc = gi + bi, gf + bf, gc + bc
            if clip:
                gi, gf, gc = gi.clamp(-clip, clip), gf.clamp(-clip, clip), gc.clamp(-clip, clip)
            ig = per_dir(f_act, gi)
            fg = 1.0 - ig if input_forget else per_dir(f_act, gf)
            cn = c * fg + ig * per_dir(g_act, gc)
            if pi is not None:
                go = go + po * cn
            if bias is not None:
                go = go + bo
            if clip:
                go = go.clamp(-clip, clip)
            hn = per_dir(h_act, cn) * per_dir(f_act, go)
            if lens is None:
                c, a = cn, hn
                ys[s] = hn
                continue
            live = (lens > s).reshape(1, N, 1)
            c = torch.where(live, cn, c)
            yn = torch.where(live, hn, torch.zeros_like(hn))
            ys[s] = yn
            last_h = torch.where(live, hn, last_h)
            a = torch.where(live, hn, a) if hold else yn
        Y = x.new_zeros(T, dirs, N, H)
        if L:
            yidx = tidx.permute(1, 0, 2).reshape(L, dirs, N, 1).expand(L, dirs, N, H)
            Y[:L] = torch.gather(ys, 0, yidx)          # the step order is its own inverse
        if lens is None:
            Yh = ys[L - 1].clone() if L else h
        else:
            Yh = torch.where((lens > 0).reshape(1, N, 1), last_h, torch.zeros_like(last_h))
            c = torch.where((lens > 0).reshape(1, N, 1), c, torch.zeros_like(c))
        return Y.to(out_dt), Yh.to(out_dt), c.to(out_dt)
    return run
