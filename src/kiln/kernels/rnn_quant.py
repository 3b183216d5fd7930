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

The hidden state is quantized over all batch rows at once, as ONNX Runtime does with one intra-op thread or one
batch row. With more threads and a batch of 5 or more (2 or more where H <= 256) ONNX Runtime quantizes each
thread's share of the rows separately, so its own result depends on its thread count (batch 6, H=4: 2.3e-3
between 1 and 2 threads).

Integer sums are computed as a float product of the zero-point-corrected codes: in float32 when no partial sum
of a weight column can exceed 2**24 (exact), else in float64. The float steps keep ONNX Runtime's order of
operations (``((x·W + h·R) + peephole·c) + bias``, ``c = c·f + i·g``, ``h = tanh(c)·o``), and sigmoid and tanh
are ONNX Runtime's own rational approximations (``OrtRational``), so a hidden state matches bit for bit and
its codes never round differently (one code off changes that step's gates by up to 1e-3, which then compounds).
Both directions run in the same step loop, batched along the direction axis; with the default activations and
no peepholes the four gates' bias, clip and activations take one pass. The layer computes in float32 whatever
its inputs' float type, and returns that type.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from kiln.errors import ShapeError
from kiln.kernels.quantize import float32_exact
from kiln.kernels.registry import tactic
from kiln.kernels.rnn import _acts, check_rnn_input

def quantize_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per leading index of ``a`` [D, ...] (float32): the uint8 codes minus their zero point (float32), the scale
    [D] and the zero point (float32, shaped [D, 1, ...]), as ONNX Runtime's dynamic quantization computes them over
    each a[d]."""
    flat = a.reshape(a.shape[0], -1)
    if flat.shape[1]:
        lo, hi = torch.aminmax(flat, dim=1)
        lo, hi = lo.clamp_(max=0.0), hi.clamp_(min=0.0)
    else:
        lo = hi = flat.new_zeros(flat.shape[0])
    scale = torch.sub(hi, lo).div_(255.0).masked_fill_(hi == lo, 1.0)
    shape = (-1,) + (1,) * (a.dim() - 1)
    s = scale.reshape(shape)
    # ORT's round-half-even(clamp(-lo / scale, 0, 255)): -lo / scale lies in [0, 255] up to rounding, which the
    # rounding to an integer absorbs, and round(-v) = -round(v)
    z = torch.div(lo, scale).round_().neg_().reshape(shape)
    q = torch.div(a, s).round_().add_(z).clamp_(0.0, 255.0)
    return q.sub_(z), scale, z


def centered_weights(w: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """W's codes minus their zero point (one per direction), as float32 where every partial sum of a product
    with codes in [-255, 255] stays exact in float32 (``float32_exact``), else float64."""
    z = zp.reshape(zp.shape[0], -1)[:, :1].to(torch.float64).unsqueeze(-1)       # [D, 1, 1]
    wc = w.to(torch.float64) - z
    return wc.to(torch.float32) if float32_exact(wc) else wc


# ONNX Runtime's logistic and tanh (MLAS, x86-64 FMA3 kernels): odd rational polynomials on a clamped input whose
# Horner steps are fused multiply-adds. Per kind: clamp bound, P and Q coefficients (highest power first), the
# constant added to x·P/Q (-0.0: x + -0.0 is x, signed zeros too) and the floor applied after it.
_KINDS = {
    "logistic": (18.0, (4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05, 8.51377133304701e-03,
                        2.48287947061529e-01),
                 (6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06, 1.70198817374094e-03,
                  1.16817656904453e-01, 9.93151921023180e-01), 0.5, 0.0),
    "tanh": (9.0, (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
                   1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03),
             (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03), -0.0,
             float("-inf")),
}
_FUSED: dict[str, bool] = {}


def addcmul_is_fma(device: torch.device) -> bool:
    """Whether float32 ``torch.addcmul(c, a, b)`` on contiguous same-shape operands rounds a·b + c once (a fused
    multiply-add) on ``device``'s type, checked once on 4099 values (separate rounding differs on about a
    quarter of them)."""
    key = device.type
    if key not in _FUSED:
        g = torch.Generator().manual_seed(0)
        a, b, c = (torch.randn(4099, generator=g).to(device) for _ in range(3))
        exact = (a.double() * b.double() + c.double()).float()
        _FUSED[key] = bool(torch.equal(torch.addcmul(c, a, b), exact))
    return _FUSED[key]


class OrtRational:
    """ONNX Runtime's sigmoid ("logistic") or tanh over segments of the last axis, bit for bit: ``segments`` is
    [(kind, width), ...] (width None: the rest of the axis). Both kinds pad their polynomials with leading zero
    coefficients to one length (fma(x², 0, c) = c exactly), so a mixed axis (an LSTM's i, o, f and cell gates)
    takes one pass, and P and Q run their Horner steps side by side on a stacked [2, ...] tensor. Horner steps are float32 ``addcmul`` where that is a fused multiply-add on the device
    (``addcmul_is_fma``), else computed in float64 (a product of two float32 values is exact there) and rounded to
    float32 after each step. Per-column constants are kept for the last few input shapes."""

    def __init__(self, segments: list[tuple[str, int | None]]) -> None:
        self.segments = segments
        self.kept: dict[tuple, tuple] = {}

    def _rows(self, width: int) -> tuple[list, ...]:
        """Per column: the clamp bound, the P and Q coefficients (both padded to one length, highest power first),
        the offset and the floor."""
        kinds: list[str] = []
        for kind, n in self.segments:
            kinds += [kind] * (width - len(kinds) if n is None else n)
        if len(kinds) != width:
            raise ShapeError(f"An activation over {width} columns was set up for {len(kinds)}.")
        specs = [_KINDS[k] for k in kinds]
        n = max(len(sp[i]) for sp in specs for i in (1, 2))
        pad = lambda c: (0.0,) * (n - len(c)) + c       # noqa: E731
        coefs = [[[pad(sp[i])[j] for sp in specs] for i in (1, 2)] for j in range(n)]
        return [sp[0] for sp in specs], coefs, [sp[3] for sp in specs], [sp[4] for sp in specs]

    def _consts(self, x: torch.Tensor) -> tuple:
        key = (tuple(x.shape), x.device)
        hit = self.kept.get(key)
        if hit is None:
            if len(self.kept) >= 4:
                self.kept.clear()
            bound, coefs, offset, floor = self._rows(x.shape[-1])
            row = lambda v, dt=torch.float32: torch.tensor(v, dtype=torch.float32).to(dt).to(x.device)  # noqa: E731
            fused = addcmul_is_fma(x.device)
            pq = (2,) + (1,) * (x.dim() - 1) + (x.shape[-1],)       # P's row and Q's row for every column
            if fused:       # addcmul fuses only on contiguous operands of one shape: [2, *x.shape]
                stacked = [row(c).reshape(pq).expand((2,) + tuple(x.shape)).contiguous() for c in coefs]
            else:
                stacked = [row(c, torch.float64).reshape(pq) for c in coefs]
            tanh_only = all(kind == "tanh" for kind, _ in self.segments)
            hit = self.kept[key] = (fused, row(bound), stacked, None if tanh_only else (row(offset), row(floor)))
        return hit

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fused, bound, coefs, tail = self._consts(x)
        x = torch.clamp(x, -bound, bound)
        xs = x.expand((2,) + tuple(x.shape))
        x2 = xs * xs            # [2, *x.shape]: P and Q run their Horner steps side by side
        if fused:
            acc = torch.addcmul(coefs[1], x2, coefs[0])
            for c in coefs[2:]:
                acc = torch.addcmul(c, x2, acc)
        else:
            x2d = x2.double()
            acc = coefs[0].float().expand_as(x2)
            for c in coefs[1:]:
                acc = (x2d * acc.double() + c).float()
        y = torch.div(x * acc[0], acc[1])
        return y if tail is None else torch.maximum(y + tail[0], tail[1])


_LOGISTIC, _TANH = OrtRational([("logistic", None)]), OrtRational([("tanh", None)])


def ort_logistic(x: torch.Tensor) -> torch.Tensor:
    """ONNX Runtime's sigmoid: max(0, x·P(x²)/Q(x²) + 0.5) on x clamped to ±18."""
    return _LOGISTIC(x)


def ort_tanh(x: torch.Tensor) -> torch.Tensor:
    """ONNX Runtime's tanh: x·P(x²)/Q(x²) on x clamped to ±9."""
    return _TANH(x)


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


_INT_MM: list = []


def int8_products_exact() -> bool:
    """Whether ``torch._int_mm`` on the CPU returns exact int32 sums for int8 operands at their extremes (a kernel
    built on 16-bit pair sums without VNNI could saturate), checked once on [1 or 33, 512] x [512, 128]."""
    if not _INT_MM:
        ok = hasattr(torch, "_int_mm")
        if ok:
            try:
                g = torch.Generator().manual_seed(0)
                b = (torch.randint(0, 2, (512, 128), generator=g) * 255 - 128).to(torch.int8)
                for m in (1, 33):
                    a = (torch.randint(0, 2, (m, 512), generator=g) * 255 - 128).to(torch.int8)
                    ok = ok and torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())
            except RuntimeError:
                ok = False
        _INT_MM.append(ok)
    return _INT_MM[0]


