"""Caffe: ``.prototxt`` (text) and ``.caffemodel`` (binary) NetParameter, V1 and V2 layers.

Field numbers come from BVLC's ``caffe.proto``.  In-place layers (a ReLU whose
top is its bottom) get a new blob version so they are drawn between their
producer and consumers.  A ``.prototxt`` takes its weights from a
``.caffemodel`` of the same stem beside it, when there is one.
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

_FMT = "Caffe"
_RAW_TYPES = {0: "f8", 1: "f4", 2: "f2", 3: "i4", 4: "u4"}   # OpenCV caffe.proto's Type: DOUBLE .. UINT

# Layer parameter messages we decode from binary files, by field number.
_PARAMS: dict[str, pb.Schema] = {
    "ConvolutionParameter": {1: ("num_output", "uint"), 2: ("bias_term", "bool"), 3: ("pad", "uint"),
                             4: ("kernel_size", "uint"), 5: ("group", "uint"), 6: ("stride", "uint"),
                             9: ("pad_h", "uint"), 10: ("pad_w", "uint"), 11: ("kernel_h", "uint"),
                             12: ("kernel_w", "uint"), 13: ("stride_h", "uint"), 14: ("stride_w", "uint"),
                             16: ("axis", "int"), 18: ("dilation", "uint")},
    "PoolingParameter": {1: ("pool", "enum"), 2: ("kernel_size", "uint"), 3: ("stride", "uint"), 4: ("pad", "uint"),
                         5: ("kernel_h", "uint"), 6: ("kernel_w", "uint"), 7: ("stride_h", "uint"),
                         8: ("stride_w", "uint"), 9: ("pad_h", "uint"), 10: ("pad_w", "uint"),
                         12: ("global_pooling", "bool"), 13: ("round_mode", "enum")},
    "InnerProductParameter": {1: ("num_output", "uint"), 2: ("bias_term", "bool"), 5: ("axis", "int"),
                              6: ("transpose", "bool")},
    "LRNParameter": {1: ("local_size", "uint"), 2: ("alpha", "float"), 3: ("beta", "float"),
                     4: ("norm_region", "enum"), 5: ("k", "float")},
    "DropoutParameter": {1: ("dropout_ratio", "float")},
    "ConcatParameter": {1: ("concat_dim", "uint"), 2: ("axis", "int")},
    "EltwiseParameter": {1: ("operation", "enum"), 2: ("coeff", "float")},
    "ReLUParameter": {1: ("negative_slope", "float")},
    "SoftmaxParameter": {2: ("axis", "int")},
    "BatchNormParameter": {1: ("use_global_stats", "bool"), 2: ("moving_average_fraction", "float"),
                           3: ("eps", "float")},
    "ScaleParameter": {1: ("axis", "int"), 2: ("num_axes", "int"), 4: ("bias_term", "bool")},
    "ReshapeParameter": {1: ("shape", "BlobShape"), 2: ("axis", "int"), 3: ("num_axes", "int")},
    "FlattenParameter": {1: ("axis", "int"), 2: ("end_axis", "int")},
    "InputParameter": {1: ("shape", "BlobShape")},
}
_V2_PARAMS = {106: ("convolution_param", "ConvolutionParameter"), 121: ("pooling_param", "PoolingParameter"),
              117: ("inner_product_param", "InnerProductParameter"), 118: ("lrn_param", "LRNParameter"),
              108: ("dropout_param", "DropoutParameter"), 104: ("concat_param", "ConcatParameter"),
              110: ("eltwise_param", "EltwiseParameter"), 123: ("relu_param", "ReLUParameter"),
              125: ("softmax_param", "SoftmaxParameter"), 139: ("batch_norm_param", "BatchNormParameter"),
              142: ("scale_param", "ScaleParameter"), 133: ("reshape_param", "ReshapeParameter"),
              135: ("flatten_param", "FlattenParameter"), 143: ("input_param", "InputParameter")}
_V1_PARAMS = {10: _V2_PARAMS[106], 19: _V2_PARAMS[121], 17: _V2_PARAMS[117], 18: _V2_PARAMS[118],
              12: _V2_PARAMS[108], 9: _V2_PARAMS[104], 24: _V2_PARAMS[110], 30: _V2_PARAMS[123], 39: _V2_PARAMS[125]}

SCHEMA: dict[str, pb.Schema] = {
    "NetParameter": {1: ("name", "string"), 2: ("layers", "V1LayerParameter"), 3: ("input", "string"),
                     4: ("input_dim", "int"), 5: ("force_backward", "bool"), 6: ("state", "bytes"),
                     7: ("debug_info", "bool"), 8: ("input_shape", "BlobShape"), 100: ("layer", "LayerParameter")},
    "BlobShape": {1: ("dim", "int")},
    "BlobProto": {1: ("num", "int"), 2: ("channels", "int"), 3: ("height", "int"), 4: ("width", "int"),
                  5: ("data", "raw:float"), 6: ("diff", "bytes"), 7: ("shape", "BlobShape"),
                  8: ("double_data", "raw:double"), 9: ("double_diff", "bytes"),
                  10: ("raw_data_type", "int"), 12: ("raw_data", "bytes")},   # OpenCV's additions (FP16 models)
    "LayerParameter": {1: ("name", "string"), 2: ("type", "string"), 3: ("bottom", "string"), 4: ("top", "string"),
                       5: ("loss_weight", "float"), 6: ("param", "bytes"), 7: ("blobs", "BlobProto"),
                       8: ("include", "bytes"), 9: ("exclude", "bytes"), 10: ("phase", "enum"),
                       11: ("propagate_down", "bool"),
                       **{n: (f"param_{n}", "bytes") for n in range(100, 160)},
                       **{n: spec for n, spec in _V2_PARAMS.items()}},
    "V1LayerParameter": {1: ("layer", "bytes"), 2: ("bottom", "string"), 3: ("top", "string"), 4: ("name", "string"),
                         5: ("type", "enum"), 6: ("blobs", "BlobProto"), 7: ("blobs_lr", "float"),
                         8: ("weight_decay", "float"), 1001: ("param", "string"), 1002: ("blob_share_mode", "enum"),
                         **{n: (f"param_{n}", "bytes") for n in range(9, 43) if n not in (2, 3, 4, 5, 6, 7, 8)},
                         **{n: spec for n, spec in _V1_PARAMS.items()}},
    **_PARAMS,
}
_V1_TYPES = {
    0: "None", 35: "AbsVal", 1: "Accuracy", 30: "ArgMax", 2: "BNLL", 3: "Concat", 37: "ContrastiveLoss",
    4: "Convolution", 5: "Data", 39: "Deconvolution", 6: "Dropout", 32: "DummyData", 7: "EuclideanLoss",
    25: "Eltwise", 38: "Exp", 8: "Flatten", 9: "HDF5Data", 10: "HDF5Output", 28: "HingeLoss", 11: "Im2col",
    12: "ImageData", 13: "InfogainLoss", 14: "InnerProduct", 15: "LRN", 29: "MemoryData",
    16: "MultinomialLogisticLoss", 34: "MVN", 17: "Pooling", 26: "Power", 18: "ReLU", 19: "Sigmoid",
    27: "SigmoidCrossEntropyLoss", 36: "Silence", 20: "Softmax", 21: "SoftmaxWithLoss", 22: "Split", 33: "Slice",
    23: "TanH", 24: "WindowData", 31: "Threshold",
}
_ENUMS = {"pool": ["MAX", "AVE", "STOCHASTIC"], "operation": ["PROD", "SUM", "MAX"],
          "norm_region": ["ACROSS_CHANNELS", "WITHIN_CHANNEL"], "round_mode": ["CEIL", "FLOOR"]}
_BLOBS = {"Convolution": ["weights", "bias"], "Deconvolution": ["weights", "bias"], "InnerProduct": ["weights", "bias"],
          "BatchNorm": ["mean", "variance", "moving_average_factor"], "Scale": ["scale", "bias"],
          "PReLU": ["slope"], "Embed": ["weights", "bias"], "Bias": ["bias"]}


def sniff(path: Path, head: bytes) -> str | None:
    """"binary" or "text" for a NetParameter; layers may carry fields outside Kiln's schema (forks, newer Caffe)."""
    if not head:
        return None
    seen = pb.conforming_fields(head, "NetParameter", SCHEMA, 1, nested_unknown=True)
    if seen and seen & {2, 100} and (100 in seen or _v1_layer_has_enum_type(head)):
        return "binary"
    text = head.decode("utf-8", "ignore")
    if re.search(r"^\s*layers?\s*\{", text, re.M) and re.search(r"\b(type|name|bottom|top)\s*:", text):
        return "text"
    return None


