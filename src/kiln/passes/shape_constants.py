"""Shape-derived constants: layers that compute from shapes alone become ShapeConstant layers, which the
runtime computes once per input shape (runtime/shape_cache.py) instead of at every run.

A static build folds such layers into constants. In a range build they depend on the runtime shape, so
they stay; this pass gathers them so that the layers reading them see one input that behaves like a
constant at each shape, and a run at a shape seen before runs none of them.

Cases:
- a connected group of layers of pure kinds whose every input is a constant, the output of a Shape/Size
  layer, or another such layer's output (YOLOv5's dynamic Detect grids, ``meshgrid(Range(ny), Range(nx))``
  expanded to ``[1, A, ny, nx, 2]`` and shifted by 0.5; an attention mask or positions built from
  ``Range(S)``) → one ShapeConstant layer, placed before the first layer that reads it, whose body holds
  the group; its inputs are the tensors whose shapes the group's Shape/Size layers read.
Left as they are: everything in a network without dynamic input dims (a static build folded what depends
on shapes alone; what it left depends on data), groups of Shape/Size layers alone (looking them up would
cost what they cost), groups that make a network output (a caller could write into a kept tensor),
groups whose outputs are read inside a subgraph, and groups whose outputs are read on the way to a tensor
whose shape they read (one layer for them would close a cycle).
"""
from __future__ import annotations

from kiln.ir.network import Layer, Network, Tensor, outer_reads, subgraphs
from kiln.passes._match import replace_output
from kiln.passes.base import Pass, PassResult

READS_SHAPE = ("Shape", "Size")
PURE = frozenset(READS_SHAPE + (
    "Select", "Gather", "GatherElements", "Slice", "Concatenation", "Unsqueeze", "Squeeze", "Flatten", "Identity",
    "Shuffle", "Cast", "ElementWise", "Unary", "Activation", "Pointwise", "Where", "Range", "Expand", "Tile",
    "ConstantOfShape", "Reduce", "ArgReduce", "CumSum", "Trilu", "Split", "OneHot", "EyeLike", "Padding"))
KIND = "ShapeConstant"


def _reads(layer: Layer) -> list[Tensor]:
    """Every tensor ``layer`` reads, those its subgraphs read from outside included."""
    found = [t for t in layer.inputs if t is not None]
    for g in subgraphs(layer):
        found += outer_reads(g)
    return found


def _shape_derived(net: Network) -> tuple[list[Layer], set[int]]:
    """The layers (in order) whose outputs are functions of shapes alone, and ids of those outputs."""
    layers: list[Layer] = []
    made: set[int] = set()
    for layer in net.layers:
        if layer.kind not in PURE or subgraphs(layer):
            continue
        ins = [t for t in layer.inputs if t is not None]
        if layer.kind in READS_SHAPE:
            ok = bool(ins) and not ins[0].is_constant
        else:
            ok = any(id(t) in made for t in ins) and all(id(t) in made or t.is_constant for t in ins)
        if ok:
            layers.append(layer)
            made.update(id(o) for o in layer.outputs)
    return layers, made


def _groups(layers: list[Layer], made: set[int]) -> list[list[Layer]]:
    """``layers`` split into groups connected through the tensors they pass each other, each in order."""
    root: dict[int, int] = {id(layer): id(layer) for layer in layers}

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i
    for layer in layers:
        for t in layer.inputs:
            if t is not None and id(t) in made:
                a, b = find(id(layer)), find(id(t.producer))
                root[a] = b
    groups: dict[int, list[Layer]] = {}
    for layer in layers:
        groups.setdefault(find(id(layer)), []).append(layer)
    return list(groups.values())


def _closes_cycle(sources: list[Tensor], readers: list[Layer]) -> bool:
    """Whether a layer in ``readers`` is an ancestor of some tensor in ``sources``."""
    wanted = {id(layer) for layer in readers}
    seen: set[int] = set()
    todo = [t.producer for t in sources if t.producer is not None]
    while todo:
        layer = todo.pop()
        if id(layer) in seen:
            continue
        if id(layer) in wanted:
            return True
        seen.add(id(layer))
        todo += [t.producer for t in _reads(layer) if t.producer is not None]
    return False


def _body(net: Network, group: list[Layer], sources: list[Tensor], outputs: list[Tensor]) -> Network:
    """A Network holding copies of ``group``: inputs standing for ``sources`` (only their shapes are read),
    ``outputs`` as its outputs. Constants stay in ``net``; the body reads them as outer values."""
    body = Network(f"{group[0].name}/body")
    body.outer = net
    mapped: dict[int, Tensor] = {id(s): body.add_input(s.name, s.dtype, s.shape) for s in sources}
    for layer in group:
        ins = [None if t is None else mapped.get(id(t), t) for t in layer.inputs]
        copy = body.add_layer(layer.kind, ins, dict(layer.attrs), num_outputs=len(layer.outputs), name=layer.name,
                              origin=layer.origin, output_names=[o.name for o in layer.outputs],
                              output_dtypes=[o.dtype for o in layer.outputs])
        for o, c in zip(layer.outputs, copy.outputs):
            c.shape = o.shape
            mapped[id(o)] = c
    for o in outputs:
        body.mark_output(mapped[id(o)])
    return body


def _fold(net: Network, group: list[Layer]) -> bool:
    """Replace ``group`` with one ShapeConstant layer; False where it is left as it is (see the module)."""
    inside = {id(layer) for layer in group}
    if all(layer.kind in READS_SHAPE for layer in group):
        return False
    sources: list[Tensor] = []
    for layer in group:
        x = layer.inputs[0] if layer.kind in READS_SHAPE else None
        if x is not None and (x.producer is None or id(x.producer) not in inside) and x not in sources:
            sources.append(x)
    outputs = [o for layer in group for o in layer.outputs if any(id(u) not in inside for u, _ in o.uses)
               or o in net.outputs]
    if not outputs or any(o in net.outputs for o in outputs):
        return False
    readers = [u for o in outputs for u, _ in o.uses if id(u) not in inside]
    if any(u.network is not net for u in readers) or _closes_cycle(sources, readers):
        return False
    body = _body(net, group, sources, outputs)
    layer = net.add_layer(KIND, sources, {"body": body}, num_outputs=len(outputs),
                          name=net.unique_layer_name(KIND, f"{group[0].name}/shapes"),
                          origin=list(dict.fromkeys(n for g in group for n in g.origin)),
                          output_dtypes=[o.dtype for o in outputs])
    first = min(net.layers.index(u) for u in readers)
    net.layers.remove(layer)
    net.layers.insert(first, layer)
    for o, new in zip(outputs, layer.outputs):
        new.shape = o.shape
        replace_output(net, o, new)
    net.remove_layers(reversed(group))
    return True


class FoldShapeConstants(Pass):
    name = "shape constants"

    def call(self, net: Network) -> PassResult:
        if all(t.shape is not None and all(isinstance(d, int) for d in t.shape) for t in net.inputs):
            return PassResult(net, False)       # a static build: what it did not fold depends on data
        layers, made = _shape_derived(net)
        modified = False
        for group in _groups(layers, made):
            modified = _fold(net, group) or modified
        if modified:
            net.toposort()      # a layer reading several tensors' shapes may need one made after its first reader
        return PassResult(net, modified)
