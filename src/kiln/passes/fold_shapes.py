"""Shape arithmetic over dynamic dims, folded where its value holds for every shape (passes/symbolic.py
proves it on monomials of the input symbols).

Cases:
- a host integer value (rank 0 or 1) computed from shapes whose every element is static
  (``Shape(x)[-1]`` of ``x: [B, 4, S, 16]`` is 16) → a constant, which constant folding carries on;
- a Shuffle whose reshape target is computed on the host (``Shape → Gather → Concat``) → a static
  ``reshape`` attribute holding the same target at every shape: static dims, 0 for a dim copied from
  the input at its position, -1 for the one dim left;
- an Expand whose target is its input's shape (or broadcasts nothing) at every shape → removed;
- a Gather of a table's rows by positions sliced from a constant ``arange`` as long as the table
  (BERT's ``position_ids[:, :S]``, which a static build folds) → a Slice of the table, a view.
The arithmetic nothing reads any more goes with them.
"""
from __future__ import annotations

import numpy as np

from kiln.passes._match import remove_computation, remove_dead, replace_output
from kiln.passes.rewrite import Match, Op, Rule, RulePass, Var
from kiln.passes.symbolic import reshape_attr, reshape_target, shape_value, sym_shape

ARITHMETIC = ("Shape", "Select", "Gather", "Slice", "Concatenation", "Unsqueeze", "Squeeze", "Flatten", "Cast",
              "ElementWise", "Where", "Shuffle")
INTS = {"int64": np.int64, "int32": np.int32}


def _static_value(m: Match) -> str | None:
    out = m.root.outputs[0]
    if len(m.root.outputs) != 1 or out.dtype not in INTS or out.shape is None or len(out.shape) > 1:
        return "not an integer value of rank 0 or 1"
    if all(t is None or t.is_constant for t in m.root.inputs) and m.root.kind != "Shape":
        return "its inputs are constants (constant folding's case)"
    value = shape_value(out)
    if value is None or not all(isinstance(d, int) for d in value[0]):
        return "its value depends on a dynamic dim"
    m.update(value=np.asarray(value[0][0] if value[1] else list(value[0]), INTS[out.dtype]))
    return None


def _to_constant(m: Match) -> None:
    out = m.root.outputs[0]
    const = m.net.add_constant(m["value"], name=m.net.unique_name(out.name + "_folded"))
    replace_output(m.net, out, const)
    remove_computation(m.net, out)


def _reshape_input(layer) -> tuple | None:
    """The dims a Shuffle's reshape sees: its input's, after the first transpose."""
    dims = sym_shape(layer.inputs[0])
    p1 = layer.attrs.get("first_transpose")
    if dims is None or p1 is None:
        return dims
    if p1 == "reverse":
        return dims[::-1]
    return tuple(dims[i] for i in p1) if sorted(p1) == list(range(len(dims))) else None


def _symbolic_target(m: Match) -> str | None:
    layer = m.root
    if layer.attrs.get("reshape") is not None or m["shape"].is_constant:
        return "the target is static (constant folding makes it an attribute)"
    value = shape_value(m["shape"])
    if value is None or value[1]:
        return "the target is not shape arithmetic over known dims"
    src = _reshape_input(layer)
    if src is None:
        return "the input's dims are not known"
    target = reshape_target(src, list(value[0]), bool(layer.attrs.get("allowzero")))
    attr = reshape_attr(src, target) if target is not None else None
    if attr is None:
        return f"the target {list(value[0])} is not 0/-1/static dims of the input {list(src)}"
    m.update(attr=attr)
    return None


def _static_target(m: Match) -> None:
    layer, shape = m.root, m["shape"]
    layer.attrs["reshape"], layer.attrs["allowzero"] = m["attr"], False
    layer.set_input(1, None)
    layer.inputs.pop()
    remove_computation(m.net, shape)


