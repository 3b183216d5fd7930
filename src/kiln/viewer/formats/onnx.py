"""ONNX reader: ModelProto (binary ``.onnx``/``.pb`` or text ``.onnxtxt``) → ViewModel.

Weights stay in the file: initializers become lazy ViewWeights and external
data is read only when a weight is opened, from a file inside the model's
folder (``kiln.paths.resolve_inside``). Shapes of intermediate values come
from ONNX shape inference run on a copy without the large initializers.
Protobuf hands string fields holding invalid UTF-8 over as ``bytes``; every
string read here goes through :func:`_text`, which keeps such bytes visible as
``\\x`` escapes.
"""
from __future__ import annotations

import functools
import math
import pathlib
from typing import Any

import numpy as np

from kiln.errors import ViewerError
from kiln.paths import PathEscapeError, resolve_inside
from kiln.viewer.formats._common import refused
from kiln.viewer.graph import ViewArgument, ViewGraph, ViewModel, ViewNode, ViewTensor, ViewWeight

# op type → category; anything else in the default domains is "other", foreign domains are "plugin".
_CATEGORY_TABLE = {
    "conv": "Conv ConvTranspose ConvInteger QLinearConv DeformConv",
    "activation": "Relu LeakyRelu PRelu Sigmoid Tanh Elu Selu Celu Gelu FastGelu BiasGelu QuickGelu HardSigmoid "
                  "HardSwish Softplus Softsign ThresholdedRelu Mish Swish Softmax LogSoftmax Hardmax",
    "normalization": "BatchNormalization InstanceNormalization LayerNormalization GroupNormalization "
                     "LpNormalization MeanVarianceNormalization LRN RMSNormalization SimplifiedLayerNormalization "
                     "SkipLayerNormalization SkipSimplifiedLayerNormalization",
    "pooling": "MaxPool AveragePool GlobalAveragePool GlobalMaxPool LpPool GlobalLpPool MaxRoiPool RoiAlign "
               "MaxUnpool",
    "shape": "Reshape Flatten Squeeze Unsqueeze Transpose Shape Size Expand Tile Pad DepthToSpace SpaceToDepth",
    "tensor": "Concat Split SplitToSequence Slice Gather GatherElements GatherND Scatter ScatterElements ScatterND "
              "Identity Cast CastLike ConstantOfShape Range Resize Upsample Where OneHot NonZero TopK Trilu "
              "Compress Unique ReverseSequence EyeLike GridSample AffineGrid Col2Im CenterCropPad",
    "elementwise": "Add Sub Mul Div Pow Sqrt Exp Log Abs Neg Reciprocal Min Max Sum Mean Clip Floor Ceil Round "
                   "Sign Erf Equal Less LessOrEqual Greater GreaterOrEqual And Or Not Xor Mod BitShift Sin Cos "
                   "Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh IsNaN IsInf BitwiseAnd BitwiseOr BitwiseXor "
                   "BitwiseNot",
    "matmul": "MatMul Gemm MatMulInteger QLinearMatMul Einsum FusedMatMul",
    "reduce": "ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum "
              "ReduceLogSumExp ReduceSumSquare ArgMax ArgMin CumSum",
    "control": "If Loop Scan",
    "data": "Constant",
    "quantization": "QuantizeLinear DequantizeLinear DynamicQuantizeLinear",
    "recurrent": "LSTM GRU RNN",
    "attention": "Attention MultiHeadAttention GroupQueryAttention RotaryEmbedding",
    "plugin": "NonMaxSuppression",
}
CATEGORY = {op: cat for cat, ops in _CATEGORY_TABLE.items() for op in ops.split()}
_KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}
_MAX_INLINE_BYTES = 1024          # initializers up to this size stay in the shape-inference copy


def _text(value: str | bytes) -> str:
    """A protobuf string field as text (invalid UTF-8 arrives as bytes)."""
    return value if type(value) is str else bytes(value).decode("utf-8", "backslashreplace")


def _texts(values) -> list[str]:
    return [_text(v) for v in values]


def category(op_type: str, domain: str = "") -> str:
    """The viewer category (colour) of an ONNX op."""
    if domain not in _KNOWN_DOMAINS:
        return "plugin"
    return CATEGORY.get(op_type, "other")


