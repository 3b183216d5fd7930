"""Constant folding.

Cases:
- a layer whose every input is a constant (and that reads no outer tensor) →
  evaluated once on the CPU, its outputs become constants;
- ``Shape``/``Size`` of a tensor whose shape is fully static → constant;
- ``If`` with a constant condition → the chosen branch is inlined;
- a Shuffle whose reshape target is a constant input → the target becomes an attribute.
Outputs larger than ``max_elements`` stay as layers (folding would bloat the engine); a layer whose
inferred output shape, or whose size predicted from its input values, is larger is not even run.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from kiln.ir.network import Network, subgraphs
from kiln.kernels import KernelContext, plain_first, tactics_for
from kiln.ir.dtypes import from_numpy, to_numpy
from kiln.passes.base import Pass, PassResult

NO_FOLD = {"Plugin", "Loop", "Scan", "If"}


class ConstantFold(Pass):
    name = "constant folding"

    def __init__(self, max_elements: int = 1 << 24) -> None:
        self.max_elements = max_elements

    def call(self, net: Network) -> PassResult:
        modified = False
        for layer in list(net.layers):
            if layer.network is not net or layer not in net.layers:
                continue
            if layer.kind == "If":
                cond = layer.inputs[0]
                if cond is not None and cond.is_constant:
                    _inline_if(net, layer, bool(np.asarray(cond.value).reshape(-1)[0]))
                    modified = True
                continue
            if layer.kind in ("Shape", "Size"):
                x = layer.inputs[0]
                if x is not None and x.shape is not None and all(isinstance(d, int) for d in x.shape):
                    dims = list(x.shape)
                    if layer.kind == "Size":
                        val = np.asarray(int(np.prod(dims, dtype=np.int64)), np.int64)
                    else:
                        r = len(dims)
                        s, e = layer.attrs.get("start", 0), layer.attrs.get("end")
                        s = max(0, min(r, s + r if s < 0 else s))
                        e = r if e is None else max(0, min(r, e + r if e < 0 else e))
                        val = np.asarray(dims[s:e], np.int64)
                    _replace_with_constants(net, layer, [val])
                    modified = True
                continue
            if layer.kind == "Shuffle" and len(layer.inputs) > 1 and layer.inputs[1] is not None \
                    and layer.inputs[1].is_constant and layer.attrs.get("reshape") is None:
                # a constant reshape target becomes an attribute (the pattern passes then see it)
                layer.attrs["reshape"] = [int(d) for d in np.asarray(layer.inputs[1].value).reshape(-1)]
                layer.set_input(1, None)
                layer.inputs.pop()
                modified = True
                continue
            if layer.kind in NO_FOLD or subgraphs(layer):
                continue
            ins = layer.inputs
            if not any(t is not None for t in ins) or not all(t is None or t.is_constant for t in ins):
                continue
            if any(t is not None and t.dtype == "string" for t in ins):
                continue
            ctx = KernelContext(device="cpu", layer_name=layer.name,
                                input_dtypes=tuple(t.dtype if t is not None else None for t in ins),
                                output_dtypes=tuple(o.dtype for o in layer.outputs))
            tac = plain_first(tactics_for(layer.kind, layer.attrs, ctx))
            if not tac or tac[0].dynamic and layer.kind not in ("NonZero",):
                continue
            if any(_static_elements(o.shape) > self.max_elements for o in layer.outputs):
                continue      # too big to hold as a constant: computed at run time
            try:
                args = [_to_torch(t.value) if t is not None else None for t in ins]
                if (predicted_elements(layer.kind, args) or 0) > self.max_elements:
                    continue
                outs = tac[0].make(layer.attrs, ctx)(*args)
            except Exception:
                continue      # leave it for run time, where the error will name the layer
            if any(o.numel() > self.max_elements for o in outs):
                continue
            _replace_with_constants(net, layer, [to_numpy(o).copy() for o in outs])
            modified = True
        return PassResult(net, modified)


def _ints(v: Any) -> list[int]:
    return [int(x) for x in v.reshape(-1).tolist()] if isinstance(v, torch.Tensor) else [int(x) for x in v]


def _shape(v: Any) -> list[int]:
    return list(v.shape) if isinstance(v, torch.Tensor) else []


def predicted_elements(kind: str, args: list) -> int | None:
    """Elements of the output of a layer whose size comes from its host inputs' values, before it
    runs (folding and shape inference check it); None for kinds whose output is no larger than their
    inputs allow, or when it cannot say."""
    try:
        if kind == "ConstantOfShape":
            return math.prod(_ints(args[0]))
        if kind == "Range":
            start, limit, delta = (_first(a) for a in args[:3])
            return max(0, math.ceil((limit - start) / delta)) if delta else None
        if kind == "Expand":
            x, target = _shape(args[0]), _ints(args[1])
            r = max(len(x), len(target))
            x, target = [1] * (r - len(x)) + x, [1] * (r - len(target)) + target
            return math.prod(b if a == 1 else a for a, b in zip(x, target))
        if kind == "Tile":
            return math.prod(d * max(0, r) for d, r in zip(_shape(args[0]), _ints(args[1])))
        if kind == "Padding" and len(args) > 1 and args[1] is not None:
            x, pads = _shape(args[0]), _ints(args[1])
            n = len(pads) // 2
            axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else range(len(x) - n, len(x))
            for a, lo, hi in zip(axes, pads[:n], pads[n:]):
                x[a] += lo + hi
            return math.prod(max(0, d) for d in x)
        if kind == "OneHot":
            return math.prod(_shape(args[0])) * max(0, _ints(args[1])[0])
        if kind == "Window":
            return max(0, _ints(args[0])[0])
        if kind == "Resize" and len(args) > 3 and args[3] is not None:
            return math.prod(_ints(args[3]))
        if kind == "CenterCropPad":
            return math.prod(_ints(args[1]))
    except Exception:           # values the kernel itself will refuse (it names the problem)
        return None
    return None


def _first(v: Any) -> float:
    return float(v.reshape(-1)[0].item()) if isinstance(v, torch.Tensor) else float(v)


def _static_elements(shape) -> int:
    """Elements of a tensor of this shape when every dim is known, else 0."""
    if shape is None or not all(isinstance(d, int) for d in shape):
        return 0
    return math.prod(shape)


def _to_torch(a: np.ndarray) -> torch.Tensor:
    """A writable torch copy; 0-d stays 0-d; bfloat16/float8/sub-byte types as Kiln holds them."""
    return from_numpy(np.require(a, requirements="C").copy())


def _replace_with_constants(net: Network, layer, values: list[np.ndarray]) -> None:
    for out, val in zip(layer.outputs, values):
        const = net.add_constant(val, name=net.unique_name(out.name + "_folded"))
        is_output = out in net.outputs
        net.replace_all_uses(out, const)
        if is_output:
            # an output that became constant keeps its name
            pass
    outs = list(layer.outputs)
    net.layers.remove(layer)
    for i, t in enumerate(layer.inputs):
        if t is not None:
            layer.set_input(i, None)
    for out in outs:
        net.tensors.pop(out.name, None)
    for out, val in zip(outs, values):
        for t in list(net.outputs):
            if t.name.startswith(out.name + "_folded"):
                net.rename(t, out.name)


def _inline_if(net: Network, layer, cond: bool) -> None:
    branch: Network = layer.attrs["then_branch" if cond else "else_branch"]
    mapping = {}
    idx = net.layers.index(layer)
    new_layers = []
    for t in branch.tensors.values():
        if t.is_constant:
            c = net.add_constant(t.value, name=net.unique_name(t.name))
            mapping[id(t)] = c
    for bl in branch.layers:
        ins = [mapping.get(id(t), t) if t is not None else None for t in bl.inputs]
        nl = net.add_layer(bl.kind, ins, dict(bl.attrs), num_outputs=len(bl.outputs),
                           name=net.unique_name(f"{layer.name}/{bl.name}"), origin=bl.origin or layer.origin,
                           output_names=[net.unique_name(o.name) for o in bl.outputs],
                           output_dtypes=[o.dtype for o in bl.outputs])
        net.layers.pop()
        new_layers.append(nl)
        for o_old, o_new in zip(bl.outputs, nl.outputs):
            o_new.shape = o_old.shape
            mapping[id(o_old)] = o_new
    net.layers[idx:idx] = new_layers
    for nl in new_layers:       # bodies nested in the branch read its values: point them at the inlined copies
        for g in subgraphs(nl):
            if g.outer is branch:
                g.outer = net
            _remap_reads(g, mapping)
    results = [mapping.get(id(t), t) for t in branch.outputs]
    for out, res in zip(layer.outputs, results):
        if out in net.outputs:
            ident = net.add_layer("Identity", [res], {}, name=net.unique_name(layer.name + "/out"))
            net.layers.pop()
            net.layers.insert(net.layers.index(layer), ident)
            res = ident.outputs[0]
            net.replace_all_uses(out, res)
            name = out.name
            net.layers.remove(layer) if layer in net.layers and False else None
            net.tensors.pop(name, None)
            net.rename(res, name)
        else:
            net.replace_all_uses(out, res)
    if layer in net.layers:
        for i, t in enumerate(layer.inputs):
            if t is not None:
                layer.set_input(i, None)
        net.layers.remove(layer)
        for o in layer.outputs:
            if net.tensors.get(o.name) is o:
                net.tensors.pop(o.name)


def _remap_reads(g: Network, mapping: dict) -> None:
    """Replace reads of inlined tensors (by id) in ``g`` and the subgraphs nested in it."""
    for layer in g.layers:
        for i, t in enumerate(layer.inputs):
            if t is not None and id(t) in mapping:
                layer.set_input(i, mapping[id(t)])
        for sg in subgraphs(layer):
            _remap_reads(sg, mapping)
    g.outputs = [mapping.get(id(t), t) for t in g.outputs]