def _noop_expand(m: Match) -> str | None:
    x, out, value = m["x"], m.root.outputs[0], shape_value(m["shape"])
    dims = sym_shape(x)
    if value is None or value[1] or dims is None or len(value[0]) > len(dims):
        return "the target is not known shape arithmetic of at most the input's rank"
    if any(not (t == 1 or t == d) for t, d in zip(value[0][::-1], dims[::-1])):
        return f"the target {list(value[0])} may broadcast the input {list(dims)}"
    if out in m.net.outputs:
        return "its output is a network output"
    return None


def _drop_expand(m: Match) -> None:
    replace_output(m.net, m.root.outputs[0], m["x"])
    remove_dead(m.net, [m.root])
    remove_computation(m.net, m["shape"])


def _arange_rows(m: Match) -> str | None:
    gather, sl = m.root, m["idx"]
    table, ids = m["table"], sl.inputs[0]
    if gather.attrs.get("axis", 0) != 0 or not ids.is_constant or table.shape is None or not table.shape:
        return "not a gather along axis 0 of positions sliced from a constant"
    v = np.asarray(ids.value)
    if v.ndim not in (1, 2) or v.ndim == 2 and v.shape[0] != 1 or v.dtype.kind not in "iu" \
            or not np.array_equal(v.reshape(-1), np.arange(v.size)) or table.shape[0] != v.size:
        return "the positions are not an arange as long as the table"
    axes, steps = (sl.inputs[i] if len(sl.inputs) > i else None for i in (3, 4))
    along = np.asarray(axes.value).reshape(-1).tolist() if axes is not None and axes.is_constant else None
    if axes is not None and along not in ([v.ndim - 1], [-1]):
        return "the slice is not along the positions"
    if steps is not None and not (steps.is_constant and np.asarray(steps.value).reshape(-1).tolist() == [1]):
        return "the slice steps over positions"
    if sl.outputs[0].shape is None or m.root.outputs[0].shape is None:
        return "the shapes are not known"
    return None


def _slice_rows(m: Match) -> None:
    net, gather, sl = m.net, m.root, m["idx"]
    out = gather.outputs[0]
    axes = net.add_constant(np.asarray([0], np.int64), name=net.unique_name(sl.name + "_rows"))
    rows = net.add_layer("Slice", [m["table"], sl.inputs[1], sl.inputs[2], axes],
                         name=net.unique_name(gather.name + "/rows"), origin=gather.origin + sl.origin)
    rows.outputs[0].shape, rows.outputs[0].dtype = out.shape[-len(m["table"].shape):], out.dtype
    last = rows
    if sl.inputs[0].value.ndim == 2:
        last = net.add_layer("Unsqueeze", [rows.outputs[0]], {"axes": [0]},
                             name=net.unique_name(gather.name + "/batch"), origin=gather.origin)
        last.outputs[0].shape, last.outputs[0].dtype = out.shape, out.dtype
    for layer in (rows, last) if last is not rows else (rows,):
        net.layers.remove(layer)
        net.layers.insert(net.layers.index(gather), layer)
    replace_output(net, out, last.outputs[0])
    remove_dead(net, [gather])
    remove_computation(net, m["idx"].outputs[0])


class FoldShapeValues(RulePass):
    name = "shape-value folding"
    rules = [
        Rule("shape arithmetic with a static value -> constant", Op(ARITHMETIC, Var("x"), ...), _static_value,
             _to_constant),
        Rule("reshape(x, shape arithmetic) -> reshape(x, [0|-1|n, ...])", Op("Shuffle", Var("x"), Var("shape")),
             _symbolic_target, _static_target),
        Rule("expand(x, shape of x) -> x", Op("Expand", Var("x"), Var("shape")), _noop_expand, _drop_expand),
        Rule("gather(T, arange[start:end]) -> T[start:end]", Op("Gather", Var("table"), Op("Slice", ..., name="idx")),
             _arange_rows, _slice_rows),
    ]