def group_path(name: str) -> tuple[str, ...]:
    """Name scopes of a node name: ``/model.24/m.0/Conv`` → ``("model.24", "m.0")``."""
    parts = [p for p in name.split("/") if p]
    return tuple(parts[:-1])


def sniff(path: pathlib.Path, head: bytes) -> str | None:
    """"text" for the ONNX text format, "binary" for a serialized ModelProto, else None."""
    if not head:
        return None
    text = head.lstrip()
    if text.startswith(b"<") and b"ir_version" in text[:400]:
        return "text"
    return "binary" if _looks_like_model_proto(head) else None


# ModelProto field number → protobuf wire type
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2}


def _looks_like_model_proto(head: bytes) -> bool:
    """Walk the top-level protobuf fields in ``head``: all must be ModelProto fields, ir_version first."""
    pos, seen = 0, []
    while pos < len(head):
        tag, pos = _varint(head, pos)
        if tag is None:
            break
        number, wire = tag >> 3, tag & 7
        if _MODEL_FIELDS.get(number) != wire:
            return False
        value, pos = _varint(head, pos)
        if value is None:
            break
        if number == 1 and not 1 <= value <= 64:
            return False
        seen.append(number)
        if wire == 2:
            if number == 7:           # the graph: enough evidence
                break
            pos += value
    return bool(seen) and seen[0] == 1 and (len(seen) > 1 or pos >= len(head))


def _varint(data: bytes, pos: int) -> tuple[int | None, int]:
    result = shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            return None, pos
    return None, pos


def read(path: pathlib.Path, handle: Any = None) -> ViewModel:
    """Read an ONNX file without loading external weights."""
    from kiln.viewer.page import no_gc
    with no_gc():            # many small long-lived objects: collections would cost more than the parse
        return _read(pathlib.Path(path), handle)


def _read(path: pathlib.Path, kind: Any) -> ViewModel:
    import onnx
    if kind not in ("text", "binary"):
        with open(path, "rb") as f:
            kind = "text" if f.read(64).lstrip().startswith(b"<") else "binary"
    if kind == "text":
        import onnx.parser
        model = onnx.parser.parse_model(path.read_text())
    else:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise ViewerError(f"{path.name!r} is not a valid ONNX file ({type(exc).__name__}: {exc}); "
                              f"re-export the model.") from None
    return read_proto(model, path)


def read_proto(model: Any, path: pathlib.Path | None = None) -> ViewModel:
    """Turn an in-memory ``onnx.ModelProto`` into a ViewModel (``path`` resolves external data)."""
    import onnx
    if not isinstance(model, onnx.ModelProto):
        raise ViewerError(f"expected an onnx.ModelProto, got {type(model).__name__}.")
    if not model.HasField("graph"):
        raise ViewerError("the ONNX model has no graph; re-export it.")
    opsets = {_text(o.domain) or "": o.version for o in model.opset_import}
    base = path.parent if path else None
    inferred = _infer(model)
    reader = _GraphReader(opsets, base, {(_text(f.domain), _text(f.name)): f for f in model.functions})
    graph = reader.graph(inferred.graph, _initializers(model.graph))
    producer = " ".join(_text(p) for p in (model.producer_name, model.producer_version) if p) or None
    props: dict[str, Any] = {"IR version": model.ir_version}
    props["Imports"] = ", ".join(f"{d or 'ai.onnx'} v{v}" for d, v in opsets.items())
    if model.domain:
        props["Domain"] = _text(model.domain)
    if model.model_version:
        props["Model version"] = model.model_version
    if model.doc_string:
        props["Description"] = _text(model.doc_string)
    for kv in model.metadata_props:
        props[_text(kv.key)] = _text(kv.value)
    return ViewModel(format="ONNX", path=str(path) if path else None, producer=producer,
                     version=f"opset {opsets.get('', opsets.get('ai.onnx', '?'))}", properties=props,
                     graphs=[graph], file_size=path.stat().st_size if path else model.ByteSize(),
                     warnings=reader.warnings)


