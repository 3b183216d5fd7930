"""Symbolic dims for shape-generic rewrites: a dim is an ``int`` or a ``Sym``, a monomial
``coef · s₁ · s₂ …`` over the network's input symbols (``B``, ``S``: the names its dynamic input
dims carry), each symbol a positive integer.

Every identity a rewrite relies on is an identity of monomials, so it holds for every binding of
the symbols, not only at sampled shapes: ``B·S·64 = (B·S)·4·16`` whatever B and S are. A dim
that is no monomial of the input symbols (``(H - 1) // 2 + 1`` after a strided convolution)
becomes an opaque symbol of its own, named after its tensor and axis: a positive integer about
which nothing else is known, so a rewrite may move it around whole but never equate it with
another dim or split it.

Host shape arithmetic (``Shape → Gather → Unsqueeze → Concat``, the reshape targets an exporter
computes from a dynamic input) is followed the same way by ``shape_value``.
"""
from __future__ import annotations

from collections import Counter
from typing import Union

from kiln.ir.network import Layer, Tensor


class Sym:
    """A monomial with at least one symbol: ``coef`` times the product of ``syms`` (sorted, repeats
    allowed). Plain integers stay ``int``; ``mul`` and ``quotient`` keep that normal form."""

    __slots__ = ("coef", "syms")

    def __init__(self, coef: int, syms: tuple[str, ...]) -> None:
        self.coef, self.syms = coef, tuple(sorted(syms))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sym) and (self.coef, self.syms) == (other.coef, other.syms)

    def __hash__(self) -> int:
        return hash((self.coef, self.syms))

    def __repr__(self) -> str:
        return "*".join(([str(self.coef)] if self.coef != 1 else []) + list(self.syms))

    def at(self, binding: dict[str, int]) -> int:
        v = self.coef
        for s in self.syms:
            v *= binding[s]
        return v


Dim = Union[int, Sym]


def dim(d: object) -> Dim | None:
    """An IR dim (int, symbol name, None) as a Dim; None stays None (unknown)."""
    if isinstance(d, bool):
        return None
    if isinstance(d, int):
        return d
    if isinstance(d, str) and d:
        return Sym(1, (d,))
    return None


def ir_dim(d: Dim) -> int | str | None:
    """A Dim as an IR dim: an int, a bare input symbol's name, or None for what the IR cannot spell
    (a product, an opaque dim)."""
    if isinstance(d, int):
        return d
    return d.syms[0] if d.coef == 1 and len(d.syms) == 1 and not d.syms[0].startswith(OPAQUE) else None


OPAQUE = "?"        # opaque symbols: "?<tensor name>:<axis>"


def sym_shape(t: Tensor | None) -> tuple[Dim, ...] | None:
    """``t``'s shape as Dims when every dim is known and positive, else None. A dim the IR leaves
    unknown (a product such as ``B·S``, a convolution's output size) is derived through the layers
    that produce ``t``, else opaque."""
    memo: dict[int, tuple[Dim, ...] | None] = {}
    chain, cur = [], t          # derive the first-input ancestors first, so no derivation recurses deep
    while cur is not None and cur.shape is not None and None in cur.shape and cur.producer is not None \
            and cur.producer.inputs and len(chain) < 100_000:
        chain.append(cur)
        cur = cur.producer.inputs[0]
    for c in reversed(chain[1:]):
        memo[id(c)] = _sym_shape(c, memo)
    return _sym_shape(t, memo)


def _sym_shape(t: Tensor | None, memo: dict) -> tuple[Dim, ...] | None:
    if t is None or t.shape is None:
        return None
    if id(t) in memo:
        return memo[id(t)]
    dims = tuple(dim(d) for d in t.shape)
    if any(d is None for d in dims):
        derived = _derived_shape(t.producer, memo) \
            if t.producer is not None and len(t.producer.outputs) == 1 else None
        if derived is not None and len(derived) == len(dims) \
                and all(d is None or d == e for d, e in zip(dims, derived)):
            dims = derived
        else:
            dims = tuple(Sym(1, (f"{OPAQUE}{t.name}:{i}",)) if d is None else d for i, d in enumerate(dims))
    if any(isinstance(d, int) and d <= 0 for d in dims):
        return None
    return dims


