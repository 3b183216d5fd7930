"""Caffe2: ``predict_net.pb`` (NetDef of operators) with weights from ``init_net.pb``.

Field numbers come from ``caffe2.proto``.  The init net's fill operators
(``GivenTensorFill`` and kin) become lazy weights of the predict net; in-place
operators get new blob versions so they are drawn in sequence.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ViewerError
from kiln.viewer.formats import _protobuf as pb
from kiln.viewer.formats._common import BlobVersions, GraphBuilder, count, file_bytes, inside
from kiln.viewer.formats._prototext import TextFormatError, parse as parse_text
from kiln.viewer.graph import ViewModel

_FMT = "Caffe2"

SCHEMA: dict[str, pb.Schema] = {
    "NetDef": {1: ("name", "string"), 2: ("op", "OperatorDef"), 3: ("type", "string"), 4: ("num_workers", "int"),
               5: ("device_option", "bytes"), 6: ("arg", "Argument"), 7: ("external_input", "string"),
               8: ("external_output", "string"), 9: ("partition_info", "bytes")},
    "OperatorDef": {1: ("input", "string"), 2: ("output", "string"), 3: ("name", "string"), 4: ("type", "string"),
                    5: ("arg", "Argument"), 6: ("device_option", "bytes"), 7: ("engine", "string"),
                    8: ("control_input", "string"), 9: ("is_gradient_op", "bool"), 10: ("debug_info", "string"),
                    11: ("domain", "string"), 12: ("op_version", "int")},
    "Argument": {1: ("name", "string"), 2: ("f", "float"), 3: ("i", "int"), 4: ("s", "bytes"),
                 5: ("floats", "raw:float"), 6: ("ints", "raw:int"), 7: ("strings", "bytes"), 8: ("n", "bytes"),
                 9: ("nets", "bytes"), 10: ("t", "bytes"), 11: ("tensors", "bytes"), 12: ("qtensor", "bytes"),
                 13: ("qtensors", "bytes")},
}
# Fill operators of an init net: op type -> numpy dtype of its "values" argument.
_FILLS = {"GivenTensorFill": "float32", "GivenTensorDoubleFill": "float64", "GivenTensorIntFill": "int32",
          "GivenTensorInt64Fill": "int64", "GivenTensorInt16Fill": "int16", "GivenTensorBoolFill": "bool",
          "GivenTensorByteStringToUInt8Fill": "uint8", "GivenTensorStringFill": "object",
          "ConstantFill": "float32", "XavierFill": "float32", "GaussianFill": "float32", "MSRAFill": "float32",
          "UniformFill": "float32", "Int8GivenTensorFill": "uint8", "Int8GivenIntTensorFill": "int32"}

# Input names from the Caffe2 operator schemas, so weights read "filter"/"bias" rather than input1/input2.
_ARGS = {"Conv": ["X", "filter", "bias"], "ConvTranspose": ["X", "filter", "bias"], "FC": ["X", "W", "b"],
         "SpatialBN": ["X", "scale", "bias", "mean", "var"], "PRelu": ["X", "Slope"], "Mul": ["A", "B"],
         "Add": ["A", "B"], "Sum": ["X", "Y"], "LayerNorm": ["input", "gamma", "beta"]}


def sniff(path: Path, head: bytes) -> bool:
    if not head:
        return False
    text = head.decode("utf-8", "ignore")
    if re.search(r"^\s*op\s*\{", text, re.M) and re.search(r"\btype\s*:", text):
        return True
    seen = pb.conforming_fields(head, "NetDef", SCHEMA, 2)
    return bool(seen and 2 in seen)


def _err(path: Path, what: Any) -> ViewerError:
    return ViewerError(f"{path.name!r} is not a readable {_FMT} file: {what}.")


def _load(path: Path) -> pb.Message:
    data = file_bytes(path)
    try:
        if re.search(r"^\s*(op|name|external_input)\s*[{:]", bytes(data[:4096]).decode("utf-8", "ignore"), re.M) \
                and pb.conforming_fields(bytes(data[:4096]), "NetDef", SCHEMA, 2) is None:
            return parse_text(bytes(data).decode("utf-8", "replace"))
        return pb.decode(data, "NetDef", SCHEMA)
    except (pb.ProtoError, TextFormatError) as exc:
        raise _err(path, f"{exc}; it is truncated or damaged") from None


def _pair(path: Path, warnings: list[str]) -> tuple[Path, Path | None]:
    """(predict net, init net or None) for whichever of the two was opened, the other from inside its folder.

    Caffe2's model zoo names them ``predict_net.pb`` / ``init_net.pb``; Detectron and detectron2 write
    ``<name>.pb`` (or ``.pbtxt``) with the weights in ``<name>_init.pb``.
    """
    name = path.name.lower()
    for a, b_ in (("predict_net", "init_net"), ("init_net", "predict_net")):
        if a in name:
            sibling = inside(path.parent, path.name.replace(a, b_).replace(a.upper(), b_.upper()),
                             f"the {b_} beside {path.name!r}", warnings)
            if sibling is None:
                return path, None
            return (path, sibling) if a == "predict_net" else (sibling, path)
    if path.stem.endswith("_init"):
        for suffix in dict.fromkeys((path.suffix, ".pb", ".pbtxt")):
            sibling = inside(path.parent, path.stem[:-5] + suffix, f"the predict net beside {path.name!r}", warnings)
            if sibling is not None:
                with open(sibling, "rb") as f:
                    if sniff(sibling, f.read(4096)):   # a NetDef, not another format's <name>.pb
                        return sibling, path
        return path, None
    for suffix in dict.fromkeys((path.suffix, ".pb")):
        sibling = inside(path.parent, f"{path.stem}_init{suffix}", f"the init net beside {path.name!r}", warnings)
        if sibling is not None:
            return path, sibling
    return path, None


def read(path: Path, handle: Any = None) -> ViewModel:
    warnings: list[str] = []
    predict_path, init_path = _pair(path, warnings)
    net = _load(predict_path)
    if not net.all("op"):
        raise _err(predict_path, "it holds no operators")
    weights = _init_weights(_load(init_path)) if init_path else {}
    try:
        graph = _graph(net, weights, predict_path.stem)
    except (ValueError, TypeError) as exc:
        raise _err(predict_path, exc) from None
    props: dict[str, Any] = {"operators": len(net.all("op"))}
    if init_path:
        props["init_net"] = init_path.name
    if net.one("type"):
        props["net_type"] = net.one("type")
    return ViewModel(format=_FMT, path=str(predict_path), producer="Caffe2", properties=props, graphs=[graph],
                     file_size=predict_path.stat().st_size, warnings=warnings)


def _arg_value(a: pb.Message) -> Any:
    for key in ("f", "i"):
        if key in a:
            return a.one(key)
    if "s" in a:
        s = a.one("s")
        raw = s.encode("latin-1", "replace") if isinstance(s, str) else bytes(s)
        return raw.decode("utf-8") if raw.isascii() else f"<{len(raw)} bytes>"
    if "floats" in a:
        vals = a.all("floats")
        return (pb.raw_array(vals, "float", "<f4") if not isinstance(vals[0], float) else np.asarray(vals)).tolist()
    if "ints" in a:
        vals = a.all("ints")
        return pb.raw_array(vals, "int", "<i8").tolist()   # int64, unpacked (as Caffe2 writes it) or packed
    if "strings" in a:
        return [bytes(s).decode("utf-8", "replace") if not isinstance(s, str) else s for s in a.all("strings")]
    return None


def _args(op: pb.Message) -> dict[str, Any]:
    return {str(a.one("name", "")): a for a in op.all("arg")}


def _fill_loader(op_type: str, args: dict[str, pb.Message], shape: list[int]):
    def load() -> np.ndarray:
        dtype = _FILLS[op_type]
        values = args.get("values")
        n = count(shape)
        if values is None:
            if n is None or n > 1 << 26:
                raise ValueError(f"a {op_type} of shape {shape} is too large to show")
            v = _arg_value(args["value"]) if "value" in args else 0
            return np.full(shape, v, dtype=dtype if dtype != "object" else "float32")
        if op_type == "GivenTensorByteStringToUInt8Fill" or (op_type.startswith("Int8") and "s" in values):
            raw = values.one("s")
            arr = np.frombuffer(raw.encode("latin-1") if isinstance(raw, str) else bytes(raw), dtype=np.uint8)
        else:
            arr = np.asarray(_arg_value(values), dtype=dtype)
        return arr.reshape(shape) if n == arr.size else arr
    return load


def _init_weights(init: pb.Message) -> dict[str, tuple[list[int], str, Any]]:
    out: dict[str, tuple[list[int], str, Any]] = {}
    for op in init.all("op"):
        op_type = str(op.one("type", ""))
        if op_type not in _FILLS or not op.all("output"):
            continue
        args = _args(op)
        shape = _arg_value(args["shape"]) if "shape" in args else []
        shape = [int(d) for d in shape] if isinstance(shape, list) else []
        out[str(op.all("output")[0])] = (shape, _FILLS[op_type], _fill_loader(op_type, args, shape))
    return out


def _graph(net: pb.Message, weights: dict, name: str) -> Any:
    b = GraphBuilder(str(net.one("name") or name))
    versions = BlobVersions()
    inputs = []
    for x in net.all("external_input"):
        x = str(x)
        if x in weights:
            shape, dtype, load = weights[x]
            b.weight(versions.write(x), shape, dtype, load)
        else:
            inputs.append(b.tensor(versions.write(x)))
    for i, op in enumerate(net.all("op")):
        op_type = str(op.one("type", "Unknown"))
        argn = _ARGS.get(op_type, [])
        ins = [(argn[k] if k < len(argn) else ("input" if k == 0 else f"input{k}"), [versions.read(str(x))])
               for k, x in enumerate(op.all("input"))]
        for k, (_, vals) in enumerate(ins):
            if vals[0] in weights and vals[0] not in b.graph.weights:
                shape, dtype, load = weights[vals[0]]
                b.weight(vals[0], shape, dtype, load)
        outs = [("output" if k == 0 else f"output{k}", [versions.write(str(x))]) for k, x in enumerate(op.all("output"))]
        attrs = {k: _arg_value(a) for k, a in _args(op).items()}
        if op.one("engine"):
            attrs["engine"] = op.one("engine")
        node_name = str(op.one("name") or (op.all("output")[0] if op.all("output") else f"{op_type}_{i}"))
        b.node(node_name, op_type, ins, outs, attrs)
    outputs = [versions.read(str(x)) for x in net.all("external_output")]
    return b.finish(inputs=inputs or None, outputs=outputs or None)