def _initializers(graph) -> dict[str, Any]:
    return {_text(t.name): t for t in graph.initializer}


def _infer(model):
    """Shape-infer a light copy: large initializers become typed graph inputs instead of data.

    Returns the model itself when no copy can be made (protobuf refuses to set names that are not UTF-8)."""
    import onnx
    from onnx import helper
    light = onnx.ModelProto()
    try:
        light.ir_version = model.ir_version
        light.opset_import.extend(model.opset_import)
        light.functions.extend(model.functions)
        g = light.graph
        g.name = model.graph.name
        g.node.extend(model.graph.node)
        g.output.extend(model.graph.output)
        g.value_info.extend(model.graph.value_info)
        names = {t.name for t in model.graph.initializer}
        g.input.extend(i for i in model.graph.input if i.name not in names)
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) + 8 * len(t.int64_data) \
                    + 4 * len(t.float_data) + 4 * len(t.int32_data) <= _MAX_INLINE_BYTES:
                g.initializer.append(t)
            else:
                g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    except (UnicodeDecodeError, ValueError, TypeError):
        return model
    try:
        return onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:
        return light


def _dims(type_proto) -> tuple[list[int | str | None] | None, str | None]:
    which = type_proto.WhichOneof("value")
    if which == "tensor_type":
        t = type_proto.tensor_type
        dtype = _dtype_name(t.elem_type) if t.elem_type else None
        if not t.HasField("shape"):
            return None, dtype
        return [d.dim_value if d.HasField("dim_value") else (_text(d.dim_param) or None) for d in t.shape.dim], dtype
    if which == "sequence_type":
        shape, dtype = _dims(type_proto.sequence_type.elem_type)
        return shape, f"sequence<{dtype}>"
    if which == "optional_type":
        shape, dtype = _dims(type_proto.optional_type.elem_type)
        return shape, f"optional<{dtype}>"
    return None, which


