"""ONNX → Network.

Each node goes to the converter registered for its (domain, op type) at the
model's opset, or to a registered plugin; anything else is one error naming the
node, its op type, domain and opset, and how to supply a plugin.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from kiln.errors import ParseError, PluginError, UnsupportedOperatorError
from kiln.ir.network import Layer, Network, Tensor
from kiln.onnx.registry import lookup

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
                9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 14: "complex64",
                15: "complex128", 16: "bfloat16", 17: "float8_e4m3fn", 18: "float8_e4m3fnuz", 19: "float8_e5m2",
                20: "float8_e5m2fnuz", 21: "uint4", 22: "int4", 23: "float4_e2m1fn", 24: "float8_e8m0fnu",
                25: "uint2", 26: "int2"}


def onnx_dtype(code: int, where: str = "") -> str:
    name = _ONNX_DTYPES.get(int(code))
    if name is None:
        import onnx
        try:
            label = onnx.TensorProto.DataType.Name(int(code))
        except ValueError:
            label = str(code)
        raise ParseError(f"{where}uses data type {label}, which Kiln does not support yet (float8/int4 types).")
    return name


class Node:
    """A node as converters see it: inputs as Tensors, attributes as Python values."""

    def __init__(self, proto, inputs: list[Tensor | None], ctx: "ConvertContext") -> None:
        self.proto = proto
        self.op_type = proto.op_type
        self.domain = proto.domain
        self.name = proto.name or f"{proto.op_type}_{ctx.counter}"
        self.inputs = inputs
        self.output_names = list(proto.output)
        self.attrs = {a.name: _attr_value(a) for a in proto.attribute}

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def input(self, i: int) -> Tensor | None:
        return self.inputs[i] if i < len(self.inputs) else None

    @property
    def num_outputs(self) -> int:
        return len(self.output_names)

    def __repr__(self) -> str:
        return f"{self.name!r} ({self.op_type})"


def _attr_value(a) -> Any:
    from onnx import AttributeProto, numpy_helper
    t = a.type
    if t == AttributeProto.FLOAT:
        return float(a.f)
    if t == AttributeProto.INT:
        return int(a.i)
    if t == AttributeProto.STRING:
        return a.s.decode("utf-8", "replace")
    if t == AttributeProto.TENSOR:
        return numpy_helper.to_array(a.t)
    if t == AttributeProto.GRAPH:
        return a.g
    if t == AttributeProto.FLOATS:
        return [float(v) for v in a.floats]
    if t == AttributeProto.INTS:
        return [int(v) for v in a.ints]
    if t == AttributeProto.STRINGS:
        return [s.decode("utf-8", "replace") for s in a.strings]
    if t == AttributeProto.TENSORS:
        return [numpy_helper.to_array(x) for x in a.tensors]
    if t == AttributeProto.GRAPHS:
        return list(a.graphs)
    if t == AttributeProto.SPARSE_TENSOR:
        return _dense(a.sparse_tensor)
    return None


def _dense(sp) -> np.ndarray:
    """A SparseTensorProto as a dense array (indices flat, or one row of coordinates per value)."""
    from onnx import numpy_helper
    vals = numpy_helper.to_array(sp.values)
    idx = numpy_helper.to_array(sp.indices)
    dense = np.zeros(list(sp.dims), vals.dtype)
    if idx.ndim == 1:
        dense.reshape(-1)[idx] = vals
    else:
        dense[tuple(idx.T)] = vals
    return dense


class ConvertContext:
    """What a converter uses to add layers: the network, the opset, naming and origin."""

    def __init__(self, net: Network, opsets: dict[str, int], values: dict[str, Tensor],
                 parent: "ConvertContext | None" = None) -> None:
        self.net = net
        self.opsets = opsets
        self.values = values
        self.parent = parent
        self.node: Node | None = None
        self.counter = 0

    @property
    def opset(self) -> int:
        return self.opsets.get("", 1)

    def lookup_value(self, name: str) -> Tensor | None:
        ctx: ConvertContext | None = self
        while ctx is not None:
            if name in ctx.values:
                return ctx.values[name]
            ctx = ctx.parent
        return None

    def add(self, kind: str, inputs: Sequence[Tensor | None], attrs: dict[str, Any] | None = None,
            num_outputs: int = 1, output_dtypes: Sequence[str] | None = None) -> Layer:
        """Add a layer that belongs to the current node (named after it, origin set)."""
        base = self.node.name if self.node is not None else kind
        name = base
        existing = self._layer_names()
        k = 0
        while name in existing:
            k += 1
            name = f"{base}/{kind}_{k}"
        existing.add(name)
        if output_dtypes is None:
            # until shape inference knows better, outputs take the first input's type (not float32): a Cast
            # after an op whose shapes are only known at run time must not look like a no-op
            first = next((t.dtype for t in inputs if t is not None), None)
            if first is not None and first != "float32" and "(" not in first:
                output_dtypes = [first] * num_outputs
        layer = self.net.add_layer(kind, list(inputs), attrs or {}, num_outputs=num_outputs, name=name,
                                   origin=[self.node.name] if self.node is not None else [],
                                   output_names=[self.net.unique_name(f"{name}:{i}") for i in range(num_outputs)],
                                   output_dtypes=output_dtypes)
        return layer

    def add1(self, kind: str, inputs: Sequence[Tensor | None], attrs: dict[str, Any] | None = None,
             dtype: str | None = None) -> Tensor:
        """Add a one-output layer and return its output tensor."""
        return self.add(kind, inputs, attrs, 1, [dtype] if dtype else None).outputs[0]

    def const(self, value: Any, dtype: Any = None) -> Tensor:
        arr = np.asarray(value, dtype=dtype) if dtype is not None else np.asarray(value)
        base = f"{self.node.name}/const" if self.node is not None else "const"
        return self.net.add_constant(arr, name=self.net.unique_name(base))

    def _layer_names(self) -> set[str]:
        names = getattr(self.net, "_kiln_layer_names", None)
        if names is None:
            names = self.net._kiln_layer_names = {l.name for l in self.net.layers}
        return names

    def subgraph(self, graph, name: str, input_types: Sequence[str | None] | None = None) -> Network:
        """Convert an If/Loop/Scan body; it may read this scope's values.

        ``input_types`` gives the types of body inputs that the model leaves untyped (function
        expansions do), known to the caller from the values it feeds the body.
        """
        sub = Network(name)
        sub.outer = self.net
        _convert_graph(graph, sub, self.opsets, parent=self, input_types=input_types)
        return sub


def parse(model: Any, *, plugins: Sequence[str] = ()) -> Network:
    """Parse an ONNX model (path, bytes or ModelProto) into a Network."""
    import onnx

    from kiln.plugins import load as load_plugins
    from kiln.plugins import load_builtins
    load_builtins()
    for p in plugins:
        load_plugins(p)
    source = None
    if isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        if not os.path.exists(source):
            raise ParseError(f"{source!r} does not exist; check the path.")
        try:
            proto = onnx.load(source)
        except Exception as exc:
            raise ParseError(f"{source!r} is not a readable ONNX model ({_first_line(exc)}); check that the file is a "
                             f"complete .onnx ModelProto and that external data files sit beside it.") from None
    elif isinstance(model, (bytes, bytearray)):
        try:
            proto = onnx.load_from_string(bytes(model))
        except Exception as exc:
            raise ParseError(f"The bytes given are not an ONNX model ({_first_line(exc)}).") from None
    else:
        proto = model
    if not hasattr(proto, "graph") or not proto.graph.node and not proto.graph.output:
        raise ParseError(f"{source or 'The model'} has an empty graph; nothing to build.")
    opsets = {}
    for imp in proto.opset_import:
        opsets["" if imp.domain in ("", "ai.onnx") else imp.domain] = int(imp.version)
    if "" not in opsets:
        opsets[""] = 1 if not proto.opset_import else min(opsets.values())
    net = Network(proto.graph.name or "network")
    net.metadata.update({"source": source, "producer": proto.producer_name, "opset": opsets.get(""),
                         "ir_version": proto.ir_version})
    _convert_graph(proto.graph, net, opsets, parent=None)
    return net


def _first_line(exc: Exception) -> str:
    s = str(exc).strip().splitlines()
    return s[0] if s else type(exc).__name__


def _type_name(tp, where: str) -> str:
    """Kiln's name for an ONNX TypeProto: a dtype, or ``sequence(...)``/``optional(...)`` around one."""
    field = tp.WhichOneof("value")
    if field == "tensor_type":
        return onnx_dtype(tp.tensor_type.elem_type, where)
    if field == "sequence_type":
        return f"sequence({_type_name(tp.sequence_type.elem_type, where)})"
    if field == "optional_type":
        return f"optional({_type_name(tp.optional_type.elem_type, where)})"
    raise ParseError(f"{where}is a {field or 'untyped value'}; Kiln takes tensors, sequences of tensors and "
                     f"optionals as graph values, not maps or sparse tensors.")


