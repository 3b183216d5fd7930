"""Fallback islands: ONNX nodes Kiln cannot map become ``OrtIsland`` layers that ONNX Runtime runs.

With ``kiln.onnx.parse(model, fallback="onnxruntime")`` a node with no converter and no
plugin is not an error: it becomes a minimal ONNX model of its own (the node, its inputs
and outputs as graph IO, the constants it reads as initializers), stored as the layer's
first input, a uint8 constant that lands in the engine's weights section. A run of such
nodes joins one island while that stays simple: a node joins the island that produced one
of its inputs as long as nothing else reads that island yet. ``prune`` then drops island
outputs nobody reads. ``kiln.kernels.ort_island`` runs and validates islands.
"""
from __future__ import annotations

from typing import Any

from kiln.errors import KilnError, ParseError, UnsupportedOperatorError
from kiln.ir.dtypes import is_container
from kiln.ir.network import Layer, Network, Tensor, subgraphs

MODES = ("onnxruntime",)
KIND = "OrtIsland"


def check_mode(fallback: str | None) -> None:
    if fallback is not None and fallback not in MODES:
        raise ParseError(f"fallback {fallback!r} is not supported; use 'onnxruntime' (or None for no fallback).")


def enabled(ctx) -> bool:
    """Whether the parse that ``ctx`` belongs to makes islands (the top network's metadata says)."""
    while ctx.parent is not None:
        ctx = ctx.parent
    return ctx.net.metadata.get("fallback") == "onnxruntime"


def why_not(proto, domain: str, inputs: list[Tensor | None] | None = None) -> str | None:
    """Why a node cannot run as an island (a phrase), or None."""
    from onnx import AttributeProto

    from kiln.kernels.ort_island import DOMAINS, IO_TYPES
    if domain not in DOMAINS:
        return f"ONNX Runtime runs only ai.onnx, ai.onnx.ml and com.microsoft ops, and its domain is {domain!r}"
    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in proto.attribute):
        return "it holds subgraphs"
    for t in inputs or ():
        if t is not None and not t.is_constant and (is_container(t.dtype) or t.dtype not in IO_TYPES):
            return f"its input {t.name!r} is a {t.dtype}, and islands take numeric tensors only"
    return None


def island(ctx, node, opset: int) -> list[Tensor]:
    """Run ``node`` in ONNX Runtime: a new island, or the island that made one of its inputs grown by it."""
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    why = why_not(node.proto, domain, node.inputs)
    if why:
        raise _refused(node, domain, opset, f"cannot fall back to ONNX Runtime ({why})")
    net = ctx.net
    layer = _growable(net, node.inputs)
    model = _load(layer) if layer is not None else _empty(ctx)
    g = model.graph
    known = {v.name for v in g.input} | {v.name for v in g.output} | {i.name for i in g.initializer}
    reads = list(layer.inputs[1:]) if layer is not None else []
    for name, t in zip(node.proto.input, node.inputs):
        if not name or t is None or name in known:
            continue
        known.add(name)
        if t.is_constant:
            g.initializer.append(_initializer(name, t))
        else:
            g.input.append(_value_info(name, t))
            reads.append(t)
    g.node.append(node.proto)
    _import(model, domain, ctx.opsets)
    out_names = [n for n in node.proto.output if n]
    g.output.extend(_output_value(n) for n in out_names)
    try:
        data, types = _typed(model, reads)
    except KilnError as exc:
        raise _refused(node, domain, opset, f"ONNX Runtime cannot run it either ({exc})") from None
    const = net.add_constant(_ort().island_bytes(data), name=net.unique_name(f"{node.name}/onnx"))
    if layer is None:
        layer = ctx.add(KIND, [const, *reads], _attrs(model, data), num_outputs=len(out_names))
        for t, n in zip(layer.outputs, out_names):
            if n not in net.tensors:
                net.rename(t, n)
        outs = list(layer.outputs)
    else:
        net.layers.remove(layer)          # nothing reads it yet: it may move after its new inputs' producers
        net.layers.append(layer)
        layer.origin.append(node.name)
        for t in reads[len(layer.inputs) - 1:]:
            layer.inputs.append(None)
            layer.set_input(len(layer.inputs) - 1, t)
        outs = []
        for n in out_names:
            t = net._add_tensor(Tensor(n if n not in net.tensors else net.unique_name(n), "float32"))
            t.producer = layer
            layer.outputs.append(t)
            outs.append(t)
        _replace_model(net, layer, const, _attrs(model, data))
    for o, (shape, dtype) in zip(layer.outputs, types):
        o.dtype, o.shape = dtype, shape
    by_name = dict(zip(out_names, outs))
    return [by_name.get(n) for n in node.proto.output]


