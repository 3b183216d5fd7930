"""One-hot GEMMs as row gathers, and element-wise work on gathered rows moved onto the table.

Cases:
- ``Cast(Equal(i, arange(K))) @ W`` (jax2tf's ``one_hot``: an integer tensor ``i`` whose last axis is 1
  compared with a constant ``0, 1, …, K-1`` laid along the last axis, cast to W's float type, times a
  constant finite [K, N] weight, or [N, K] with transpose_b) → ``Gather(W′, min(max(squeeze(i), -1), K))``
  with W′ = W and a zero row appended: an index outside [0, K) matches no column of the one-hot, so its
  product is a zero row, and -1 (wrapping to row K) and K both read that row;
- an element-wise layer (ElementWise, Unary, Activation, Cast) whose every operand is either a gather of rows
  ``T[i]`` (axis 0, the same index tensor ``i``, tables computed from constants alone with the same row count
  and rank) or a constant that is 1 along the index axes → ``Gather(op(T, …), i)``: the op runs once per
  table row at build time (constant folding evaluates the new layer) instead of once per gathered row. Only
  where the tables have no more rows than ``i`` has elements (the fold never adds work), so magika's bias and
  tanh-GELU after its one-hot Dense become part of one 258-row table.
Declined (and why, with ``KILN_LOG=passes``): a constant that is not 0..K-1, a non-integer index, a Cast to
another type, a weight with inf or NaN (0·inf is NaN in the one-hot product), a transposed one-hot.
"""
from __future__ import annotations

import math

import numpy as np

from kiln.ir.network import Layer, Network, Tensor
from kiln.passes._match import remove_dead, substitute
from kiln.passes.rewrite import ANY, ConstTensor, Match, Op, Rule, RulePass, Var

INTS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
FLOATS = ("float32", "float16", "bfloat16", "float64")
ELEMENTWISE = ("ElementWise", "Unary", "Activation", "Cast")
MAX_DEPTH = 32          # how far back a table is followed to the constants it is computed from


def _static(t: Tensor | None) -> tuple[int, ...] | None:
    if t is None or t.shape is None or not all(isinstance(d, int) for d in t.shape):
        return None
    return tuple(t.shape)


def _place_before(net: Network, layer: Layer, before: Layer) -> None:
    net.layers.remove(layer)
    net.layers.insert(net.layers.index(before), layer)


# ---- one-hot @ W → gather ------------------------------------------------------------------------
def _is_arange(t: Tensor) -> int | None:
    """K when ``t`` is a constant integer [1, …, 1, K] holding 0, 1, …, K-1; else None."""
    if not t.is_constant or t.dtype not in INTS:
        return None
    v = np.asarray(t.value)
    if v.ndim == 0 or math.prod(v.shape[:-1]) != 1:
        return None
    k = v.shape[-1]
    return k if np.array_equal(v.reshape(-1), np.arange(k)) else None


def _onehot_fits(m: Match) -> str | None:
    mm, cast, w = m["mm"], m["cast"], m["w"]
    a, b = m["a"], m["b"]
    idx, c = (a, b) if b.is_constant else (b, a)
    if idx.is_constant or not c.is_constant:
        return "the Equal does not compare a computed tensor with a constant"
    if idx.dtype not in INTS:
        return "the compared tensor is not an integer tensor"
    k = _is_arange(c)
    if k is None:
        return "the constant is not 0, 1, ..., K-1 along its last axis"
    if idx.rank is None or idx.rank < np.ndim(c.value) or idx.shape[-1] != 1:
        return "the index tensor's last axis is not 1 (or it has fewer axes than the constant)"
    if mm.attrs.get("transpose_a") or mm.attrs.get("activation"):
        return "the one-hot is transposed or the product has an epilogue"
    wv = np.asarray(w.value)
    if wv.ndim != 2 or wv.shape[1 if mm.attrs.get("transpose_b") else 0] != k:
        return "the weight is not a [K, N] matrix"
    if cast.attrs.get("to") != w.dtype or w.dtype not in FLOATS or mm.outputs[0].dtype != w.dtype:
        return "the Cast does not go to the weight's float type"
    if not np.isfinite(wv).all():
        return "the weight holds inf or NaN (the one-hot product turns 0·inf into NaN)"
    m["idx"], m["k"] = idx, k
    return None


def _onehot_to_gather(m: Match) -> None:
    net, mm, idx, k = m.net, m.root, m["idx"], m["k"]
    wv = np.asarray(m["w"].value)
    wv = wv.T if mm.attrs.get("transpose_b") else wv
    table = net.add_constant(np.concatenate([wv, np.zeros((1, wv.shape[1]), wv.dtype)]),
                             name=net.unique_name(m["w"].name + "_rows"))
    origin = [o for layer in (m["eq"], m["cast"], mm) for o in layer.origin]
    base = mm.name + "/onehot"
    steps: list[Layer] = []

    def step(kind: str, inputs: list, attrs: dict, what: str) -> Tensor:
        layer = net.add_layer(kind, inputs, attrs, name=net.unique_name(f"{base}/{what}"), origin=origin,
                              output_dtypes=[idx.dtype])
        layer.outputs[0].shape = tuple(idx.shape[:-1])
        steps.append(layer)
        return layer.outputs[0]

    i = step("Squeeze", [idx], {"axes": [idx.rank - 1]}, "squeeze")
    info = np.iinfo(np.dtype(idx.dtype))
    if info.min < 0:
        i = step("ElementWise", [i, net.add_constant(np.asarray(-1, idx.dtype))], {"op": "max"}, "low")
    if info.max > k:
        i = step("ElementWise", [i, net.add_constant(np.asarray(k, idx.dtype))], {"op": "min"}, "high")
    gather = net.add_layer("Gather", [table, i], {"axis": 0}, name=net.unique_name(base + "/gather"), origin=origin,
                           output_dtypes=[mm.outputs[0].dtype])
    for layer in steps:
        _place_before(net, layer, mm)
    substitute(net, gather, mm, mm.outputs, [mm, m["cast"], m["eq"]])