class _GraphReader:
    """Converts graphs (and If/Loop/Scan bodies and local functions) keeping node ids unique."""

    def __init__(self, opsets: dict[str, int], base: pathlib.Path | None, functions: dict) -> None:
        self.opsets = opsets
        self.base = base
        self.functions = functions
        self.count = 0
        self.docs: dict[tuple[str, str], str | None] = {}
        self.warnings: list[str] = []

    def graph(self, g, inits: dict[str, Any], name: str | None = None,
              outer: dict[str, ViewTensor] | None = None) -> ViewGraph:
        view = ViewGraph(name=name or _text(g.name) or "graph")
        outer = outer or {}
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            shape, dtype = _dims(vi.type)
            vname = _text(vi.name)
            view.tensors[vname] = ViewTensor(vname, shape, dtype, doc=_text(vi.doc_string) or None)
        local = dict(inits)
        local.update(_initializers(g))
        for tname, t in local.items():
            view.weights[tname] = self.weight(tname, t)
            view.tensors[tname] = ViewTensor(tname, list(t.dims), _dtype_name(t.data_type))
        view.inputs = [view.tensors[n] for n in _texts(i.name for i in g.input) if n not in local]
        view.outputs = [view.tensors[n] for n in _texts(o.name for o in g.output)]
        for node in g.node:
            view.nodes.append(self.node(node, view, outer))
        return view

    def node(self, node, view: ViewGraph, outer: dict[str, ViewTensor]) -> ViewNode:
        import onnx
        self.count += 1
        domain, op_type, name = _text(node.domain) or "", _text(node.op_type), _text(node.name)
        schema = self.schema(op_type, domain)
        vn = ViewNode(id=f"n{self.count}", name=name, op_type=op_type, category=category(op_type, domain),
                      group=group_path(name), doc=self.doc(op_type, domain, schema))
        if domain:
            vn.properties["domain"] = domain
        if schema is not None:
            vn.properties["since opset"] = schema.since_version
        if node.doc_string:
            vn.properties["description"] = _text(node.doc_string)
        inputs, outputs = _texts(node.input), _texts(node.output)
        vn.inputs = _arguments(inputs, schema.inputs if schema else [], "input")
        vn.outputs = _arguments(outputs, schema.outputs if schema else [], "output")
        for t in inputs + outputs:
            if t and t not in view.tensors:
                view.tensors[t] = outer.get(t) or ViewTensor(t)
        for attr in node.attribute:
            aname = _text(attr.name)
            if attr.type == onnx.AttributeProto.GRAPH:
                vn.subgraphs[aname] = self.graph(attr.g, {}, aname, {**outer, **view.tensors})
                vn.attributes[aname] = f"graph {_text(attr.g.name) or aname}"
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for i, sub in enumerate(attr.graphs):
                    vn.subgraphs[f"{aname}[{i}]"] = self.graph(sub, {}, f"{aname}[{i}]", {**outer, **view.tensors})
                vn.attributes[aname] = f"{len(attr.graphs)} graphs"
            else:
                vn.attributes[aname] = _attribute(attr)
        fn = self.functions.get((domain, op_type))
        if fn is not None:
            vn.subgraphs["function"] = self.function(fn)
            vn.category = "custom"
        _implicit_inputs(vn, view)
        return vn

    def function(self, fn) -> ViewGraph:
        domain, name, inputs, outputs = _text(fn.domain), _text(fn.name), _texts(fn.input), _texts(fn.output)
        view = ViewGraph(name=f"{domain}.{name}" if domain else name)
        for n in inputs + outputs:
            view.tensors[n] = ViewTensor(n)
        view.inputs = [view.tensors[n] for n in inputs]
        view.outputs = [view.tensors[n] for n in outputs]
        for node in fn.node:
            view.nodes.append(self.node(node, view, {}))
        return view

    def schema(self, op_type: str, domain: str):
        from onnx import defs
        try:
            return defs.get_schema(op_type, self.opsets.get(domain, self.opsets.get("ai.onnx", 1 << 30)), domain)
        except Exception:
            return None

    def doc(self, op_type: str, domain: str, schema) -> str | None:
        key = (domain, op_type)
        if key not in self.docs:
            self.docs[key] = _schema_doc(schema) if schema is not None else None
        return self.docs[key]

    def weight(self, name: str, t) -> ViewWeight:
        import onnx
        itemsize = _itemsize(t.data_type)
        load = lambda t=t: self.load(t)      # noqa: E731
        if t.data_location == onnx.TensorProto.EXTERNAL:
            load = self.external(name, t)
        return ViewWeight(name, list(t.dims), _dtype_name(t.data_type), load=load,
                          nbytes=math.prod(t.dims) * itemsize if itemsize else None)

    def external(self, name: str, t):
        """The loader of a weight kept in an external file; a location outside the folder is refused now."""
        info = {_text(kv.key): _text(kv.value) for kv in t.external_data}
        location = info.get("location", "")
        if self.base is None:
            return refused(f"weight {name!r} is stored in an external file but the model was given without a "
                            f"path; open the .onnx file instead.")
        try:
            file = resolve_inside(self.base, location, f"the external data location of weight {name!r}")
        except PathEscapeError as exc:
            self.warnings.append(f"{exc} Its values are not shown.")
            return refused(f"Values not read: {exc}")
        return lambda: self.load(t, file, info)

    def load(self, t, file: pathlib.Path | None = None, info: dict[str, str] | None = None) -> np.ndarray:
        """Read one initializer, from the protobuf or from its external ``file``."""
        import onnx
        from onnx import numpy_helper
        if file is None:
            return numpy_helper.to_array(t)
        name = _text(t.name)
        if not file.is_file():
            raise ViewerError(f"weight {name!r} is stored in {info.get('location')!r}, which is missing next to "
                              f"the model.")
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise ViewerError(f"weight {name!r} has a malformed external data offset or length; the model file is "
                              f"damaged.") from None
        size = file.stat().st_size
        if offset < 0 or (length is not None and (length < 0 or offset + length > size)) or offset > size:
            raise ViewerError(f"weight {name!r} lies outside its external file {info.get('location')!r} "
                              f"({size} bytes); the file is truncated or the model damaged.")
        with open(file, "rb") as f:
            f.seek(offset)
            data = f.read(-1 if length is None else length)
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        del copy.external_data[:]
        copy.data_location = onnx.TensorProto.DEFAULT
        copy.raw_data = data
        return numpy_helper.to_array(copy)