def _value_info_shape(vi) -> tuple[str, tuple | None]:
    tt = vi.type.tensor_type
    where = f"Graph value {vi.name!r} "
    if not vi.type.HasField("tensor_type"):
        return _type_name(vi.type, where), None      # sequences/optionals: lists of tensors or None at run time
    dtype = onnx_dtype(tt.elem_type, where)
    if not tt.HasField("shape"):
        return dtype, None
    dims = []
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(f"{vi.name}_dim{i}")
    return dtype, tuple(dims)


def _convert_graph(graph, net: Network, opsets: dict[str, int], parent: ConvertContext | None,
                   input_types: Sequence[str | None] | None = None) -> None:
    from onnx import numpy_helper
    values: dict[str, Tensor] = {}
    ctx = ConvertContext(net, opsets, values, parent)
    for init in graph.initializer:
        try:
            arr = numpy_helper.to_array(init)
        except Exception as exc:
            raise ParseError(f"Initializer {init.name!r} cannot be read ({_first_line(exc)}); if the model uses external "
                             f"data, keep the data files beside the .onnx file.") from None
        values[init.name] = net.add_constant(arr, name=init.name)
    for sp in graph.sparse_initializer:
        values[sp.values.name] = net.add_constant(_dense(sp), name=sp.values.name)
    for k, vi in enumerate(graph.input):
        if vi.name in values:
            continue       # an initializer with a default value: treat as a constant (TensorRT does)
        hint = input_types[k] if input_types is not None and k < len(input_types) else None
        dtype, shape = (hint, None) if hint and vi.type.WhichOneof("value") is None else _value_info_shape(vi)
        if shape is None and parent is None and vi.type.HasField("tensor_type"):
            raise ParseError(f"Graph input {vi.name!r} has no shape; export the model with input shapes or set them "
                             f"with onnx.tools.update_model_dims.")
        values[vi.name] = net.add_input(vi.name, dtype, shape if shape is not None else ())
        if shape is None:
            values[vi.name].shape = None
    for node_proto in graph.node:
        ctx.counter += 1
        ins = []
        for name in node_proto.input:
            if name == "":
                ins.append(None)
                continue
            t = ctx.lookup_value(name)
            if t is None:
                raise ParseError(f"Node {node_proto.name or node_proto.op_type!r} ({node_proto.op_type}) reads "
                                 f"{name!r}, which no earlier node, input or initializer provides; the graph is not "
                                 f"topologically sorted or is incomplete.")
            ins.append(t)
        node = Node(node_proto, ins, ctx)
        ctx.node = node
        outs = _convert_node(ctx, node)
        if len(outs) < len([o for o in node.output_names if o]):
            # optional trailing outputs a converter does not produce
            outs = list(outs) + [None] * (len(node.output_names) - len(outs))
        for name, t in zip(node.output_names, outs):
            if not name or t is None:
                continue
            if t.producer is not None and t.network is net and t.name not in values and name not in net.tensors \
                    and t.producer.origin == [node.name] and not _is_named(t, values):
                net.rename(t, name)
            values[name] = t
        ctx.node = None
    for vi in graph.output:
        t = values.get(vi.name) or ctx.lookup_value(vi.name)
        if t is None:
            raise ParseError(f"Graph output {vi.name!r} is produced by no node.")
        if t.name != vi.name or t in net.outputs or t in net.inputs or t.network is not net:
            if t.name == vi.name and t.is_constant and t.network is net:
                pass
            else:
                ident = net.add_layer("Identity", [t], {}, name=f"{vi.name}/output", output_names=[
                    vi.name if vi.name not in net.tensors else net.unique_name(vi.name)], origin=[])
                t = ident.outputs[0]
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            declared = onnx_dtype(vi.type.tensor_type.elem_type, f"Graph output {vi.name!r} ")
            if t.producer is not None and t.dtype == "float32" and declared != "float32":
                t.dtype = declared
        elif vi.type.WhichOneof("value") in ("sequence_type", "optional_type") and t.producer is not None:
            t.dtype = _type_name(vi.type, f"Graph output {vi.name!r} ")
        net.mark_output(t)