def _v1_layer_has_enum_type(head: bytes) -> bool:
    """V1 layers carry ``type`` as a varint (field 5); a Caffe2 operator has field 5 as a message."""
    try:
        for field, wt, value, _ in pb.iter_fields(memoryview(head)):
            if field == 2 and wt == 2:
                for f2, wt2, _, _ in pb.iter_fields(value):
                    if f2 == 5:
                        return wt2 == 0
                return False
    except pb.ProtoError:
        return False
    return False


def _err(path: Path, what: Any) -> ViewerError:
    return ViewerError(f"{path.name!r} is not a readable {_FMT} file: {what}.")


def _load_net(path: Path, kind: str | None = None) -> tuple[pb.Message, bool, int]:
    data = file_bytes(path)
    is_text = (kind or sniff(path, bytes(data[:4096]))) == "text"
    try:
        if is_text:
            return parse_text(bytes(data).decode("utf-8", "replace")), True, len(data)
        return pb.decode(data, "NetParameter", SCHEMA), False, len(data)
    except (pb.ProtoError, TextFormatError) as exc:
        raise _err(path, f"{exc}; it is truncated or damaged") from None


def read(path: Path, handle: Any = None) -> ViewModel:
    net, is_text, size = _load_net(path, handle if handle in ("binary", "text") else None)
    blobs: dict[str, list] = {}
    warnings: list[str] = []
    if is_text:
        weights_file = inside(path.parent, path.with_suffix(".caffemodel").name, "the weights file", warnings)
        if weights_file is not None:
            wnet, _, _ = _load_net(weights_file, "binary")
            for layer in wnet.all("layer") + wnet.all("layers"):
                blobs[str(layer.one("name", ""))] = layer.all("blobs")
    layers = net.all("layer") or net.all("layers")
    if not layers:
        raise _err(path, "it defines no layers")
    try:
        graph = _graph(net, layers, blobs, path.stem)
    except (ValueError, TypeError, IndexError) as exc:
        raise _err(path, exc) from None
    version = "V1 layers" if net.all("layers") and not net.all("layer") else "V2 layers"
    return ViewModel(format=_FMT, path=str(path), producer="Caffe", version=version,
                     properties={"content": "prototxt" if is_text else "caffemodel", "layers": len(layers)},
                     graphs=[graph], file_size=size, warnings=warnings)


