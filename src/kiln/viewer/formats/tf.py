"""TensorFlow: frozen GraphDef (``.pb``/``.pbtxt``), MetaGraphDef (``.meta``) and SavedModel directories.

A SavedModel's ``variables/`` checkpoint is indexed (``_tensorbundle``) and its
variables shown as weights, read on demand.

Messages are described by field number from TensorFlow's ``graph.proto``,
``node_def.proto``, ``attr_value.proto``, ``tensor.proto``, ``function.proto``,
``meta_graph.proto`` and ``saved_model.proto``.  ``Const`` nodes become lazy
weights, ``Placeholder`` nodes graph inputs, name scopes become groups, and
library functions (where TF2 SavedModels keep their layers) extra graphs.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ViewerError
from kiln.viewer.formats import _protobuf as pb
from kiln.viewer.formats._common import GraphBuilder, count, file_bytes, guarded, inside, weights_graph
from kiln.viewer.formats._prototext import TextFormatError, parse as parse_text
from kiln.viewer.graph import ViewArgument, ViewGraph, ViewModel, ViewTensor, ViewWeight

_FMT = "TensorFlow"

SCHEMA: dict[str, pb.Schema] = {
    "SavedModel": {1: ("saved_model_schema_version", "int"), 2: ("meta_graphs", "MetaGraphDef")},
    "MetaGraphDef": {1: ("meta_info_def", "MetaInfoDef"), 2: ("graph_def", "GraphDef"), 3: ("saver_def", "bytes"),
                     4: ("collection_def", "map:string:bytes"), 5: ("signature_def", "map:string:SignatureDef"),
                     6: ("asset_file_def", "bytes"), 7: ("object_graph_def", "bytes")},
    "MetaInfoDef": {1: ("meta_graph_version", "string"), 2: ("stripped_op_list", "bytes"), 3: ("any_info", "bytes"),
                    4: ("tags", "string"), 5: ("tensorflow_version", "string"),
                    6: ("tensorflow_git_version", "string"), 7: ("stripped_default_attrs", "bool"),
                    8: ("function_aliases", "map:string:string")},
    "SignatureDef": {1: ("inputs", "map:string:TensorInfo"), 2: ("outputs", "map:string:TensorInfo"),
                     3: ("method_name", "string"), 4: ("defaults", "map:string:bytes")},
    "TensorInfo": {1: ("name", "string"), 2: ("dtype", "enum"), 3: ("tensor_shape", "TensorShapeProto"),
                   4: ("coo_sparse", "bytes"), 5: ("composite_tensor", "bytes")},
    "GraphDef": {1: ("node", "NodeDef"), 2: ("library", "FunctionDefLibrary"), 3: ("version", "int"),
                 4: ("versions", "VersionDef"), 5: ("debug_info", "bytes")},
    "VersionDef": {1: ("producer", "int"), 2: ("min_consumer", "int"), 3: ("bad_consumers", "int")},
    "NodeDef": {1: ("name", "string"), 2: ("op", "string"), 3: ("input", "string"), 4: ("device", "string"),
                5: ("attr", "map:string:AttrValue"), 6: ("experimental_debug_info", "bytes"),
                7: ("experimental_type", "bytes")},
    "AttrValue": {1: ("list", "ListValue"), 2: ("s", "bytes"), 3: ("i", "int"), 4: ("f", "float"), 5: ("b", "bool"),
                  6: ("type", "enum"), 7: ("shape", "TensorShapeProto"), 8: ("tensor", "TensorProto"),
                  9: ("placeholder", "string"), 10: ("func", "NameAttrList")},
    "ListValue": {2: ("s", "bytes"), 3: ("i", "int"), 4: ("f", "float"), 5: ("b", "bool"), 6: ("type", "enum"),
                  7: ("shape", "TensorShapeProto"), 8: ("tensor", "TensorProto"), 9: ("func", "NameAttrList")},
    "NameAttrList": {1: ("name", "string"), 2: ("attr", "map:string:AttrValue")},
    "TensorShapeProto": {2: ("dim", "Dim"), 3: ("unknown_rank", "bool")},
    "Dim": {1: ("size", "int"), 2: ("name", "string")},
    "TensorProto": {1: ("dtype", "enum"), 2: ("tensor_shape", "TensorShapeProto"), 3: ("version_number", "int"),
                    4: ("tensor_content", "bytes"), 5: ("float_val", "raw:float"), 6: ("double_val", "raw:double"),
                    7: ("int_val", "raw:int"), 8: ("string_val", "bytes"), 9: ("scomplex_val", "raw:float"),
                    10: ("int64_val", "raw:int"), 11: ("bool_val", "raw:int"), 12: ("dcomplex_val", "raw:double"),
                    13: ("half_val", "raw:int"), 14: ("resource_handle_val", "bytes"), 15: ("variant_val", "bytes"),
                    16: ("uint32_val", "raw:uint"), 17: ("uint64_val", "raw:uint")},
    "FunctionDefLibrary": {1: ("function", "FunctionDef"), 2: ("gradient", "bytes"),
                           3: ("registered_gradients", "bytes")},
    "FunctionDef": {1: ("signature", "OpDef"), 3: ("node_def", "NodeDef"), 4: ("ret", "map:string:string"),
                    5: ("attr", "map:string:AttrValue"), 6: ("control_ret", "map:string:string"),
                    7: ("arg_attr", "bytes"), 8: ("resource_arg_unique_id", "bytes")},
    "OpDef": {1: ("name", "string"), 2: ("input_arg", "ArgDef"), 3: ("output_arg", "ArgDef"), 4: ("attr", "bytes"),
              5: ("deprecation", "bytes"), 6: ("summary", "string"), 7: ("description", "string"),
              16: ("is_aggregate", "bool"), 17: ("is_stateful", "bool"), 18: ("is_commutative", "bool"),
              19: ("allows_uninitialized_input", "bool"), 20: ("control_output", "string"),
              21: ("is_distributed_communication", "bool")},
    "ArgDef": {1: ("name", "string"), 2: ("description", "string"), 3: ("type", "enum"), 4: ("type_attr", "string"),
               5: ("number_attr", "string"), 6: ("type_list_attr", "string"), 7: ("handle_data", "bytes"),
               16: ("is_ref", "bool"), 17: ("experimental_full_type", "bytes")},
}

DTYPES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string", 8: "complex64",
          9: "int64", 10: "bool", 11: "qint8", 12: "quint8", 13: "qint32", 14: "bfloat16", 15: "qint16",
          16: "quint16", 17: "uint16", 18: "complex128", 19: "float16", 20: "resource", 21: "variant",
          22: "uint32", 23: "uint64", 24: "float8_e5m2", 25: "float8_e4m3fn"}
_NUMPY = {"float32": "<f4", "float64": "<f8", "int32": "<i4", "uint8": "u1", "int16": "<i2", "int8": "i1",
          "complex64": "<c8", "int64": "<i8", "bool": "?", "qint8": "i1", "quint8": "u1", "qint32": "<i4",
          "bfloat16": "<u2", "qint16": "<i2", "quint16": "<u2", "uint16": "<u2", "complex128": "<c16",
          "float16": "<f2", "uint32": "<u4", "uint64": "<u8", "float8_e5m2": "u1", "float8_e4m3fn": "u1"}
_VALS = {"float32": "float_val", "float64": "double_val", "int64": "int64_val", "bool": "bool_val",
         "float16": "half_val", "bfloat16": "half_val", "uint32": "uint32_val", "uint64": "uint64_val",
         "complex64": "scomplex_val", "complex128": "dcomplex_val"}
_MAX_NESTING = 32     # library functions opened inside one another at most this deep
_MAX_FILL = 1 << 26   # elements; TF stores large constant fills as one value
_ARGS = {"Conv2D": ["input", "filter"], "Conv3D": ["input", "filter"], "DepthwiseConv2dNative": ["input", "filter"],
         "MatMul": ["a", "b"], "BatchMatMulV2": ["x", "y"], "BiasAdd": ["value", "bias"],
         "FusedBatchNorm": ["x", "scale", "offset", "mean", "variance"],
         "FusedBatchNormV3": ["x", "scale", "offset", "mean", "variance"], "Reshape": ["tensor", "shape"]}


# Ops whose attributes name library functions, and those attributes.
_FUNC_ATTRS = {op: ("f",) for op in ("PartitionedCall", "StatefulPartitionedCall", "TPUPartitionedCall",
                                     "RemoteCall", "MapDataset", "FlatMapDataset")}
_FUNC_ATTRS.update({"While": ("cond", "body"), "StatelessWhile": ("cond", "body"), "If": ("then_branch", "else_branch"),
                    "StatelessIf": ("then_branch", "else_branch")})
_TEXT_DTYPES = {"DT_" + n.upper(): k for k, n in DTYPES.items()}
_TEXT_DTYPES.update({"DT_FLOAT": 1, "DT_DOUBLE": 2, "DT_HALF": 19})


def _dtype(v: Any) -> str:
    if isinstance(v, str):   # text format spells enums: DT_FLOAT, DT_FLOAT_REF
        ref = v.upper().endswith("_REF")
        v = _TEXT_DTYPES.get(v.upper().removesuffix("_REF"), 0) + (100 if ref else 0)
    base = DTYPES.get(int(v) % 100, f"type{v}")
    return base + "_ref" if int(v) > 100 else base


def _text_sniff(head: bytes) -> bool:
    text = head.decode("utf-8", "ignore")
    return bool(re.match(r"\s*(#[^\n]*\n\s*)*(node|meta_graphs|meta_info_def|graph_def)\s*[{:]", text)) and (
        "op:" in text or "meta_info_def" in text or "graph_def" in text)


def sniff(path: Path, head: bytes) -> str | None:
    """What the content is: "SavedModel folder", "text", "GraphDef", "MetaGraphDef" or "SavedModel"."""
    if path.is_dir():
        found = (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()
        return "SavedModel folder" if found else None
    if not head:
        return None
    if _text_sniff(head):
        return "text"
    seen = pb.conforming_fields(head, "GraphDef", SCHEMA, 2)
    if seen and 1 in seen and seen <= {1, 2, 3, 4, 5}:
        return "GraphDef" if head[0] == 0x0A else None
    seen = pb.conforming_fields(head, "MetaGraphDef", SCHEMA, 2)
    if seen and seen & {1, 2} and head[0] in (0x0A, 0x12):
        return "MetaGraphDef"
    seen = pb.conforming_fields(head, "SavedModel", SCHEMA, 3)
    return "SavedModel" if seen and 2 in seen and head[0] == 0x08 else None


def _err(path: Path, what: Any) -> ViewerError:
    return ViewerError(f"{path.name!r} is not a readable {_FMT} file: {what}.")


def read(path: Path, handle: Any = None) -> ViewModel:
    target = path
    warnings: list[str] = []
    if path.is_dir():
        found = inside(path, "saved_model.pb", "the SavedModel graph", warnings) or \
            inside(path, "saved_model.pbtxt", "the SavedModel graph", warnings)
        if found is None:
            raise ViewerError(warnings[0] if warnings else f"{path.name!r} holds no saved_model.pb.")
        target = found
    data = file_bytes(target)
    sniffed = handle if isinstance(handle, str) and not path.is_dir() else None
    try:
        kind, msg = _decode(target, data, sniffed)
    except (pb.ProtoError, TextFormatError) as exc:
        raise _err(target, f"{exc}; it is truncated or damaged") from None
    props: dict[str, Any] = {"content": kind}
    meta = None
    if kind == "SavedModel":
        metas = msg.all("meta_graphs")
        if not metas:
            raise _err(target, "the SavedModel holds no meta graph")
        props["meta_graphs"] = len(metas)
        meta = metas[0]
    elif kind == "MetaGraphDef":
        meta = msg
    graph_def = meta.one("graph_def", pb.Message()) if meta is not None else msg
    signatures: dict[str, Any] = {}
    if meta is not None:
        info = meta.one("meta_info_def", pb.Message())
        if info.all("tags"):
            props["tags"] = info.all("tags")
        if info.one("tensorflow_version"):
            props["tensorflow_version"] = info.one("tensorflow_version")
        signatures = _entries(meta.get("signature_def"))
        if signatures:
            props["signatures"] = {k: {"inputs": sorted(_entries(s.get("inputs"))),
                                       "outputs": sorted(_entries(s.get("outputs")))} for k, s in signatures.items()}
    try:
        lib = graph_def.one("library", pb.Message())
        graphs = with_functions(_graph(path.stem if not path.is_dir() else path.name, graph_def.all("node"), None,
                                       None), lib.all("function"))
    except (pb.ProtoError, TextFormatError, ValueError, TypeError, KeyError) as exc:
        raise _err(target, f"{exc}; it is damaged") from None
    if not graphs[0].nodes and len(graphs) == 1 and not graph_def:
        raise _err(target, "it holds no graph nodes")
    _signature_shapes(graphs[0], signatures)
    index = inside(path, "variables/variables.index", "the variables index", warnings) if path.is_dir() else None
    if index is not None:
        try:
            _attach_variables(graphs, index, props, warnings)
        except ViewerError as exc:   # the graph is still worth showing
            props["variables"] = str(exc)
    if lib.all("function"):
        props["functions"] = len(lib.all("function"))
    versions = graph_def.one("versions", pb.Message())
    producer = versions.one("producer")
    return ViewModel(format=_FMT, path=str(path), producer=f"TensorFlow (graph producer {producer})" if producer else
                     "TensorFlow", version=props.get("tensorflow_version"), properties=props, graphs=graphs,
                     file_size=len(data), warnings=warnings)


def _decode(path: Path, data: Any, sniffed: str | None = None) -> tuple[str, pb.Message]:
    head = bytes(data[:4096])
    sniffed = sniffed or sniff(path, head)
    if sniffed == "text" or path.suffix.lower() == ".pbtxt":
        msg = parse_text(bytes(data).decode("utf-8", "replace"))
        if "meta_graphs" in msg:
            return "SavedModel", msg
        if "graph_def" in msg or "meta_info_def" in msg:
            return "MetaGraphDef", msg
        return "GraphDef", msg
    if sniffed == "SavedModel":
        return "SavedModel", pb.decode(data, "SavedModel", SCHEMA)
    graph = None
    if head[:1] == b"\x0a" and path.suffix.lower() != ".meta":
        try:
            graph = pb.decode(data, "GraphDef", SCHEMA)
        except pb.ProtoError:
            graph = None   # maybe a MetaGraphDef; decoded below
    if graph is not None and graph.all("node") and all(n.one("op") for n in graph.all("node")[:8]):
        return "GraphDef", graph
    try:
        return "MetaGraphDef", pb.decode(data, "MetaGraphDef", SCHEMA)
    except pb.ProtoError:
        if graph is not None:
            return "GraphDef", graph
        raise


def _entries(m: Any) -> dict:
    """A decoded map (dict) or text-format map entries (list of key/value messages) as a dict."""
    if isinstance(m, dict) and not isinstance(m, pb.Message):
        return m
    if isinstance(m, list):
        return {e.one("key"): e.one("value") for e in m if isinstance(e, pb.Message)}
    return {}


def _shape(m: Any) -> list | None:
    if not isinstance(m, pb.Message) or m.one("unknown_rank"):
        return None
    return [int(d.one("size", 0)) if int(d.one("size", 0)) >= 0 else None for d in m.all("dim")]


def _attr(v: pb.Message, depth: int = 0) -> Any:
    """An AttrValue as a plain Python value for the attribute table."""
    if not isinstance(v, pb.Message):
        return v
    if "list" in v and depth < 4:
        lst = v.one("list")
        for key in ("s", "i", "f", "b", "type", "shape", "tensor", "func"):
            if lst.all(key):
                return [_attr(pb.Message({key: [x]}), depth + 1) for x in lst.all(key)]
        return []
    if "s" in v:
        s = v.one("s")
        raw = bytes(s) if not isinstance(s, str) else s.encode("latin-1", "replace")
        return raw.decode("utf-8") if raw.isascii() else f"<{len(raw)} bytes>"
    if "type" in v:
        return _dtype(v.one("type"))
    if "shape" in v:
        return _shape(v.one("shape"))
    if "tensor" in v:
        t = v.one("tensor")
        shape = _shape(t.one("tensor_shape"))
        small = count(shape or []) is not None and (count(shape or []) or 0) <= 16
        try:
            return _tensor_array(t).tolist() if small else f"tensor<{_dtype(t.one('dtype', 1))}>{shape}"
        except ValueError:   # no values stored here (TF.js keeps them in shards)
            return f"tensor<{_dtype(t.one('dtype', 1))}>{shape}"
    if "func" in v:
        return v.one("func").one("name")
    for key in ("i", "f", "b", "placeholder"):
        if key in v:
            val = v.one(key)
            return (val == "true" if isinstance(val, str) else bool(val)) if key == "b" else val
    return None


def _tensor_array(t: pb.Message) -> np.ndarray:
    """Decode a TensorProto: tensor_content or a typed *_val list (a single value fills the shape)."""
    dtype = _dtype(t.one("dtype", 1))
    shape = _shape(t.one("tensor_shape")) or []
    n = count(shape)
    npdt = _NUMPY.get(dtype)
    if npdt is None:
        if dtype == "string":
            return np.array([bytes(s) if not isinstance(s, str) else s.encode() for s in t.all("string_val")],
                            dtype=object)
        raise ValueError(f"tensors of type {dtype} cannot be shown")
    content = t.one("tensor_content")
    if content is not None:
        raw = bytes(content) if not isinstance(content, str) else content.encode("latin-1")
        arr = np.frombuffer(raw, dtype=npdt)
    else:
        vals = t.all(_VALS.get(dtype, "int_val"))
        if vals and not isinstance(vals[0], (int, float)):
            kind = "float" if npdt in ("<f4", "<c8") else "double" if npdt in ("<f8", "<c16") else "int"
            arr = pb.raw_array(vals, kind, {"float": "<f4", "double": "<f8"}.get(kind, "<i8"))
        else:
            arr = np.asarray([v == "true" if isinstance(v, str) else v for v in vals])
        if dtype in ("float16", "bfloat16"):
            arr = arr.astype(np.uint16).view("<f2" if dtype == "float16" else "<u2")
        if dtype == "bfloat16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif npdt.endswith(("c8", "c16")):
            arr = arr.view(npdt)
        else:
            arr = arr.astype(npdt)
        if n is not None and arr.size == 1 and n != 1:
            if n > _MAX_FILL:
                raise ValueError(f"a tensor of {n} copies of one value is too large to show")
            arr = np.full(n, arr[0], dtype=arr.dtype)
    if dtype == "bfloat16" and content is not None:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    if n is not None and arr.size == n:
        return arr.reshape(shape)
    if n is not None:
        raise ValueError(f"tensor holds {arr.size} values but its shape {shape} needs {n}")
    return arr


def _tensor_loader(t: pb.Message):
    return lambda: _tensor_array(t)


def _graph(name: str, nodes: list, inputs: list[str] | None, outputs: list[str] | None) -> ViewGraph:
    b = GraphBuilder(name)
    refs: dict[str, dict[str, None]] = {}   # producer -> referenced output names, in first-seen order
    for n in nodes:
        for inp in n.all("input"):
            ref = _ref(inp)
            refs.setdefault(ref.split(":")[0], {})[ref] = None
    placeholders = []
    for n in nodes:
        nname, op = n.one("name", ""), n.one("op", "")
        attrs = {k: _attr(v) for k, v in _entries(n.get("attr")).items()}
        out_names = list(refs.get(nname, {})) or [nname]
        shapes = attrs.get("_output_shapes")
        if op in ("Const", "HostConst"):
            t = _entries(n.get("attr")).get("value")
            tensor = t.one("tensor") if isinstance(t, pb.Message) else None
            if tensor is not None:
                shape = _shape(tensor.one("tensor_shape")) or []
                dtype = _dtype(tensor.one("dtype", 1))
                for o in out_names:
                    b.weight(o, [d or 0 for d in shape], dtype, _tensor_loader(tensor))
                continue
        if op in ("Placeholder", "PlaceholderV2", "PlaceholderWithDefault") and not n.all("input"):
            placeholders.append(nname)
            b.tensor(nname, attrs.get("shape"), attrs.get("dtype"))
            continue
        argn = _ARGS.get(op, [])
        ins: list[tuple[str, list[str]]] = []
        for k, inp in enumerate(x for x in n.all("input") if not x.startswith("^")):
            ins.append((argn[k] if k < len(argn) else ("input" if k == 0 else f"input{k}"), [_ref(inp)]))
        ctrl = [_ref(x) for x in n.all("input") if x.startswith("^")]
        if ctrl:
            ins.append(("control", ctrl))
        outs = [("output" if k == 0 else f"output{k}", [o]) for k, o in enumerate(out_names)]
        if isinstance(shapes, list):
            for o, s in zip(out_names, shapes):
                b.tensor(o, s)
            attrs.pop("_output_shapes")
        if "T" in attrs and isinstance(attrs["T"], str):
            for o in out_names:
                if b.graph.tensors.get(o) is None or b.graph.tensors[o].dtype is None:
                    b.tensor(o, dtype=attrs["T"])
        scope = tuple(nname.split("/")[:-1])
        b.node(nname, op, ins, outs, attrs, group=scope)
    return b.finish(inputs if inputs is not None else placeholders + [
        v for v in _unproduced(b) if v not in placeholders], outputs)


def _unproduced(b: GraphBuilder) -> list[str]:
    g = b.graph
    produced = {v for n in g.nodes for a in n.outputs for v in a.values}
    seen: dict[str, None] = {}
    for n in g.nodes:
        for a in n.inputs:
            for v in a.values:
                if v not in produced and v not in g.weights:
                    seen.setdefault(v, None)
    return list(seen)


def _ref(name: str) -> str:
    """Canonical tensor name: drop '^' and a trailing ':0' on plain graph references."""
    name = name.lstrip("^")
    if name.endswith(":0") and name.count(":") == 1:
        return name[:-2]
    return name


def with_functions(main: ViewGraph, functions: list) -> list[ViewGraph]:
    """The main graph and one graph per library function, each function also opened under the nodes calling it.

    A node whose attribute names a library function (``StatefulPartitionedCall``'s ``f``, ``While``'s
    ``cond``/``body``, ``If``'s branches) gets that function as an expandable subgraph, so the layers a
    TF2 export keeps in functions are seen in place.  A function calling back into one already open
    above it is not nested again, and nesting stops at ``_MAX_NESTING`` levels.
    """
    graphs = [_function(fn) for fn in functions]
    by_name = {g.name: g for g in graphs}
    height: dict[int, int | None] = {}   # id(graph) -> None while its callees are linked, then its nesting height

    def link(g: ViewGraph, depth: int) -> int:   # depth-first; no edge back to an open graph, so no cycle
        height[id(g)] = None
        tallest = 0
        for n in g.nodes:
            for key, value in n.attributes.items():
                sub = by_name.get(value) if isinstance(value, str) and key in _FUNC_ATTRS.get(n.op_type, ()) else None
                if sub is None or (id(sub) in height and height[id(sub)] is None):
                    continue
                h = height[id(sub)] if id(sub) in height else (link(sub, depth + 1) if depth < _MAX_NESTING else None)
                if h is not None and depth + 1 + h <= _MAX_NESTING:
                    n.subgraphs[key] = sub
                    tallest = max(tallest, h + 1)
        height[id(g)] = tallest
        return tallest

    for g in [main, *graphs]:
        if id(g) not in height:
            link(g, 0)
    return [main, *graphs]


def _function(fn: pb.Message) -> ViewGraph:
    sig = fn.one("signature", pb.Message())
    ins = [a.one("name", "") for a in sig.all("input_arg")]
    ret = _entries(fn.get("ret"))
    outs = [_ref(ret.get(a.one("name", ""), a.one("name", ""))) for a in sig.all("output_arg")]
    g = _graph(sig.one("name", "function"), fn.all("node_def"), ins, outs)
    for a in sig.all("input_arg"):
        if a.one("type") is not None:
            g.tensors[a.one("name", "")].dtype = _dtype(a.one("type"))
    return g


def _signature_shapes(g: ViewGraph, signatures: dict) -> None:
    """SavedModel signatures know input shapes that frozen graphs often lack."""
    for sig in signatures.values():
        for info in list(_entries(sig.get("inputs")).values()) + list(_entries(sig.get("outputs")).values()):
            t = g.tensors.get(_ref(str(info.one("name", ""))))
            if t is not None:
                t.shape = t.shape or _shape(info.one("tensor_shape"))
                t.dtype = t.dtype or (_dtype(info.one("dtype")) if info.one("dtype") is not None else None)


def _attach_variables(graphs: list[ViewGraph], index: Path, props: dict[str, Any], warnings: list[str]) -> None:
    """Checkpoint variables: fed into their variable nodes (TF1) and listed as a graph of their own."""
    from kiln.viewer.formats._tensorbundle import variables

    found = variables(index, DTYPES, _NUMPY, warnings)
    props["variables"] = len(found)
    main = graphs[0]
    for n in main.nodes:
        if n.op_type in ("VariableV2", "Variable", "VarHandleOp") and n.name in found:
            shape, dtype, load, nbytes = found[n.name]
            main.weights[n.name + "/value"] = ViewWeight(n.name, shape, dtype, guarded(load, n.name), nbytes)
            main.tensors[n.name + "/value"] = ViewTensor(n.name + "/value", list(shape), dtype)
            n.inputs.append(ViewArgument("value", [n.name + "/value"]))
    if found:
        graphs.append(weights_graph("variables", [(k, v[0], v[1], v[2], v[3]) for k, v in found.items()], sep="/"))
