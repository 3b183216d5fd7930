"""Shrink a failing ONNX model to a small subgraph that still fails (Polygraphy's ``debug reduce``).

The user's oracle ``fails(candidate)`` decides. Every candidate is a valid, self-contained model:
the kept nodes in their original order; each tensor they read that no kept node produces (and
that is no initializer) becomes a graph input; each tensor they produce that the original model
returned, or that only dropped nodes read, becomes a graph output. If/Loop/Scan nodes are kept
whole, and what their subgraphs read from the outer scope counts as their inputs. Constant nodes
ride along with their consumers, so a lone Constant is never the culprit.

The search, as in Polygraphy:

1. bisect the topological order: the shortest prefix that fails, then the latest start of a
   suffix of that prefix that still fails (about 2·log2(n) oracle calls);
2. trim what is left: drop runs of nodes, halving the run length down to a single node (delta
   debugging, so k culprits among m nodes cost about 4·k·log2(m) calls, not m per pass), then
   single nodes again until a whole pass removes nothing.

Each kept set is shown to the oracle at most once. Weights are never copied wholesale: shape
inference runs on a skeleton whose large initializers stand in as typed inputs, and a candidate
copies only the initializers it uses.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from kiln.errors import KilnError

TensorType = tuple[int, Sequence[int | str | None]]

_SMALL_INITIALIZER = 4096   # elements; shape inference sees larger ones only as typed inputs


@dataclass
class ReduceResult:
    """The smallest failing submodel found, and what it cost to find it."""

    model: onnx.ModelProto
    nodes: int              # nodes in ``model``
    original_nodes: int
    calls: int              # oracle calls, the check of the full model included
    inputs: list[str]       # tensors the caller must feed; may be intermediates of the original

    def save(self, path: str | Path) -> None:
        onnx.save(self.model, str(path))


def reduce_model(model: onnx.ModelProto, fails: Callable[[onnx.ModelProto], bool], *,
                 tensor_types: Mapping[str, TensorType] | None = None,
                 log: Callable[[str], None] | None = None) -> ReduceResult:
    """Find a small subgraph of ``model`` for which ``fails`` still returns True.

    An exception from ``fails`` counts as "does not fail" (the candidate broke in some other
    way) and is logged. ``tensor_types`` gives ``(elem_type, shape)`` for tensors whose type
    shape inference cannot find, should they become inputs or outputs of a candidate.
    """
    say = log or (lambda message: None)
    try:
        failed = bool(fails(model))
    except Exception as error:
        raise KilnError("The full model passes the comparison (the check raised "
                        f"{type(error).__name__}: {error}); nothing to reduce.") from error
    if not failed:
        raise KilnError("The full model passes the comparison; nothing to reduce.")
    if not model.graph.node:
        raise KilnError("The model has no nodes; nothing to reduce.")

    builder = _SubmodelBuilder(model, _tensor_types(model, tensor_types or {}, say), say)
    search = _Search(builder, fails, say)
    units = builder.units
    say(f"reduce: {len(model.graph.node)} nodes, {len(units)} without Constants riding along")
    kept = search.bisect(units)
    say(f"bisect: {len(kept)} nodes left after {search.calls} checks")
    kept = search.trim(kept)
    say(f"trim: {len(kept)} nodes left after {search.calls} checks")
    reduced = builder.build(kept)
    return ReduceResult(model=reduced, nodes=len(reduced.graph.node), original_nodes=len(model.graph.node),
                        calls=search.calls + 1, inputs=builder.fed_inputs(reduced))


class _Search:
    """Bisect, then trim; remembers every verdict so no kept set is checked twice."""

    def __init__(self, builder: _SubmodelBuilder, oracle: Callable[[onnx.ModelProto], bool],
                 say: Callable[[str], None]) -> None:
        self.builder, self.oracle, self.say = builder, oracle, say
        self.verdicts: dict[tuple[int, ...], bool] = {tuple(builder.units): True}
        self.calls = 0

    def fails(self, kept: list[int]) -> bool:
        key = tuple(kept)
        if key not in self.verdicts:
            candidate = self.builder.build(kept)
            self.calls += 1
            try:
                verdict = bool(self.oracle(candidate))
            except Exception as error:   # noqa: BLE001 - a candidate that breaks otherwise does not fail
                self.say(f"  {len(candidate.graph.node)}-node candidate: the check raised "
                         f"{type(error).__name__}: {error}; counted as passing")
                verdict = False
            self.verdicts[key] = verdict
        return self.verdicts[key]

    def bisect(self, units: list[int]) -> list[int]:
        lo, hi = 1, len(units)              # units[:hi] fails
        while lo < hi:
            mid = (lo + hi) // 2
            if self.fails(units[:mid]):
                hi = mid
            else:
                lo = mid + 1
        units = units[:hi]
        lo, hi = 0, len(units) - 1          # units[lo:] fails
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.fails(units[mid:]):
                lo = mid
            else:
                hi = mid - 1
        return units[lo:]

    def trim(self, kept: list[int]) -> list[int]:
        size = max(len(kept) // 2, 1)
        while True:
            removed, i = False, 0
            while i < len(kept) and len(kept) > 1:
                trial = kept[:i] + kept[i + size:]
                if trial and self.fails(trial):
                    kept, removed = trial, True
                else:
                    i += size
            if size > 1:
                size = max(min(size // 2, len(kept) // 2), 1)
            elif not removed:
                return kept


class _SubmodelBuilder:
    """Turns a set of kept node indices into a valid, self-contained ModelProto."""

    def __init__(self, model: onnx.ModelProto, types: dict[str, onnx.TypeProto],
                 say: Callable[[str], None]) -> None:
        graph = model.graph
        self.model, self.types, self.say = model, types, say
        self.shapeless: set[str] = set()
        self.nodes = list(graph.node)
        self.reads = [_dedupe(_node_reads(node)) for node in self.nodes]
        self.initializers = {t.name: t for t in graph.initializer}
        self.sparse = {t.values.name: t for t in graph.sparse_initializer}
        self.graph_inputs = {vi.name: vi for vi in graph.input}
        self.graph_outputs = {vi.name for vi in graph.output}
        self.read_anywhere = {name for reads in self.reads for name in reads}
        self.value_info = {vi.name: vi for vi in graph.value_info}
        self.functions = {(f.domain, f.name, f.overload): f for f in model.functions}
        constant = {o: i for i, node in enumerate(self.nodes) if _is_constant(node) for o in node.output}
        self.constants_read = [sorted({constant[r] for r in reads if r in constant}) for reads in self.reads]
        self.units = [i for i, node in enumerate(self.nodes) if not _is_constant(node)] or list(range(len(self.nodes)))

    def build(self, kept: Sequence[int]) -> onnx.ModelProto:
        kept = sorted(set(kept).union(*(self.constants_read[i] for i in kept)))
        produced = {o for i in kept for o in self.nodes[i].output if o}
        read_by_kept: set[str] = set()
        fed: list[str] = []
        for i in kept:
            for name in self.reads[i]:
                if name not in produced and name not in read_by_kept:
                    fed.append(name)
                read_by_kept.add(name)
        returned = [o for i in kept for o in self.nodes[i].output
                    if o and (o in self.graph_outputs or (o in self.read_anywhere and o not in read_by_kept))]
        if not returned:   # only dead outputs left; return them rather than nothing
            returned = [o for o in self.nodes[kept[-1]].output if o]

        src = self.model
        out = onnx.ModelProto(ir_version=src.ir_version, producer_name=src.producer_name,
                              producer_version=src.producer_version, domain=src.domain,
                              model_version=src.model_version)
        out.opset_import.extend(src.opset_import)
        out.metadata_props.extend(src.metadata_props)
        graph = out.graph
        graph.name = src.graph.name
        for i in kept:
            graph.node.add().CopyFrom(self.nodes[i])
        for name in fed:
            if name in self.initializers:
                graph.initializer.add().CopyFrom(self.initializers[name])
            elif name in self.sparse:
                graph.sparse_initializer.add().CopyFrom(self.sparse[name])
            if name in self.graph_inputs and (name in self.initializers or name in self.sparse):
                graph.input.add().CopyFrom(self.graph_inputs[name])    # an overridable initializer stays one
            elif name not in self.initializers and name not in self.sparse:
                graph.input.append(self._value_info(name, "input"))
        returned_set = set(returned)
        for name in returned:
            graph.output.append(self._value_info(name, "output"))
        graph.value_info.extend(self.value_info[o] for o in produced
                                if o in self.value_info and o not in returned_set)
        out.functions.extend(self._used_functions(graph.node))
        return out

    def fed_inputs(self, reduced: onnx.ModelProto) -> list[str]:
        kept = {t.name for t in reduced.graph.initializer} | {t.values.name for t in reduced.graph.sparse_initializer}
        return [vi.name for vi in reduced.graph.input if vi.name not in kept]

    def _value_info(self, name: str, role: str) -> onnx.ValueInfoProto:
        """Inputs need a type and a rank (the caller must make data for them); outputs only an
        elem_type, which ONNX Runtime accepts though onnx.checker wants a shape."""
        known = self.types.get(name)
        tensor = known is not None and known.WhichOneof("value") == "tensor_type"
        if known is None or (tensor and not known.tensor_type.elem_type):
            raise KilnError(f"Tensor {name!r} becomes a graph {role} of a reduced model, but its type is unknown "
                            "(shape inference cannot infer it and the model declares no value_info for it); "
                            f"pass tensor_types={{{name!r}: (elem_type, shape)}}.")
        if tensor and not known.tensor_type.HasField("shape"):
            if role == "input":
                raise KilnError(f"Tensor {name!r} becomes a graph input of a reduced model, but its rank is unknown "
                                "(shape inference cannot infer it); "
                                f"pass tensor_types={{{name!r}: (elem_type, shape)}}.")
            if name not in self.shapeless:
                self.shapeless.add(name)
                self.say(f"output {name!r} has no known shape; declared with its elem_type only "
                         "(ONNX Runtime accepts that, onnx.checker does not)")
        vi = onnx.ValueInfoProto(name=name)
        vi.type.CopyFrom(known)
        return vi

    def _used_functions(self, nodes: Sequence[onnx.NodeProto]) -> list[onnx.FunctionProto]:
        used: set[tuple[str, str, str]] = set()
        stack = list(nodes)
        while stack:
            node = stack.pop()
            key = (node.domain, node.op_type, node.overload)
            if key in self.functions and key not in used:
                used.add(key)
                stack.extend(self.functions[key].node)
            for sub in _subgraphs(node):
                stack.extend(sub.node)
        return [f for key, f in self.functions.items() if key in used]


def _tensor_types(model: onnx.ModelProto, overrides: Mapping[str, TensorType],
                  say: Callable[[str], None]) -> dict[str, onnx.TypeProto]:
    """Declared types, then shape inference's, then the caller's; later ones win."""
    graph = model.graph
    types = {vi.name: vi.type for vi in (*graph.input, *graph.value_info, *graph.output)
             if vi.type.WhichOneof("value") is not None}
    given = {name: helper.make_tensor_type_proto(elem_type, list(shape))
             for name, (elem_type, shape) in overrides.items()}
    try:
        inferred = onnx.shape_inference.infer_shapes(_skeleton(model, given), data_prop=True)
    except Exception as error:   # noqa: BLE001 - declared types are still worth using
        say(f"shape inference failed ({type(error).__name__}: {error}); using declared types only")
    else:
        g = inferred.graph
        types.update((vi.name, vi.type) for vi in (*g.value_info, *g.output)
                     if vi.type.WhichOneof("value") is not None)
    types.update(given)
    return types


def _skeleton(model: onnx.ModelProto, given: Mapping[str, onnx.TypeProto]) -> onnx.ModelProto:
    """The model with its large weights replaced by typed graph inputs, cheap to serialize, and
    the caller's types declared so that inference carries them past ops it cannot see into."""
    out = onnx.ModelProto(ir_version=model.ir_version)
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    src, graph = model.graph, out.graph
    graph.node.extend(src.node)
    graph.input.extend(src.input)
    graph.output.extend(src.output)
    ends = {vi.name for vi in (*src.input, *src.output)}
    graph.value_info.extend(vi for vi in src.value_info if vi.name not in given)
    graph.value_info.extend(helper.make_value_info(name, t) for name, t in given.items() if name not in ends)
    declared = {vi.name for vi in src.input}
    for t in src.initializer:
        if math.prod(t.dims) <= _SMALL_INITIALIZER:
            graph.initializer.append(t)
        elif t.name not in declared:
            graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for t in src.sparse_initializer:
        if t.values.name not in declared:
            graph.input.append(helper.make_tensor_value_info(t.values.name, t.values.data_type, list(t.dims)))
    return out


def _is_constant(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx") and not node.input


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    subs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            subs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            subs.extend(attr.graphs)
    return subs


def _node_reads(node: onnx.NodeProto) -> list[str]:
    """The node's inputs, and what its subgraphs read from the enclosing scope."""
    reads = [name for name in node.input if name]
    for sub in _subgraphs(node):
        reads.extend(_outer_reads(sub))
    return reads


def _outer_reads(graph: onnx.GraphProto) -> list[str]:
    bound = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    bound |= {t.values.name for t in graph.sparse_initializer}
    reads: list[str] = []
    for node in graph.node:
        reads.extend(name for name in _node_reads(node) if name not in bound)
        bound.update(node.output)
    reads.extend(vi.name for vi in graph.output if vi.name not in bound)
    return reads


def _dedupe(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))
