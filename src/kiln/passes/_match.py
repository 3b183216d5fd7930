"""Helpers for rewrites on the value graph: producers and constants, and edits that keep tensor names."""
from __future__ import annotations

import numpy as np

from kiln.ir.network import Layer, Network, Tensor


def producer(t: Tensor | None, kind: str | None = None, **attrs) -> Layer | None:
    """The layer producing ``t`` if it is of ``kind`` with matching attrs."""
    if t is None or t.producer is None:
        return None
    p = t.producer
    if kind is not None and p.kind != kind:
        return None
    for k, v in attrs.items():
        if p.attrs.get(k) != v:
            return None
    return p


def scalar(t: Tensor | None) -> float | None:
    """The value of a constant holding one element (any shape), else None."""
    if t is None or not t.is_constant or t.value.size != 1:
        return None
    return float(np.asarray(t.value).reshape(-1)[0])


def single_use(t: Tensor, net: Network) -> bool:
    return len(t.uses) == 1 and t not in net.outputs


def replace_output(net: Network, old: Tensor, new: Tensor) -> None:
    """Make ``new`` stand for ``old`` everywhere, keeping a network output's public name.

    When ``new`` now carries ``old``'s values under a name nobody else reads (a fused layer's fresh
    output, or a layer's output whose only reader is being fused into it), it takes over ``old``'s
    name, so engine tensors keep the names of the ONNX tensors they compute (``kiln compare
    --per-layer`` matches intermediate values by name)."""
    was_output = old in net.outputs
    fresh = new.producer is not None and not new.is_constant and new not in net.outputs \
        and all(layer is old.producer for layer, _ in new.uses)
    name = old.name
    net.replace_all_uses(old, new)
    if was_output or fresh:
        net.tensors.pop(name, None)
        old.name = name + "#dead"
        net.rename(new, name)


class LayerEdits:
    """Layer-order edits a pass collects while it rewrites and applies at once (``apply``): layers
    placed before others and layers gone. Removed layers are disconnected at once (their inputs'
    uses drop), so the rest of the pass sees the graph as it will be; only the list waits, which
    keeps passes linear when their edits are far apart."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.placed: dict[int, list[Layer]] = {}       # id(anchor) -> layers to put right before it
        self.moved: set[int] = set()
        self.gone: set[int] = set()

    def alive(self, layer: Layer) -> bool:
        return id(layer) not in self.gone and layer in self.net.layers

    def place(self, new: Layer, before: Layer) -> None:
        self.placed.setdefault(id(before), []).append(new)
        self.moved.add(id(new))

    def remove(self, layer: Layer) -> None:
        self.net.detach_layer(layer)
        self.gone.add(id(layer))

    def apply(self) -> None:
        if not self.placed and not self.gone:
            return
        order: list[Layer] = []
        for layer in self.net.layers:
            order.extend(self.placed.get(id(layer), ()))
            if id(layer) not in self.gone and id(layer) not in self.moved:
                order.append(layer)
        self.net.layers = order
        self.placed, self.moved, self.gone = {}, set(), set()


def substitute(net: Network, new: Layer, before: Layer, olds: list[Tensor], dead: list[Layer] = (),
               edits: LayerEdits | None = None) -> None:
    """Put the just-added layer ``new`` right before ``before`` in the layer order, make its outputs
    stand for ``olds`` (their shapes, dtypes and names; see replace_output), then remove those of
    ``dead`` nothing reads any more. With ``edits``, the layer list changes when they are applied."""
    if edits is not None:
        edits.place(new, before)
    else:
        if net.layers[-1] is new:
            net.layers.pop()
        else:
            net.layers.remove(new)
        net.layers.insert(net.layers.index(before), new)
    for out, old in zip(new.outputs, olds):
        out.shape, out.dtype = old.shape, old.dtype
        replace_output(net, old, out)
    remove_dead(net, list(dead), edits)


def remove_dead(net: Network, layers: list[Layer], edits: LayerEdits | None = None) -> None:
    """Remove those of ``layers`` whose outputs nothing reads any more, until none is left to remove."""
    pending = {id(layer): layer for layer in layers}
    outputs = {id(t) for t in net.outputs}
    work = list(layers)
    while work:
        layer = work.pop()
        if id(layer) not in pending or not (edits.alive(layer) if edits is not None else layer in net.layers):
            continue
        if any(o.uses or id(o) in outputs for o in layer.outputs):
            continue
        del pending[id(layer)]
        feeds = [t.producer for t in layer.inputs if t is not None and t.producer is not None]
        if edits is not None:
            edits.remove(layer)
        else:
            net.remove_layer(layer)
        work.extend(p for p in feeds if id(p) in pending)


def remove_computation(net: Network, t: Tensor) -> None:
    """Remove the layers computing ``t`` that nothing else reads, up to the Shape layers it starts from
    (shape arithmetic a rewrite no longer needs)."""
    layers, stack = [], [t]
    while stack:
        p = stack.pop().producer
        if p is None or p in layers:
            continue
        layers.append(p)
        if p.kind != "Shape":
            stack.extend(x for x in p.inputs if x is not None)
    remove_dead(net, layers)
