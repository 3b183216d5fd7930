"""ONNX reader: ModelProto (binary ``.onnx``/``.pb`` or text ``.onnxtxt``) → ViewModel.

The ModelProto is decoded by the viewer's own protobuf reader (``_onnx_proto``: the messages of
onnx.proto by field number), so reading a binary file does not import onnx; every string and number
comes out typed, invalid UTF-8 kept visible as ``\\x`` escapes. Weights stay in the file: initializers
become lazy ViewWeights and external data is read only when a weight is opened, from a file inside the
model's folder (``kiln.paths.resolve_inside``). Shapes of intermediate values and the ops' documentation
and argument names come from onnx (shape inference on a copy without the large initializers, op schemas:
``_onnx_infer``): in this process for :func:`read`, in a child process for the second step of
:func:`read_first`, which the served page uses to draw before onnx is imported.
"""
from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from kiln.errors import ViewerError
from kiln.paths import PathEscapeError, resolve_inside
from kiln.viewer.formats import _onnx_proto as P
from kiln.viewer.formats import _protobuf as pb
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
_INFER_TIMEOUT_S = 600


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
    """Read an ONNX file completely (shapes of intermediate values by ONNX shape inference, op documentation),
    without loading external weights. Imports onnx; :func:`read_first` does not."""
    from kiln.viewer.page import no_gc
    path = pathlib.Path(path)
    with no_gc():            # many small long-lived objects: collections would cost more than the parse
        data, model = _load(path, handle)
        return _completed(model, path, len(data), lambda: _complete_here(data))


def read_first(path: pathlib.Path, handle: Any = None) -> tuple[ViewModel, Callable[[], ViewModel] | None]:
    """The model as the file states it (shapes of graph inputs, outputs and value_info only; positional argument
    names; no op documentation) read without importing onnx, and a function that returns the complete model
    (what :func:`read` gives), computed in a child process. Text files are read completely at once."""
    from kiln.viewer.page import no_gc
    path = pathlib.Path(path)
    if _kind(path, handle) == "text":
        return read(path, "text"), None
    with no_gc():
        data, model = _load(path, "binary")
        first = _view_model(model, path, len(data), None, None)

    def complete() -> ViewModel:
        with no_gc():
            return _completed(model, path, len(data), lambda: _complete_apart(data))
    return first, complete


def _completed(model: pb.Message, path: pathlib.Path | None, size: int | None,
               step: Callable[[], tuple[bytes, list]]) -> ViewModel:
    """The model with what ``step`` adds (inferred model, schema entries), or as the file states it with a
    warning saying why not."""
    try:
        inferred, entries = step()
    except ViewerError as exc:
        vm = _view_model(model, path, size, None, None)
        vm.warnings.append(str(exc))
        return vm
    return _view_model(model, path, size, inferred, entries)


def _kind(path: pathlib.Path, kind: Any) -> str:
    if kind in ("text", "binary"):
        return kind
    with open(path, "rb") as f:
        return "text" if f.read(64).lstrip().startswith(b"<") else "binary"


def _load(path: pathlib.Path, kind: Any) -> tuple[bytes, pb.Message]:
    """The serialized ModelProto and its decoded message (a text file is parsed by onnx.parser first)."""
    if _kind(path, kind) == "text":
        import onnx.parser
        data = onnx.parser.parse_model(path.read_text()).SerializeToString()
    else:
        data = path.read_bytes()
    try:
        return data, P.parse_model(data)
    except pb.ProtoError as exc:
        raise ViewerError(f"{path.name!r} is not a valid ONNX file (ProtoError: {exc}); re-export the model.") \
            from None


def read_proto(model: Any, path: pathlib.Path | None = None) -> ViewModel:
    """Turn an in-memory ``onnx.ModelProto`` into a ViewModel (``path`` resolves external data)."""
    import onnx
    if not isinstance(model, onnx.ModelProto):
        raise ViewerError(f"expected an onnx.ModelProto, got {type(model).__name__}.")
    data = model.SerializeToString()
    return _completed(P.parse_model(data), path, None, lambda: _complete_here(data))


_LEAD = "Shapes of intermediate values and operator documentation are not shown"


def _complete_here(data: bytes) -> tuple[bytes, list]:
    """:func:`_onnx_infer.complete` in this process; a failure is a ViewerError naming it."""
    try:
        import onnx
        from kiln.viewer.formats._onnx_infer import complete
    except ImportError:
        raise ViewerError(f"{_LEAD}: the onnx package is not installed (pip install onnx).") from None
    try:
        model = onnx.ModelProto.FromString(data)
    except Exception as exc:
        raise ViewerError(f"{_LEAD}: onnx cannot parse the model ({type(exc).__name__}).") from None
    return complete(model)


