"""Parallel linear layers over one input become one GEMM (horizontal fusion).

BERT-style attention projects the same hidden states three times (query, key, value: three
[D, D] GEMMs); one GEMM against the concatenated [3D, D] weight does the same arithmetic with
a third of the launches and better-shaped tiles — at batch 1 each projection is a small,
latency-bound GEMM. The outputs are then column slices of the merged result (a Split along
the last axis: views, no copies), and they keep their ONNX names for per-layer comparison.

Cases: two or more FullyConnected layers (or MatMuls by a constant 2-D weight, FullyConnected
without bias) reading the same tensor as their input, each with a constant 2-D weight [N_i, K]
of one dtype, a constant bias or none (missing biases become zeros when others have one), and
equal attributes (the same activation, if any). Layers whose
output is a network output are merged too: the Split output keeps the name.
"""
from __future__ import annotations

import numpy as np

from kiln.passes._match import remove_dead, replace_output
from kiln.passes.fold_qdq import reads_dequantized
from kiln.passes.rewrite import Match, Op, Rule, RulePass, Var


def _weight(layer):
    """The layer's weight as [N, K] (FullyConnected's layout; a MatMul's constant [K, N] transposed)."""
    w = layer.inputs[1].value
    return np.ascontiguousarray(w.T) if layer.kind == "MatMul" else w


def _qualifies(layer, x) -> bool:
    if not layer.inputs or layer.inputs[0] is not x or len(layer.outputs) != 1 or reads_dequantized(layer):
        return False          # a GEMM reading a dequantized activation is fold_qdq's to make 8-bit
    if layer.kind == "MatMul":           # x @ W with a constant 2-D W: a FullyConnected without bias
        w = layer.inputs[1]
        return (len(layer.inputs) == 2 and w is not None and w.is_constant and np.ndim(w.value) == 2
                and not layer.attrs.get("transpose_a") and not layer.attrs.get("transpose_b")
                and x.rank is not None and x.rank >= 2)
    if layer.kind != "FullyConnected":
        return False
    w = layer.inputs[1] if len(layer.inputs) > 1 else None
    b = layer.inputs[2] if len(layer.inputs) > 2 else None
    if w is None or not w.is_constant or np.ndim(w.value) != 2:
        return False
    return b is None or (b.is_constant and np.ndim(b.value) == 1 and b.value.shape[0] == w.value.shape[0]
                         and b.dtype == w.dtype)


def _groups(m: Match) -> str | None:
    """The readers of x that can merge, by equal attributes, weight dtype and width (stored in ``m``)."""
    x = m["x"]
    readers = list(dict.fromkeys(l for l, _ in x.uses if _qualifies(l, x)))
    groups: dict = {}
    for fc in readers:
        w = fc.inputs[1]
        attrs = {} if fc.kind == "MatMul" else fc.attrs
        key = (repr(sorted(attrs.items())), w.dtype, _weight(fc).shape[1])
        groups.setdefault(key, []).append(fc)
    m["groups"] = [fcs for fcs in groups.values() if len(fcs) >= 2]
    return None if m["groups"] else "no other linear layer with a constant weight of that dtype and width reads x"


def _merge(m: Match) -> None:
    net, x = m.net, m["x"]
    for fcs in m["groups"]:
        fcs.sort(key=net.layers.index)
        ws = [_weight(fc) for fc in fcs]
        biases = [fc.inputs[2] if fc.kind == "FullyConnected" and len(fc.inputs) > 2 else None for fc in fcs]
        w_all = net.add_constant(np.ascontiguousarray(np.concatenate(ws, 0)),
                                 name=net.unique_name(fcs[0].inputs[1].name + "/merged"))
        ins = [x, w_all]
        if any(b is not None for b in biases):
            parts = [b.value if b is not None else np.zeros(w.shape[0], w.dtype) for b, w in zip(biases, ws)]
            ins.append(net.add_constant(np.concatenate(parts, 0), name=net.unique_name(fcs[0].name + "/bias")))
        origin = list(dict.fromkeys(o for fc in fcs for o in fc.origin))
        attrs = next((dict(fc.attrs) for fc in fcs if fc.kind == "FullyConnected"), {})
        merged = net.add_layer("FullyConnected", ins, attrs,
                               name=net.unique_name(fcs[0].name + "/merged"), origin=origin)
        split_merged(net, fcs, merged, [int(w.shape[0]) for w in ws], origin)


def split_merged(net, fcs: list, merged, sizes: list[int], origin: list[str]) -> None:
    """Replace the parallel layers ``fcs`` by ``merged`` (their GEMM over the concatenated weights, whose last axis
    holds their outputs side by side, ``sizes`` wide) and a Split of it: placed where the first of them was, each
    Split output taking over that layer's output tensor (its name, shape and dtype)."""
    split = net.add_layer("Split", [merged.outputs[0]], {"axis": -1, "split": sizes}, num_outputs=len(fcs),
                          name=net.unique_name(fcs[0].name + "/split"), origin=origin)
    first = net.layers.index(fcs[0])
    for layer in (split, merged):
        net.layers.remove(layer)
        net.layers.insert(first, layer)
    y0 = fcs[0].outputs[0]
    merged.outputs[0].dtype = y0.dtype
    if y0.shape is not None:
        merged.outputs[0].shape = (*y0.shape[:-1], sum(sizes))
    for fc, out in zip(fcs, split.outputs):
        y = fc.outputs[0]
        out.shape, out.dtype = y.shape, y.dtype
        replace_output(net, y, out)
    remove_dead(net, fcs)


class FuseParallelLinear(RulePass):
    name = "parallel linear fusion"
    rules = [Rule("[x @ W1, x @ W2, ...] -> split(x @ [W1 W2 ...])", Op(("FullyConnected", "MatMul"), Var("x"), ...),
                  _groups, _merge)]