SAME_SHAPE = ("Activation", "Unary", "Normalization", "SoftMax", "Cast")


def _derived_shape(layer: Layer, memo: dict) -> tuple[Dim, ...] | None:
    """The output shape of a layer whose output dims follow from its input's: view layers, linear
    layers over the last axis, convolutions and pooling, layers that keep their input's shape."""
    if layer.kind in ("FullyConnected", "MatMul"):
        x, w = (_sym_shape(t, memo) for t in layer.inputs[:2])
        a = layer.attrs
        if x is None or w is None or len(w) != 2 or a.get("transpose_a"):
            return None
        n = w[0] if layer.kind == "FullyConnected" or a.get("transpose_b") else w[1]
        return x[:-1] + (n,)
    if layer.kind == "Gemm":
        x, w = (_sym_shape(t, memo) for t in layer.inputs[:2])
        a = layer.attrs
        if x is None or w is None or len(x) != 2 or len(w) != 2:
            return None
        return x[1] if a.get("trans_a") else x[0], w[0] if a.get("trans_b") else w[1]
    if layer.kind in ("Convolution", "Pooling"):
        return _window_shape(layer, _sym_shape(layer.inputs[0], memo))
    if layer.kind in SAME_SHAPE and layer.inputs:     # (a Normalization with a residual has two outputs)
        return _sym_shape(layer.inputs[0], memo)
    return _view_shape(layer, memo)


def _window_shape(layer: Layer, x: tuple[Dim, ...] | None) -> tuple[Dim, ...] | None:
    """A convolution's or pooling's output dims (NCHW); a fused stem pool (attr ``pool``) too."""
    a = layer.attrs
    if x is None or len(x) < 3 or a.get("auto_pad"):
        return None
    n = len(x) - 2
    if layer.kind == "Convolution":
        w = layer.inputs[1].shape
        if w is None or len(w) != len(x) or not all(isinstance(d, int) for d in w):
            return None
        kernel, channels = list(w[2:]), w[0]
    else:
        kernel, channels = a.get("kernel"), x[1]
        if kernel is None:                          # global pooling
            return x[:2] + (1,) * n
    if a.get("ceil_mode") or len(kernel) != n:
        return None
    dims = [_window(x[2 + i], kernel[i], (a.get("stride") or [1] * n)[i], (a.get("pads") or [0] * 2 * n)[i]
                    + (a.get("pads") or [0] * 2 * n)[i + n], (a.get("dilation") or [1] * n)[i]) for i in range(n)]
    pool = a.get("pool") if layer.kind == "Convolution" else None
    if pool:
        p = pool.get("pads") or [0] * 2 * n
        dims = [_window(d, pool["kernel"][i], pool.get("stride", pool["kernel"])[i], p[i] + p[i + n], 1)
                for i, d in enumerate(dims)]
    return (x[0], channels, *dims)


def _window(d: Dim, k: int, s: int, pad: int, dil: int) -> Dim:
    """``(d + pad - dil·(k - 1) - 1) // s + 1``: an int, ``d`` itself, or a symbol named after the formula
    and ``d`` (the same formula of the same dim is the same symbol)."""
    c = pad - dil * (k - 1) - 1
    if isinstance(d, int):
        return (d + c) // s + 1
    if s == 1 and c == -1:
        return d
    return Sym(1, (f"{OPAQUE}({d!r}{c:+d})//{s}+1",))


def _view_shape(layer: Layer, memo: dict) -> tuple[Dim, ...] | None:
    """The output shape of a view layer from its input's, or None."""
    src = _sym_shape(layer.inputs[0], memo) if layer.inputs else None
    return None if src is None else view_shape(layer, src)


