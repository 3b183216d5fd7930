"""Parallel 8-bit linear layers over one tensor of codes become one 8-bit GEMM (horizontal fusion after the fold).

The float horizontal fusion (fuse_parallel_linear.py) leaves GEMMs that read a dequantized activation to the Q/DQ
fold, so a quantized BERT block keeps three QFullyConnected layers (query, key, value) reading the same codes:
three launches, each re-reading the codes. Here they merge as the float ones do: one QFullyConnected over the
concatenated weight codes, per-channel weight scales and int32 bias codes, then a Split along the last axis whose
outputs keep the layers' tensors. Each output column is computed from the same codes, scale and bias as before.

Cases: two or more QFullyConnected layers reading the same codes tensor, each with constant [N_i, K] weight codes of
one dtype and constant bias codes, one output (no second, codes output), and equal attributes apart from their
weight scales (the same input scale and zero point, output type, output scale and zero point, activation).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from kiln.passes.fuse_parallel_linear import split_merged
from kiln.passes.rewrite import Match, Op, Rule, RulePass, Var


def _qualifies(layer, x) -> bool:
    if layer.kind != "QFullyConnected" or len(layer.inputs) != 3 or layer.inputs[0] is not x:
        return False
    w, b = layer.inputs[1], layer.inputs[2]
    return (len(layer.outputs) == 1 and w is not None and w.is_constant and np.ndim(w.value) == 2
            and b is not None and b.is_constant and np.ndim(b.value) == 1 and b.value.shape[0] == w.value.shape[0]
            and np.size(layer.attrs.get("w_scale")) == w.value.shape[0])


def _key(attrs: dict[str, Any]) -> str:
    return repr(sorted((k, v.tolist() if isinstance(v, np.ndarray) else v) for k, v in attrs.items()
                       if k != "w_scale"))


def _groups(m: Match) -> str | None:
    x = m["x"]
    readers = list(dict.fromkeys(layer for layer, _ in x.uses if _qualifies(layer, x)))
    groups: dict = {}
    for fc in readers:
        w, b = fc.inputs[1], fc.inputs[2]
        groups.setdefault((_key(fc.attrs), w.dtype, w.value.shape[1], b.dtype), []).append(fc)
    m["groups"] = [fcs for fcs in groups.values() if len(fcs) >= 2]
    return None if m["groups"] else "no other 8-bit linear layer with equal attributes reads these codes"


def _merge(m: Match) -> None:
    net, x = m.net, m["x"]
    for fcs in m["groups"]:
        fcs.sort(key=net.layers.index)
        ws = [fc.inputs[1].value for fc in fcs]
        w_all = net.add_constant(np.ascontiguousarray(np.concatenate(ws, 0)),
                                 name=net.unique_name(fcs[0].inputs[1].name + "/merged"))
        b_all = net.add_constant(np.concatenate([fc.inputs[2].value for fc in fcs], 0),
                                 name=net.unique_name(fcs[0].inputs[2].name + "/merged"))
        attrs = dict(fcs[0].attrs)
        attrs["w_scale"] = np.concatenate([np.asarray(fc.attrs["w_scale"], np.float32).reshape(-1) for fc in fcs])
        origin = list(dict.fromkeys(o for fc in fcs for o in fc.origin))
        merged = net.add_layer("QFullyConnected", [x, w_all, b_all], attrs,
                               name=net.unique_name(fcs[0].name + "/merged"), origin=origin)
        split_merged(net, fcs, merged, [int(w.shape[0]) for w in ws], origin)
    net.remove_unused_constants()


class FuseParallelQLinear(RulePass):
    name = "parallel 8-bit linear fusion"
    rules = [Rule("[q(x) @ W1, q(x) @ W2, ...] -> split(q(x) @ [W1 W2 ...])", Op("QFullyConnected", Var("x"), ...),
                  _groups, _merge)]