def _complete_apart(data: bytes) -> tuple[bytes, list]:
    """:func:`_onnx_infer.complete` in a child process; a failure is a ViewerError naming it."""
    import subprocess
    import sys
    try:
        run = subprocess.run([sys.executable, "-m", "kiln.viewer.formats._onnx_infer"], input=data,
                             capture_output=True, timeout=_INFER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ViewerError(f"{_LEAD}: ONNX shape inference took over {_INFER_TIMEOUT_S} s.") from None
    except OSError as exc:
        raise ViewerError(f"{_LEAD}: {exc}.") from None
    if run.returncode != 0:
        last = (run.stderr.decode("utf-8", "replace").strip().splitlines() or [f"exit status {run.returncode}"])[-1]
        if "No module named 'onnx'" in last:
            last = "the onnx package is not installed (pip install onnx)"
        raise ViewerError(f"{_LEAD}: {last[:300]}.")
    head, sep, inferred = run.stdout.partition(b"\n")
    try:
        entries = json.loads(head) if sep else None
    except ValueError:
        entries = None
    if not isinstance(entries, list):
        raise ViewerError(f"{_LEAD}: the shape-inference process answered something unexpected.")
    return inferred, entries


def _op_table(entries: list) -> dict[tuple[str, str], OpSchema]:
    """Validated schema entries by (domain, op type); malformed entries are left out."""
    table = {}
    for e in entries:
        if not (isinstance(e, list) and len(e) == 6 and isinstance(e[0], str) and isinstance(e[1], str)
                and type(e[2]) is int and isinstance(e[5], str)
                and all(isinstance(fs, list) and all(isinstance(f, list) and len(f) == 2 and isinstance(f[0], str)
                                                     and isinstance(f[1], bool) for f in fs) for fs in e[3:5])):
            continue
        table[(e[0], e[1])] = OpSchema(e[2], [(f[0], f[1]) for f in e[3]], [(f[0], f[1]) for f in e[4]], e[5])
    return table


@dataclass(frozen=True)
class OpSchema:
    """What the page shows of an op's ONNX schema."""

    since_version: int
    inputs: list[tuple[str, bool]]      # (formal name, variadic)
    outputs: list[tuple[str, bool]]
    doc: str


def _view_model(model: pb.Message, path: pathlib.Path | None, size: int | None, inferred: bytes | None,
                entries: list | None) -> ViewModel:
    graph_msg = model.one("graph")
    if graph_msg is None:
        raise ViewerError("the ONNX model has no graph; re-export it.")
    opsets = {o.one("domain", "") or "": o.one("version", 0) for o in model.all("opset_import")}
    base = path.parent if path else None
    functions = {(f.one("domain", ""), f.one("name", "")): f for f in model.all("functions")}
    reader = _GraphReader(_op_table(entries or []), base, functions)
    declared = None
    if inferred:
        try:
            declared = P.parse_shapes(inferred).one("graph")
        except pb.ProtoError:
            declared = None
    graph = reader.graph(graph_msg, _initializers(graph_msg), declared=declared)
    producer = " ".join(p for p in (model.one("producer_name", ""), model.one("producer_version", "")) if p) or None
    props: dict[str, Any] = {"IR version": model.one("ir_version", 0)}
    props["Imports"] = ", ".join(f"{d or 'ai.onnx'} v{v}" for d, v in opsets.items())
    if model.one("domain", ""):
        props["Domain"] = model.one("domain")
    if model.one("model_version", 0):
        props["Model version"] = model.one("model_version")
    if model.one("doc_string", ""):
        props["Description"] = model.one("doc_string")
    for kv in model.all("metadata_props"):
        props[kv.one("key", "")] = kv.one("value", "")
    if size is None:
        size = path.stat().st_size if path else len(inferred or b"")
    return ViewModel(format="ONNX", path=str(path) if path else None, producer=producer,
                     version=f"opset {opsets.get('', opsets.get('ai.onnx', '?'))}", properties=props,
                     graphs=[graph], file_size=size, warnings=reader.warnings)


def _initializers(graph: pb.Message) -> dict[str, pb.Message]:
    return {t.one("name", ""): t for t in graph.all("initializer")}


def _dims(type_proto: pb.Message | None) -> tuple[list[int | str | None] | None, str | None]:
    which = next((w for w in P.TYPE_ONEOF if w in type_proto), None) if type_proto is not None else None
    if which == "tensor_type":
        t = type_proto.one("tensor_type")
        elem = t.one("elem_type", 0)
        dtype = P.dtype_name(elem) if elem else None
        shape = t.one("shape")
        if shape is None:
            return None, dtype
        return [d.one("dim_value") if "dim_value" in d else (d.one("dim_param", "") or None)
                for d in shape.all("dim")], dtype
    if which in ("sequence_type", "optional_type"):
        shape, dtype = _dims(type_proto.one(which).one("elem_type"))
        return shape, f"{which.split('_')[0]}<{dtype}>"
    return None, which


class _GraphReader:
    """Converts graphs (and If/Loop/Scan bodies and local functions) keeping node ids unique."""

    def __init__(self, ops: dict[tuple[str, str], OpSchema], base: pathlib.Path | None, functions: dict) -> None:
        self.ops = ops
        self.base = base
        self.functions = functions
        self.count = 0
        self.warnings: list[str] = []

    def graph(self, g: pb.Message, inits: dict[str, pb.Message], name: str | None = None,
              outer: dict[str, ViewTensor] | None = None, declared: pb.Message | None = None) -> ViewGraph:
        """``declared``: the same graph after shape inference (its values and bodies only), or None."""
        view = ViewGraph(name=name or g.one("name", "") or "graph")
        outer = outer or {}
        nodes = g.all("node")
        if declared is None or len(declared.all("node")) != len(nodes):
            declared = g
        for vi in declared.all("input") + declared.all("output") + declared.all("value_info"):
            shape, dtype = _dims(vi.one("type"))
            vname = vi.one("name", "")
            view.tensors[vname] = ViewTensor(vname, shape, dtype, doc=vi.one("doc_string", "") or None)
        local = dict(inits)
        local.update(_initializers(g))
        for tname, t in local.items():
            view.weights[tname] = self.weight(tname, t)
            view.tensors[tname] = ViewTensor(tname, [int(d) for d in t.all("dims")], P.dtype_name(t.one("data_type", 0)))
        view.inputs = [view.tensors[n] for n in (i.one("name", "") for i in declared.all("input")) if n not in local]
        view.outputs = [view.tensors[o.one("name", "")] for o in declared.all("output")]
        for node, twin in zip(nodes, declared.all("node")):
            view.nodes.append(self.node(node, view, outer, twin))
        return view

    def node(self, node: pb.Message, view: ViewGraph, outer: dict[str, ViewTensor],
             twin: pb.Message | None = None) -> ViewNode:
        """``twin``: the node in the shape-inferred graph, whose bodies carry inferred shapes."""
        self.count += 1
        domain, op_type, name = node.one("domain", "") or "", node.one("op_type", ""), node.one("name", "")
        schema = self.ops.get((domain, op_type))
        vn = ViewNode(id=f"n{self.count}", name=name, op_type=op_type, category=category(op_type, domain),
                      group=group_path(name), doc=schema.doc if schema else None)
        if domain:
            vn.properties["domain"] = domain
        if schema is not None:
            vn.properties["since opset"] = schema.since_version
        if node.one("doc_string", ""):
            vn.properties["description"] = node.one("doc_string")
        inputs, outputs = node.all("input"), node.all("output")
        vn.inputs = _arguments(inputs, schema.inputs if schema else [], "input")
        vn.outputs = _arguments(outputs, schema.outputs if schema else [], "output")
        for t in inputs + outputs:
            if t and t not in view.tensors:
                view.tensors[t] = outer.get(t) or ViewTensor(t)
        bodies = {a.one("name", ""): a for a in twin.all("attribute")} if twin is not None and twin is not node else {}
        for attr in node.all("attribute"):
            aname, kind = attr.one("name", ""), P.attribute_type(attr)
            if kind == P.GRAPH:
                g = attr.one("g") or pb.Message()
                vn.subgraphs[aname] = self.graph(g, {}, aname, {**outer, **view.tensors},
                                                 (bodies.get(aname) or pb.Message()).one("g"))
                vn.attributes[aname] = f"graph {g.one('name', '') or aname}"
            elif kind == P.GRAPHS:
                twins = (bodies.get(aname) or pb.Message()).all("graphs")
                for i, sub in enumerate(attr.all("graphs")):
                    vn.subgraphs[f"{aname}[{i}]"] = self.graph(sub, {}, f"{aname}[{i}]", {**outer, **view.tensors},
                                                               twins[i] if i < len(twins) else None)
                vn.attributes[aname] = f"{len(attr.all('graphs'))} graphs"
            else:
                vn.attributes[aname] = _attribute(attr, kind)
        fn = self.functions.get((domain, op_type))
        if fn is not None:
            vn.subgraphs["function"] = self.function(fn)
            vn.category = "custom"
        _implicit_inputs(vn, view)
        return vn

    def function(self, fn: pb.Message) -> ViewGraph:
        domain, name, inputs, outputs = fn.one("domain", ""), fn.one("name", ""), fn.all("input"), fn.all("output")
        view = ViewGraph(name=f"{domain}.{name}" if domain else name)
        for n in inputs + outputs:
            view.tensors[n] = ViewTensor(n)
        view.inputs = [view.tensors[n] for n in inputs]
        view.outputs = [view.tensors[n] for n in outputs]
        for node in fn.all("node"):
            view.nodes.append(self.node(node, view, {}))
        return view

    def weight(self, name: str, t: pb.Message) -> ViewWeight:
        elem = t.one("data_type", 0)
        size = P.itemsize(elem)
        dims = [int(d) for d in t.all("dims")]
        load = lambda t=t: P.to_array(t)      # noqa: E731
        if t.one("data_location", 0) == P.EXTERNAL:
            load = self.external(name, t)
        return ViewWeight(name, dims, P.dtype_name(elem), load=load, nbytes=math.prod(dims) * size if size else None)

    def external(self, name: str, t: pb.Message) -> Callable[[], np.ndarray]:
        """The loader of a weight kept in an external file; a location outside the folder is refused now."""
        info = {kv.one("key", ""): kv.one("value", "") for kv in t.all("external_data")}
        location = info.get("location", "")
        if self.base is None:
            return refused(f"weight {name!r} is stored in an external file but the model was given without a "
                           f"path; open the .onnx file instead.")
        try:
            file = resolve_inside(self.base, location, f"the external data location of weight {name!r}")
        except PathEscapeError as exc:
            self.warnings.append(f"{exc} Its values are not shown.")
            return refused(f"Values not read: {exc}")
        return lambda: _load_external(name, t, file, info)


def _load_external(name: str, t: pb.Message, file: pathlib.Path, info: dict[str, str]) -> np.ndarray:
    """Read one initializer's values from its external ``file`` (offset and length checked against its size)."""
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
    return P.to_array(t, data)


def _arguments(values: list[str], formals: list[tuple[str, bool]], kind: str) -> list[ViewArgument]:
    args: list[ViewArgument] = []
    i = 0
    for k, (formal, variadic) in enumerate(formals):
        take = values[i:] if variadic else values[i:i + 1]
        i += len(take)
        if take or k < len(values):
            args.append(ViewArgument(formal, [v for v in take if v]))
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


def _tensor_summary(t: pb.Message, sparse: bool = False) -> str:
    return f"{'sparse tensor' if sparse else 'tensor'} {P.dtype_name(t.one('data_type', 0))}{[int(d) for d in t.all('dims')]}"


def _attribute(attr: pb.Message, kind: int) -> Any:
    """An attribute's value as the page shows it (tensors: dtype, shape and up to 16 values)."""
    if kind == P.TENSOR:
        t = attr.one("t") or pb.Message()
        try:
            arr = P.to_array(t)
        except (ViewerError, ValueError, pb.ProtoError):
            return _tensor_summary(t)
        if arr.size <= 16:
            return {"tensor": P.dtype_name(t.one("data_type", 0)), "shape": list(arr.shape), "value": arr.tolist()}
        return {"tensor": P.dtype_name(t.one("data_type", 0)), "shape": list(arr.shape),
                "value": arr.reshape(-1)[:16].tolist(), "truncated": True}
    if kind == P.FLOAT:
        return attr.one("f", 0.0)
    if kind == P.INT:
        value = attr.one("i", 0)
        return P.dtype_name(value) if attr.one("name", "") == "to" and value in P._DTYPES else value
    if kind == P.STRING:
        return bytes(attr.one("s", b"")).decode("utf-8", "replace")
    if kind == P.FLOATS:
        return list(attr.all("floats"))
    if kind == P.INTS:
        return list(attr.all("ints"))
    if kind == P.STRINGS:
        return [bytes(v).decode("utf-8", "replace") for v in attr.all("strings")]
    if kind == P.TENSORS:
        return [_tensor_summary(t) for t in attr.all("tensors")]
    if kind == P.SPARSE_TENSOR:
        return _tensor_summary((attr.one("sparse_tensor") or pb.Message()).one("values") or pb.Message(), True)
    if kind == P.SPARSE_TENSORS:
        return [_tensor_summary(s.one("values") or pb.Message(), True) for s in attr.all("sparse_tensors")]
    if kind == P.TYPE_PROTO:
        return P.type_text(attr.one("tp") or pb.Message())
    if kind == P.TYPE_PROTOS:
        return [P.type_text(tp) for tp in attr.all("type_protos")]
    if attr.one("ref_attr_name", ""):
        return f"@{attr.one('ref_attr_name')}"
    return None