def _is_named(t: Tensor, values: dict[str, Tensor]) -> bool:
    return any(v is t for v in values.values())


def _convert_node(ctx: ConvertContext, node: Node) -> list[Tensor | None]:
    from kiln.plugins import registry
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    opset = ctx.opsets.get(domain, ctx.opset if domain == "" else 1)
    plugin_cls = _find_plugin(node, registry)
    fn = lookup(node.op_type, opset, domain)
    if plugin_cls is not None and (fn is None or plugin_cls.overrides_builtin or "plugin_name" in node.attrs):
        return _plugin_layer(ctx, node, plugin_cls, opset)
    if fn is None:
        raise UnsupportedOperatorError(
            f"Node {node.name!r} ({node.op_type}, domain {domain or 'ai.onnx'}, opset {opset}) is not supported by "
            f"Kiln; supply a plugin: subclass kiln.Plugin with name={node.op_type!r}, register it, and pass "
            f"--plugins your_plugins.py (kiln check lists every unsupported node).")
    try:
        outs = fn(ctx, node)
    except (ParseError, PluginError):
        raise
    except Exception as exc:
        from kiln.errors import KilnError
        if isinstance(exc, KilnError):
            raise
        raise ParseError(f"Node {node.name!r} ({node.op_type}, opset {opset}) cannot be converted: "
                         f"{_first_line(exc)}") from exc
    if isinstance(outs, Tensor):
        outs = [outs]
    return list(outs)