def view_shape(layer: Layer, src: tuple[Dim, ...]) -> tuple[Dim, ...] | None:
    """The output shape of a view layer (Identity, Select, Flatten, Squeeze, Unsqueeze, Shuffle) whose
    input has shape ``src``, or None."""
    a, r = layer.attrs, len(src)
    if layer.kind == "Identity":
        return src
    if layer.kind == "Select":
        axis = a.get("axis", 0)
        return src[:axis % r] + src[axis % r + 1:] if -r <= axis < r else None
    if layer.kind == "Flatten":
        axis = a.get("axis", 1)
        axis = axis + r if axis < 0 else axis
        return (product(src[:axis]), product(src[axis:])) if 0 <= axis <= r else None
    if layer.kind in ("Squeeze", "Unsqueeze"):
        axes = a.get("axes")
        if axes is None or len(layer.inputs) > 1:
            return None
        if layer.kind == "Squeeze":
            axes = {x % r for x in axes}
            return None if any(src[i] != 1 for i in axes) else tuple(d for i, d in enumerate(src) if i not in axes)
        n = r + len(axes)
        axes = sorted(x % n for x in axes)
        out, it = [], iter(src)
        for i in range(n):
            out.append(1 if i in axes else next(it))
        return tuple(out)
    if layer.kind != "Shuffle":
        return None
    p1, p2 = a.get("first_transpose"), a.get("second_transpose")
    dims = src[::-1] if p1 == "reverse" else tuple(src[i] for i in p1) if p1 is not None else src
    spec = a.get("reshape")
    if spec is None and len(layer.inputs) > 1 and layer.inputs[1] is not None:
        value = shape_value(layer.inputs[1])
        spec = list(value[0]) if value is not None and not value[1] else None
        if spec is None:
            return None
    if spec is not None:
        dims = reshape_target(dims, list(spec), bool(a.get("allowzero")))
    if dims is not None and p2 is not None:
        dims = tuple(dims[i] for i in p2) if sorted(p2) == list(range(len(dims))) else None
    return dims