# Per direction, float32 weights at least this large multiply as int8 on the CPU: a quarter of the bytes to stream
# per step wins there (BiLSTM H=512: 8.4 -> 6.9 ms, A/B p20), while at H=256 (1 MiB) the extra ops cost more (7.3
# -> 7.9 ms)
INT8_MIN_BYTES = 2 << 20


class _Weights:
    """W or R centered on its zero point: float32 (or float64) for ``_product``, and on the CPU, where the centered
    codes fit int8, a direction's float32 copy holds INT8_MIN_BYTES or more and ``int8_products_exact``, as int8
    with its column sums, for ``torch._int_mm``."""

    def __init__(self, w: torch.Tensor, zp: torch.Tensor) -> None:
        self.centered = wc = centered_weights(w, zp)
        self.w8 = None
        if w.device.type == "cpu" and wc.dtype == torch.float32 and wc[0].numel() * 4 >= INT8_MIN_BYTES \
                and float(wc.min()) >= -128 and float(wc.max()) <= 127 and int8_products_exact():
            self.w8 = wc.to(torch.int8).contiguous()
            self.colsum = wc.sum(dim=1, keepdim=True)        # [D, 1, N], exact: below 2**24 (float32_exact)

    def product(self, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """float32 of the exact integer product of centered codes ``c`` [D, M, K] (codes minus zero point ``z``,
        [D, 1, 1]) with these weights: as int8 (codes - 128) @ W + (128 - z)·colsum(W) where the int8 form
        exists. Every term is an integer below 2**24, so the float32 sum is exact."""
        if self.w8 is None:
            return _product(c, self.centered)
        t = 128.0 - z
        a8 = (c - t).to(torch.int8)
        acc = torch.stack([torch._int_mm(a8[d], self.w8[d]) for d in range(a8.shape[0])]).float()
        return torch.addcmul(acc, t, self.colsum)


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
    last: list = [None]     # (W, W zero point, R, R zero point, their _Weights) of the last call

    def weights(W, w_zp, R, r_zp) -> tuple["_Weights", "_Weights"]:
        hit = last[0]
        if hit is None or any(x is not y for x, y in zip(hit, (W, w_zp, R, r_zp))):
            hit = last[0] = (W, w_zp, R, r_zp, _Weights(W, w_zp), _Weights(R, r_zp))
        return hit[4], hit[5]

    def per_dir(fns, v: torch.Tensor) -> torch.Tensor:
        """fns[d](v[d]) for each direction (one call where every direction has the same function)."""
        if same or dirs == 1:
            return fns[0](v)
        return torch.stack([fns[d](v[d]) for d in range(dirs)])

    # default activations without input_forget: the gates take one OrtRational pass (peepholes decided at run time)
    plain = not attrs.get("activations") and not input_forget
    gates = OrtRational([("logistic", 3 * H), ("tanh", None)]) if plain else None

    def general_step(pre, c, pi, po, pf, bias):
        """One step's new cell and hidden state from the products' sum ``pre``: peepholes, per-gate bias and clip
        in ONNX Runtime's order, any activations, input_forget."""
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
        return cn, per_dir(h_act, cn) * per_dir(f_act, go)

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
        wc, rc = weights(W, w_zp, R, r_zp)
        ws, rs = _scales(w_scale, dirs), _scales(r_scale, dirs)
        bias = None
        if B is not None:
            bias = (B[:, :4 * H].to(f32) + B[:, 4 * H:].to(f32)).unsqueeze(1)        # [D, 1, 4H]
        lens = seq_lens.to(torch.int64).to(dev) if seq_lens is not None else None
        if lens is not None and N and dev.type == "cpu" and (lens.min() < 0 or lens.max() > T):
            raise ShapeError(f"DynamicQuantizeLSTM sequence_lens must lie in [0, {T}]; got {lens.tolist()}.")
        # every step runs (no read of the lengths on the host: a CUDA graph can hold the loop); steps past a row's
        # length leave its state alone and write zeros, as ONNX Runtime does
        L = T
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
        # input product, quantized once over X's first max(sequence_lens) steps (rows past it count as zeros, which
        # the range holds anyway; no live step reads them); the same values feed both directions
        if lens is not None and N:
            x = torch.where((steps < lens.max()).reshape(L, 1, 1), x, 0.0)
        xq, xs, xz = quantize_rows(x.reshape(1, L * N, I))
        xw = wc.product(xq.expand(dirs, -1, -1), xz) * (xs.reshape(1, 1, 1) * ws)     # [D, L*N, 4H]
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
        fast = gates is not None and P is None
        for s in range(L):
            aq, a_s, az = quantize_rows(a)
            pre = xw[:, s] + rc.product(aq, az) * (a_s.reshape(dirs, 1, 1) * rs)
            if fast:        # every gate's pre-activation at once, the four activations in one pass
                if bias is not None:
                    pre += bias
                if clip:
                    pre.clamp_(-clip, clip)
                ig, og, fg, gg = gates(pre).split(H, -1)
                cn = (c * fg).add_(ig * gg)
                hn = _TANH(cn).mul_(og)
            else:
                cn, hn = general_step(pre, c, pi, po, pf, bias)
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