ONEHOT = Rule("cast(i == arange(K)) @ W -> gather(W + zero row, clamp(i))",
              Op("MatMul", Op("Cast", Op("ElementWise", Var("a"), Var("b"), op="equal", name="eq"), name="cast"),
                 ConstTensor("w"), name="mm"),
              _onehot_fits, _onehot_to_gather)


# ---- op(T[i], c) → op(T, c)[i] ----------------------------------------------------------------------
def _from_constants(t: Tensor | None) -> bool:
    """``t`` is a constant or computed by element-wise layers from constants alone (folded later), at most
    MAX_DEPTH layers back."""
    seen: set[int] = set()
    work = [(t, 0)]
    while work:
        x, depth = work.pop()
        if x is None:
            return False
        if x.is_constant or id(x) in seen:
            continue
        seen.add(id(x))
        p = x.producer
        if p is None or depth >= MAX_DEPTH or p.kind not in ELEMENTWISE:
            return False
        work.extend((i, depth + 1) for i in p.inputs)
    return True


def _gathered(t: Tensor) -> Layer | None:
    """The Gather producing ``t`` when it takes rows (axis 0) of a table computed from constants."""
    p = t.producer
    if p is None or p.kind != "Gather" or p.attrs.get("axis", 0) != 0 or len(p.inputs) != 2:
        return None
    return p if _static(p.inputs[0]) is not None and _from_constants(p.inputs[0]) else None


def _min_elements(t: Tensor) -> int:
    """Elements of ``t`` at its smallest: symbolic axes count as 1."""
    return math.prod(d if isinstance(d, int) else 1 for d in (t.shape or ()))


def _table_op_fits(m: Match) -> str | None:
    layer = m.root
    ins = layer.inputs
    if len(layer.outputs) != 1 or any(t is None for t in ins):
        return "not a one-output layer with every input given"
    gathers = [_gathered(t) for t in ins]
    if not any(gathers):
        return "no operand is a gather of table rows"
    found = [g for g in gathers if g is not None]
    idx = found[0].inputs[1]
    tables = [_static(g.inputs[0]) for g in found]
    if any(g.inputs[1] is not idx for g in found) or len({(s[0], len(s)) for s in tables}) != 1:
        return "the gathers read other indices or tables of other row counts or ranks"
    rows, row_rank = tables[0][0], len(tables[0]) - 1
    if idx.rank is None or rows > _min_elements(idx):
        return "the table has more rows than the gather reads"
    out_rank = idx.rank + row_rank
    for t, g in zip(ins, gathers):
        if g is not None:
            continue
        shape = _static(t)
        if shape is None or not _from_constants(t) or len(shape) > out_rank:
            return "an operand is neither a gather of rows nor a constant"
        lead = shape[:max(0, len(shape) - row_rank)]
        if any(d != 1 for d in lead) or (lead and not t.is_constant):
            return "a constant operand varies along the index axes"
    m["gathers"], m["idx"], m["rows"], m["row_rank"] = gathers, idx, rows, row_rank
    return None


def _op_on_table(m: Match) -> None:
    net, layer, idx, row_rank = m.net, m.root, m["idx"], m["row_rank"]
    inputs, shapes = [], []
    for t, g in zip(layer.inputs, m["gathers"]):
        if g is not None:
            t = g.inputs[0]
        elif len(t.shape) > row_rank:
            value = np.asarray(t.value)
            t = net.add_constant(value.reshape(value.shape[len(value.shape) - row_rank:]),
                                 name=net.unique_name(t.name + "_row"))
        inputs.append(t)
        shapes.append(tuple(t.shape))
    out = layer.outputs[0]
    on_table = net.add_layer(layer.kind, inputs, dict(layer.attrs), name=net.unique_name(layer.name + "/table"),
                             origin=layer.origin, output_dtypes=[out.dtype])
    on_table.outputs[0].shape = tuple(np.broadcast_shapes(*shapes))        # [rows, ...]: tables lead
    _place_before(net, on_table, layer)
    gather = net.add_layer("Gather", [on_table.outputs[0], idx], {"axis": 0},
                           name=net.unique_name(layer.name + "/gather"), origin=layer.origin, output_dtypes=[out.dtype])
    substitute(net, gather, layer, layer.outputs, [layer])
    remove_dead(net, [g for g in m["gathers"] if g is not None])


TABLE_OP = Rule("op(T[i], c) -> op(T, c)[i]", Op(ELEMENTWISE, ANY, ..., name="op"), _table_op_fits, _op_on_table)


class OneHotGather(RulePass):
    name = "one-hot gathers"
    rules = [ONEHOT, TABLE_OP]