def mul(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    ca, sa = (a, ()) if isinstance(a, int) else (a.coef, a.syms)
    cb, sb = (b, ()) if isinstance(b, int) else (b.coef, b.syms)
    return Sym(ca * cb, sa + sb) if ca * cb else 0


def product(dims) -> Dim:
    p: Dim = 1
    for d in dims:
        p = mul(p, d)
    return p


def quotient(a: Dim, b: Dim) -> Dim | None:
    """``a / b`` when it is a monomial for every binding (b divides a exactly), else None."""
    if isinstance(b, int):
        if b == 0:
            return None
        if isinstance(a, int):
            return a // b if a % b == 0 else None
        return Sym(a.coef // b, a.syms) if a.coef % b == 0 else None
    if isinstance(a, int):
        return None
    rest = Counter(a.syms)
    rest.subtract(Counter(b.syms))
    if any(n < 0 for n in rest.values()) or a.coef % b.coef:
        return None
    syms = tuple(rest.elements())
    return Sym(a.coef // b.coef, syms) if syms else a.coef // b.coef


def nontrivial(d: Dim) -> bool:
    """Whether ``d`` is more than a size-1 dim at some binding (every symbolic dim is)."""
    return not isinstance(d, int) or d > 1


def concrete(d: Dim, binding: dict[str, int]) -> int:
    return d if isinstance(d, int) else d.at(binding)


def symbols(dims) -> list[str]:
    return sorted({s for d in dims if isinstance(d, Sym) for s in d.syms})


def sample_binding(dims) -> dict[str, int]:
    """Distinct primes > 5 for the symbols of ``dims``: a generic shape (no size-1 dim, no accidental
    equality) at which to ask torch whether a step copies."""
    primes = [7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47]
    return {s: primes[i % len(primes)] + 48 * (i // len(primes)) for i, s in enumerate(symbols(dims))}


def reshape_attr(src: tuple[Dim, ...], target: tuple[Dim, ...]) -> list[int] | None:
    """A Shuffle ``reshape`` attribute (``allowzero`` off) that takes ``src`` to ``target`` at every
    binding: static dims as they are, a dim equal to the source's dim at its position as 0 (copied),
    one other as -1 (inferred from the element count, which ``target`` keeps). None when that cannot
    be said."""
    out: list[int] = []
    free = []
    for i, d in enumerate(target):
        if isinstance(d, int) and d <= 0:
            return None             # an empty dim would read as "copy" (0) or "infer" (-1)
        if isinstance(d, int):
            out.append(d)
        elif i < len(src) and src[i] == d:
            out.append(0)
        else:
            free.append(i)
            out.append(-1)
    if len(free) > 1 or free and product(target) != product(src):
        return None
    return out


def reshape_target(src: tuple[Dim, ...], spec: list[Dim], allowzero: bool) -> tuple[Dim, ...] | None:
    """The shape a reshape to ``spec`` (ONNX semantics: 0 copies unless ``allowzero``, -1 infers) gives
    a source of shape ``src``, or None when a dim is not a monomial."""
    dims: list[Dim | None] = []
    for i, d in enumerate(spec):
        if d == 0 and not allowzero:
            if i >= len(src):
                return None
            dims.append(src[i])
        elif d == -1:
            dims.append(None)
        elif isinstance(d, int) and d < 0 or isinstance(d, Sym) and d.coef <= 0:
            return None
        else:
            dims.append(d)
    if dims.count(None) > 1:
        return None
    if None in dims:
        rest = quotient(product(src), product(d for d in dims if d is not None))
        if rest is None:
            return None
        dims[dims.index(None)] = rest
    elif product(dims) != product(src):
        return None
    return tuple(dims)


# ---- host shape arithmetic ---------------------------------------------------------------------
Value = tuple[tuple[Dim, ...], bool]       # (elements, is a scalar)


def shape_value(t: Tensor | None, memo: dict[int, Value | None] | None = None) -> Value | None:
    """The value of a host integer tensor of rank 0 or 1 as Dims, when its producers are shape
    arithmetic that monomials can follow; else None."""
    if t is None:
        return None
    memo = {} if memo is None else memo
    if id(t) not in memo:
        memo[id(t)] = None          # a cycle cannot happen in a DAG; this also bounds the recursion
        memo[id(t)] = _value(t, memo)
    return memo[id(t)]


def _value(t: Tensor, memo: dict) -> Value | None:
    if t.is_constant:
        import numpy as np
        v = np.asarray(t.value)
        if v.dtype.kind not in "iub" or v.ndim > 1 or v.size > 64:
            return None
        return tuple(int(x) for x in v.reshape(-1)), v.ndim == 0
    layer = t.producer
    if layer is None or len(layer.outputs) != 1:
        return None
    rule = _RULES.get(layer.kind)
    return rule(layer, [shape_value(x, memo) if x is not None else None for x in layer.inputs]) if rule else None


def _shape(layer: Layer, ins) -> Value | None:
    dims = sym_shape(layer.inputs[0])
    if dims is None:
        return None
    r = len(dims)
    s, e = layer.attrs.get("start", 0) or 0, layer.attrs.get("end")
    s = max(0, min(r, s + r if s < 0 else s))
    e = r if e is None else max(0, min(r, e + r if e < 0 else e))
    return dims[s:e], False


def _index(v: Value, i: Dim) -> Dim | None:
    if not isinstance(i, int) or not -len(v[0]) <= i < len(v[0]):
        return None
    return v[0][i]


def _select(layer: Layer, ins) -> Value | None:
    v = ins[0]
    if v is None or v[1] or layer.attrs.get("axis", 0) not in (0, -1):
        return None
    d = _index(v, int(layer.attrs["index"]))
    return None if d is None else ((d,), True)


def _gather(layer: Layer, ins) -> Value | None:
    v, idx = ins
    if v is None or idx is None or v[1] or layer.attrs.get("axis", 0) not in (0, -1):
        return None
    out = [_index(v, i) for i in idx[0]]
    return None if None in out else (tuple(out), idx[1])


def _same(layer: Layer, ins) -> Value | None:
    """Unsqueeze/Squeeze/Flatten/Identity/Cast/a reshape: the same elements at rank 0 or 1."""
    v, out = ins[0], layer.outputs[0]
    if v is None or out.shape is None or len(out.shape) > 1:
        return None
    if layer.kind == "Cast" and layer.attrs.get("to") not in ("int64", "int32"):
        return None
    return v[0], len(out.shape) == 0


def _concat(layer: Layer, ins) -> Value | None:
    if any(v is None or v[1] for v in ins) or layer.attrs.get("axis") not in (0, -1):
        return None
    return tuple(d for v in ins for d in v[0]), False


def _slice(layer: Layer, ins) -> Value | None:
    v = ins[0]
    if v is None or v[1] or any(x is None or len(x[0]) != 1 or not isinstance(x[0][0], int) for x in ins[1:]):
        return None
    start, end = ins[1][0][0], ins[2][0][0]
    if len(ins) > 3 and ins[3][0][0] not in (0, -1):
        return None
    step = ins[4][0][0] if len(ins) > 4 else 1
    return (v[0][slice(start, end, step)], False) if step else None


def _positive(d: Dim) -> bool:
    return isinstance(d, Sym) and d.coef > 0 or isinstance(d, int) and d > 0


def _binary(op: str, a: Dim, b: Dim) -> Dim | None:
    if isinstance(a, int) and isinstance(b, int):
        import numpy as np
        x, y = np.int64(a), np.int64(b)
        if op in ("div", "floor_div", "mod") and y == 0:
            return None
        res = {"sum": x + y, "sub": x - y, "prod": x * y, "div": np.trunc(x / y) if op == "div" else 0,
               "floor_div": x // y, "mod": x % y, "max": max(x, y), "min": min(x, y), "equal": x == y,
               "greater": x > y, "less": x < y}.get(op)
        return None if res is None else int(res)
    if op == "prod":
        return mul(a, b)
    if op in ("div", "floor_div"):
        return quotient(a, b)
    if op == "equal":
        if a == b:
            return 1
        if isinstance(a, int) and a <= 0 and _positive(b) or isinstance(b, int) and b <= 0 and _positive(a):
            return 0
        return None
    if op in ("max", "min") and isinstance(a, int):
        a, b = b, a
    if op in ("max", "min") and isinstance(b, int) and b <= 1 and _positive(a):
        return a if op == "max" else b          # a symbolic dim is at least 1
    return None


def _broadcast(ins) -> list[tuple[Dim, ...]] | None:
    if any(v is None for v in ins):
        return None
    n = max(len(v[0]) for v in ins)
    if any(len(v[0]) not in (1, n) for v in ins):
        return None
    return [v[0] * n if len(v[0]) == 1 else v[0] for v in ins]


def _elementwise(layer: Layer, ins) -> Value | None:
    cols = _broadcast(ins) if len(ins) == 2 else None
    if cols is None:
        return None
    out = [_binary(layer.attrs["op"], a, b) for a, b in zip(*cols)]
    return None if None in out else (tuple(out), all(v[1] for v in ins))


def _where(layer: Layer, ins) -> Value | None:
    cols = _broadcast(ins)
    if cols is None or not all(isinstance(c, int) for c in cols[0]):
        return None
    return tuple(a if c else b for c, a, b in zip(*cols)), all(v[1] for v in ins)


_RULES = {"Shape": _shape, "Select": _select, "Gather": _gather, "Unsqueeze": _same, "Squeeze": _same,
          "Flatten": _same, "Identity": _same, "Cast": _same, "Shuffle": _same, "Concatenation": _concat,
          "Slice": _slice, "ElementWise": _elementwise, "Where": _where}