def _find_plugin(node: Node, registry):
    name = node.attrs.get("plugin_name", node.op_type)
    version = node.attrs.get("plugin_version")
    namespaces = [node.attrs["plugin_namespace"]] if "plugin_namespace" in node.attrs else ["", node.domain, "kiln"]
    for ns in dict.fromkeys(namespaces):
        cls = registry.find(name, ns, str(version) if version is not None else None)
        if cls is not None:
            # built-in plugins that mirror standard ONNX ops are reached through their converters
            if ns == "kiln" and "plugin_namespace" not in node.attrs and lookup(node.op_type, 99, "") is not None:
                continue
            return cls
    return None


def _plugin_layer(ctx: ConvertContext, node: Node, cls, opset: int) -> list[Tensor]:
    attrs = {k: v for k, v in node.attrs.items() if k not in ("plugin_name", "plugin_namespace", "plugin_version")}
    for k, v in list(attrs.items()):
        if isinstance(v, np.ndarray):
            attrs[k] = v.tolist()
    if hasattr(cls, "onnx_fields"):
        attrs = cls.onnx_fields(attrs, opset)
    try:
        plugin = cls(**attrs)
    except PluginError as exc:
        raise PluginError(f"Node {node.name!r} ({node.op_type}): {exc}") from None
    return plugin_outputs(ctx, plugin, node.inputs, node.num_outputs)


def plugin_outputs(ctx: ConvertContext, plugin, inputs: list[Tensor | None], num_outputs: int | None = None) -> list:
    from kiln.plugins.base import TensorDesc
    descs = plugin.output_descs([TensorDesc(tuple(t.shape) if t.shape is not None else (), t.dtype)
                                 if t is not None else None for t in inputs])
    layer = ctx.add("Plugin", inputs, {"plugin": plugin}, num_outputs=len(descs),
                    output_dtypes=[d.dtype for d in descs])
    for o, d in zip(layer.outputs, descs):
        o.shape = tuple(d.shape)
    return layer.outputs