def _refused(node, domain: str, opset: int, why: str) -> UnsupportedOperatorError:
    return UnsupportedOperatorError(
        f"Node {node.name!r} ({node.op_type}, domain {domain or 'ai.onnx'}, opset {opset}) is not supported by Kiln "
        f"and {why}; supply a plugin (kiln.Plugin with name={node.op_type!r}) and pass --plugins your_plugins.py.")


def _growable(net: Network, inputs: list[Tensor | None]) -> Layer | None:
    """The island that made one of ``inputs``, if nothing reads any of its outputs yet."""
    for t in reversed(inputs):
        p = t.producer if t is not None else None
        if p is not None and p.kind == KIND and p.network is net and not any(o.uses for o in p.outputs):
            return p
    return None


def _empty(ctx):
    from onnx import helper
    return helper.make_model(helper.make_graph([], "island", [], []),
                             opset_imports=[helper.make_opsetid("", ctx.opset)], producer_name="kiln")


def _import(model, domain: str, opsets: dict[str, int]) -> None:
    from onnx import helper
    if domain and not any(i.domain == domain for i in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, opsets.get(domain, 1)))
    model.ir_version = max(4, helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))


def _onnx_type(dtype: str) -> int:
    from onnx import helper

    from kiln.ir.dtypes import np_dtype
    return helper.np_dtype_to_tensor_dtype(np_dtype(dtype))


def _value_info(name: str, t: Tensor):
    """A graph input of the tensor's type, its shape left open (the engine's shapes decide)."""
    from onnx import helper
    return helper.make_tensor_value_info(name, _onnx_type(t.dtype), None)


def _initializer(name: str, t: Tensor):
    import numpy as np
    from onnx import numpy_helper
    return numpy_helper.from_array(np.asarray(t.value), name=name)


def _load(layer: Layer):
    import onnx
    return onnx.load_model_from_string(layer.inputs[0].value.tobytes())


def _output_value(name: str):
    from onnx import ValueInfoProto
    vi = ValueInfoProto()
    vi.name = name
    return vi


def _ort():
    from kiln.kernels import ort_island
    return ort_island


def _typed(model, reads: list[Tensor]) -> tuple[bytes, list]:
    """Type the island's outputs by ONNX Runtime's inference at its inputs' shapes; its bytes and the types."""
    from onnx import helper
    g = model.graph
    for vi in g.output:
        vi.ClearField("type")
    shapes = [tuple(t.shape) if t.shape is not None else None for t in reads]
    types = _ort().output_types(model.SerializeToString(), shapes)
    for vi, (_, dtype) in zip(g.output, types):
        vi.CopyFrom(helper.make_tensor_value_info(vi.name, _onnx_type(dtype), None))
    return model.SerializeToString(), types


def _attrs(model, data: bytes) -> dict[str, Any]:
    ort = _ort()
    opset = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    return {"opset": int(opset), "ops": [ort.op_label(n.domain, n.op_type) for n in model.graph.node],
            "sha256": ort.digest(data)}


def _replace_model(net: Network, layer: Layer, const: Tensor, attrs: dict[str, Any]) -> None:
    old = layer.inputs[0]
    layer.set_input(0, const)
    if old is not None and not old.uses:
        net.tensors.pop(old.name, None)
    layer.attrs.update(attrs)


def prune(net: Network) -> None:
    """Drop island outputs that nothing reads (inner values a grown island no longer hands out)."""
    for layer in list(net.layers):
        for g in subgraphs(layer):
            prune(g)
        if layer.kind != KIND:
            continue
        dead = [i for i, o in enumerate(layer.outputs) if not o.uses and o not in net.outputs]
        if not dead or len(dead) == len(layer.outputs):
            continue
        model = _load(layer)
        for i in reversed(dead):
            del model.graph.output[i]
            net.tensors.pop(layer.outputs[i].name, None)
            del layer.outputs[i]
        data, _ = _typed(model, layer.inputs[1:])
        const = net.add_constant(_ort().island_bytes(data), name=net.unique_name(f"{layer.name}/onnx"))
        _replace_model(net, layer, const, _attrs(model, data))


def annotate(findings: list[dict[str, Any]], proto) -> None:
    """Mark each unsupported node ``kiln check`` found with whether it would run in ONNX Runtime instead:
    ``fallback`` is "onnxruntime" or None, and ``fallback_reason`` says why not."""
    nodes: dict[tuple[str, str], Any] = {}

    def walk(graph) -> None:
        for i, node in enumerate(graph.node):
            nodes.setdefault((node.name or f"{node.op_type}_{i}", node.op_type), node)
            for a in node.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(sub)
    walk(proto.graph)
    for f in findings:
        node = nodes.get((f["name"], f["op_type"]))
        why = why_not(node, f["domain"]) if node is not None else "the node was not found"
        f["fallback"] = "onnxruntime" if why is None else None
        if why is not None:
            f["fallback_reason"] = why