def _type(layer: pb.Message) -> str:
    t = layer.one("type", "")
    if isinstance(t, int):
        return _V1_TYPES.get(t, f"V1Type{t}")
    if isinstance(t, str) and t.isupper():   # V1 text format: type: CONVOLUTION
        for name in _V1_TYPES.values():
            if name.upper() == t.replace("_", ""):
                return name
        return t.title().replace("_", "")
    return str(t)


def _raw_dtype(blob: pb.Message) -> np.dtype | None:
    """The element type of OpenCV's ``raw_data`` (as ``cv.dnn.shrinkCaffeModel`` writes FP16), or None."""
    if not blob.all("raw_data"):
        return None
    kind = blob.one("raw_data_type", 1)
    if kind not in _RAW_TYPES:
        raise ViewerError(f"a Caffe blob has raw_data_type {kind}, not one of OpenCV's types 0-4; the file is damaged.")
    return np.dtype(_RAW_TYPES[kind])


def _blob_shape(blob: pb.Message) -> list[int]:
    shape = blob.one("shape")
    if isinstance(shape, pb.Message):
        return [int(d) for d in shape.all("dim")]
    legacy = [int(blob.one(k, 0) or 0) for k in ("num", "channels", "height", "width")]
    if any(legacy):
        return legacy
    raw = _raw_dtype(blob)
    if raw is not None:
        return [sum(len(c) for c in blob.all("raw_data")) // raw.itemsize]
    data = blob.all("data")
    return [sum(len(c) // 4 for c in data) if data and not isinstance(data[0], (int, float)) else len(data)]


def _blob_loader(blob: pb.Message, shape: list[int]):
    def load() -> np.ndarray:
        data, raw = blob.all("data"), _raw_dtype(blob)
        if raw is not None:
            chunks = blob.all("raw_data")
            arr = np.frombuffer(b"".join(bytes(c) for c in chunks), dtype=raw.newbyteorder("<"),
                                count=sum(len(c) for c in chunks) // raw.itemsize)
        elif data and isinstance(data[0], (int, float)):
            arr = np.asarray(data, dtype=np.float32)
        elif data:
            arr = pb.raw_array(data, "float", "<f4")
        else:
            arr = pb.raw_array(blob.all("double_data"), "double", "<f8")
        if arr.size != count(shape):
            raise ViewerError(f"a Caffe blob of shape {shape} holds {arr.size} values; the file is damaged.")
        return arr.reshape(shape)
    return load


def _attributes(layer: pb.Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, values in layer.items():
        if not key.endswith("_param") or not values or not isinstance(values[-1], pb.Message):
            continue
        for k, v in values[-1].items():
            if isinstance(v, list) and v and isinstance(v[0], pb.Message):
                v = [int(d) for d in v[-1].all("dim")] if "dim" in v[-1] else None
            elif isinstance(v, list):
                v = v[0] if len(v) == 1 else v
            if v is None:
                continue
            if k in _ENUMS and isinstance(v, int):
                v = _ENUMS[k][v] if 0 <= v < len(_ENUMS[k]) else v
            out[k] = v
    return out


def _graph(net: pb.Message, layers: list, blobs: dict[str, list], name: str) -> Any:
    b = GraphBuilder(str(net.one("name") or name))
    versions = BlobVersions()
    inputs: list[str] = []
    shapes = [[int(d) for d in s.all("dim")] for s in net.all("input_shape")]
    dims = [int(d) for d in net.all("input_dim")]
    for i, iname in enumerate(net.all("input")):
        shape = shapes[i] if i < len(shapes) else (dims[4 * i:4 * i + 4] or None)
        inputs.append(b.tensor(versions.write(str(iname)), shape))
    for li, layer in enumerate(layers):
        lname = str(layer.one("name") or f"layer{li}")
        ltype = _type(layer)
        attrs = _attributes(layer)
        bottoms = [versions.read(str(x)) for x in layer.all("bottom")]
        if ltype == "Input" and not bottoms:
            shape_list = attrs.get("shape")
            params = layer.one("input_param", pb.Message())
            all_shapes = [[int(d) for d in s.all("dim")] for s in params.all("shape")] if params else []
            for k, top in enumerate(layer.all("top")):
                shape = all_shapes[k] if k < len(all_shapes) else (all_shapes[0] if all_shapes else shape_list)
                inputs.append(b.tensor(versions.write(str(top)), shape))
            continue
        ins: list[tuple[str, list[str]]] = [("input" if k == 0 else f"input{k}", [x]) for k, x in enumerate(bottoms)]
        layer_blobs = layer.all("blobs") or blobs.get(lname, [])
        names = _BLOBS.get(ltype, [])
        for k, blob in enumerate(layer_blobs):
            shape = _blob_shape(blob)
            bname = names[k] if k < len(names) else f"blob{k}"
            wname = f"{lname}/{bname}"
            raw = _raw_dtype(blob)
            b.weight(wname, shape, "float32" if raw is None else str(raw), _blob_loader(blob, shape))
            ins.append((bname, [wname]))
        outs = [("output" if k == 0 else f"output{k}", [versions.write(str(t))]) for k, t in enumerate(layer.all("top"))]
        b.node(lname, ltype, ins, outs, attrs)
    return b.finish(inputs=inputs or None)