@functools.lru_cache(maxsize=None)
def _itemsize(elem_type: int) -> int | None:
    from onnx import helper
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except Exception:
        return None


@functools.lru_cache(maxsize=None)
def _dtype_name(elem_type: int) -> str:
    import onnx
    return onnx.helper.tensor_dtype_to_string(elem_type).replace("TensorProto.", "").lower()


def _arguments(values: list[str], formals, kind: str) -> list[ViewArgument]:
    args: list[ViewArgument] = []
    i = 0
    for k, formal in enumerate(formals):
        variadic = formal.option.name == "Variadic"
        take = values[i:] if variadic else values[i:i + 1]
        i += len(take)
        if take or k < len(values):
            args.append(ViewArgument(formal.name, [v for v in take if v]))
        if variadic:
            break
    for j, v in enumerate(values[i:], start=i):      # unknown op: positional names
        args.append(ViewArgument(f"{kind} {j}", [v] if v else []))
    return [a for a in args if a.values]


def _implicit_inputs(vn: ViewNode, view: ViewGraph) -> None:
    """Outer-scope values read inside a node's bodies become explicit inputs of the node."""
    if not vn.subgraphs:
        return
    used: list[str] = []
    for sub in vn.subgraphs.values():
        for name in _free_values(sub):
            if name not in used:
                used.append(name)
    if used:
        vn.inputs.append(ViewArgument("(outer scope)", used))


def _free_values(g: ViewGraph) -> list[str]:
    defined = {t.name for t in g.inputs} | set(g.weights)
    free: list[str] = []
    for n in g.nodes:
        for arg in n.inputs:
            for v in arg.values:
                if v not in defined and v not in free:
                    free.append(v)
        for arg in n.outputs:
            defined.update(arg.values)
    return free


def _attribute(attr) -> Any:
    import onnx
    from onnx import helper, numpy_helper
    if attr.type == onnx.AttributeProto.TENSOR:
        t = attr.t
        try:
            arr = numpy_helper.to_array(t)
        except Exception:
            return f"tensor {_dtype_name(t.data_type)}{list(t.dims)}"
        if arr.size <= 16:
            return {"tensor": _dtype_name(t.data_type), "shape": list(arr.shape), "value": arr.tolist()}
        return {"tensor": _dtype_name(t.data_type), "shape": list(arr.shape),
                "value": arr.reshape(-1)[:16].tolist(), "truncated": True}
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v if isinstance(v, (int, float, str))
                else str(v) for v in value]
    if isinstance(value, (int, float, str)):
        if attr.type == onnx.AttributeProto.INT and attr.name == "to":
            try:
                return _dtype_name(value)
            except Exception:
                return value
        return value
    return str(value)


def _schema_doc(schema) -> str:
    """Op documentation as light Markdown: summary, then inputs, outputs, attributes, type constraints."""
    lines = [(schema.doc or "").strip(), ""]
    if schema.inputs:
        lines.append("### Inputs")
        lines += [f"- **{p.name}**{_opt(p)} ({p.type_str}): {' '.join(p.description.split())}" for p in schema.inputs]
    if schema.outputs:
        lines.append("### Outputs")
        lines += [f"- **{p.name}**{_opt(p)} ({p.type_str}): {' '.join(p.description.split())}"
                  for p in schema.outputs]
    if schema.attributes:
        lines.append("### Attributes")
        for a in sorted(schema.attributes.values(), key=lambda a: a.name):
            req = " (required)" if a.required else ""
            lines.append(f"- **{a.name}**{req}: {' '.join(a.description.split())}")
    if schema.type_constraints:
        lines.append("### Type constraints")
        for tc in schema.type_constraints:
            lines.append(f"- **{tc.type_param_str}**: {', '.join(tc.allowed_type_strs)}")
    lines.append(f"\n_{schema.domain or 'ai.onnx'} · {schema.name}-{schema.since_version}_")
    return "\n".join(lines)


def _opt(p) -> str:
    return {"Optional": " (optional)", "Variadic": " (variadic)"}.get(p.option.name, "")
