"""A model beside the Kiln engine built from it: the build explained node by node.

Each engine layer lists the model nodes it was built from (``overlay["origin"]``,
the node names the parser used: a node without a name is ``{op}_{k}``, ``k``
counting nodes depth-first from 1 as the parser does). From that, a model node
was ``kept`` (a layer of its own), ``fused`` (one layer for several nodes), run
as a ``plugin``, or ``folded`` away (constant-folded, dead, or absorbed without
a layer of its own); a layer with no origin was ``inserted`` by the build (a
precision cast, a reformat). A layer naming a node the model lacks, or a tensor
of one name with another static shape in the model than in the engine, means the
engine was built from another model (one that differs only in weights or in
attributes that keep every shape is not told apart: diff the two models for that).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from kiln.viewer.graph import ViewGraph, ViewModel, ViewNode

NODE_STATUSES = ("kept", "fused", "plugin", "folded")
LAYER_STATUSES = ("kept", "fused", "plugin", "inserted")


@dataclass
class LayerOrigin:
    layer: ViewNode
    status: str                                        # one of LAYER_STATUSES
    nodes: list[ViewNode] = field(default_factory=list)   # the model nodes it was built from
    missing: list[str] = field(default_factory=list)      # origin names the model does not have
    scope: tuple[str, ...] = ()


@dataclass
class NodeFate:
    node: ViewNode
    status: str                                        # one of NODE_STATUSES
    layer: LayerOrigin | None = None
    scope: tuple[str, ...] = ()


@dataclass
class BuildDiff:
    model: ViewModel
    engine: ViewModel
    layers: list[LayerOrigin]
    nodes: list[NodeFate]
    shapes: list[tuple[str, list, list]] = field(default_factory=list)   # (tensor, model shape, engine shape)

    def counts(self) -> dict[str, dict[str, int]]:
        nodes = dict.fromkeys(NODE_STATUSES, 0)
        layers = dict.fromkeys(LAYER_STATUSES, 0)
        for n in self.nodes:
            nodes[n.status] += 1
        for lo in self.layers:
            layers[lo.status] += 1
        return {"nodes": nodes, "layers": layers}

    @property
    def differs(self) -> bool:
        """True when the engine was not built from this model (see the module docstring)."""
        return bool(self.shapes) or any(lo.missing for lo in self.layers)

    def missing(self) -> list[str]:
        return [name for lo in self.layers for name in lo.missing]


def walk(g: ViewGraph, scope: tuple[str, ...] = ()) -> Iterator[tuple[ViewNode, tuple[str, ...]]]:
    """Every node of ``g`` and of its bodies, depth-first in file order (a reader's function bodies skipped)."""
    for n in g.nodes:
        yield n, scope
        for key, sub in n.subgraphs.items():
            if key != "function":
                yield from walk(sub, scope + (n.name or n.op_type, key))


def origin_names(model: ViewModel) -> dict[str, ViewNode]:
    """Model nodes by the name an engine's origin calls them."""
    out: dict[str, ViewNode] = {}
    for k, (n, _) in enumerate(walk(model.graph), start=1):
        out.setdefault(n.name or f"{n.op_type}_{k}", n)
    return out


def explain_build(model: ViewModel, engine: ViewModel) -> BuildDiff:
    """Which model nodes each layer of ``engine`` was built from, and what became of every model node."""
    by_name = origin_names(model)
    layers: list[LayerOrigin] = []
    fate: dict[int, LayerOrigin] = {}
    for layer, scope in walk(engine.graph):
        names = [str(o) for o in layer.overlay.get("origin") or []]
        found = [by_name[o] for o in names if o in by_name]
        if layer.category == "plugin":
            status = "plugin"
        elif not names:
            status = "inserted"
        else:
            status = "kept" if len(names) == 1 else "fused"
        lo = LayerOrigin(layer, status, found, [o for o in names if o not in by_name], scope)
        layers.append(lo)
        for n in found:
            prev = fate.get(id(n))
            if prev is None or (prev.status == "kept" and status != "kept"):
                fate[id(n)] = lo
    nodes = []
    for n, scope in walk(model.graph):
        lo = fate.get(id(n))
        nodes.append(NodeFate(n, lo.status if lo is not None else "folded", lo, scope))
    return BuildDiff(model, engine, layers, nodes, _shape_mismatches(model.graph, engine.graph))


def _static(shape) -> bool:
    return shape is not None and all(type(d) is int for d in shape)


def _shape_mismatches(mg: ViewGraph, eg: ViewGraph) -> list[tuple[str, list, list]]:
    """Tensors of the main graphs with one name and two different static shapes."""
    out = []
    for name, t in eg.tensors.items():
        m = mg.tensors.get(name)
        if m is not None and _static(m.shape) and _static(t.shape) and list(m.shape) != list(t.shape):
            out.append((name, list(m.shape), list(t.shape)))
    return out
