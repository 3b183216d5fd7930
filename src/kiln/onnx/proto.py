"""ONNX's protobuf messages read by field number, and ONNX tensors as numpy arrays, without the onnx package.

Field numbers and enum values are those of ``onnx.proto`` (IR version 11). Strings are decoded as
``text``: invalid UTF-8 stays visible as ``\\x`` escapes. ``to_array`` gives the values as the viewer
shows them: bfloat16, the float8/float4 kinds and float8e8m0 widen exactly to float32, 4- and 2-bit
integers unpack to int8/uint8. ``numpy_value`` gives them as ``onnx.numpy_helper.to_array`` does (the
parser's view: those types as ml_dtypes arrays). The viewer (``kiln.viewer.formats.onnx``) and the
parser (``kiln.onnx.reader``) both read models with this module.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from kiln import protobuf as pb
from kiln.errors import ViewerError

_ENTRY = "StringStringEntryProto"
MESSAGES: dict[str, pb.Schema] = {
    "ModelProto": {1: ("ir_version", "int"), 2: ("producer_name", "text"), 3: ("producer_version", "text"),
                   4: ("domain", "text"), 5: ("model_version", "int"), 6: ("doc_string", "text"),
                   7: ("graph", "GraphProto"), 8: ("opset_import", "OperatorSetIdProto"),
                   14: ("metadata_props", _ENTRY), 25: ("functions", "FunctionProto")},
    "OperatorSetIdProto": {1: ("domain", "text"), 2: ("version", "int")},
    _ENTRY: {1: ("key", "text"), 2: ("value", "text")},
    "GraphProto": {1: ("node", "NodeProto"), 2: ("name", "text"), 5: ("initializer", "TensorProto"),
                   10: ("doc_string", "text"), 11: ("input", "ValueInfoProto"), 12: ("output", "ValueInfoProto"),
                   13: ("value_info", "ValueInfoProto"), 15: ("sparse_initializer", "SparseTensorProto")},
    "NodeProto": {1: ("input", "text"), 2: ("output", "text"), 3: ("name", "text"), 4: ("op_type", "text"),
                  5: ("attribute", "AttributeProto"), 6: ("doc_string", "text"), 7: ("domain", "text")},
    "AttributeProto": {1: ("name", "text"), 2: ("f", "float"), 3: ("i", "int"), 4: ("s", "bytes"),
                       5: ("t", "TensorProto"), 6: ("g", "GraphProto"), 7: ("floats", "float"), 8: ("ints", "int"),
                       9: ("strings", "bytes"), 10: ("tensors", "TensorProto"), 11: ("graphs", "GraphProto"),
                       13: ("doc_string", "text"), 14: ("tp", "TypeProto"), 15: ("type_protos", "TypeProto"),
                       20: ("type", "enum"), 21: ("ref_attr_name", "text"),
                       22: ("sparse_tensor", "SparseTensorProto"), 23: ("sparse_tensors", "SparseTensorProto")},
    "TensorProto": {1: ("dims", "int"), 2: ("data_type", "int"), 3: ("segment", "TensorProto.Segment"),
                    4: ("float_data", "raw:float"), 5: ("int32_data", "raw:int"), 6: ("string_data", "bytes"),
                    7: ("int64_data", "raw:int"), 8: ("name", "text"), 9: ("raw_data", "bytes"),
                    10: ("double_data", "raw:double"), 11: ("uint64_data", "raw:uint"), 12: ("doc_string", "text"),
                    13: ("external_data", _ENTRY), 14: ("data_location", "enum")},
    "TensorProto.Segment": {1: ("begin", "int"), 2: ("end", "int")},
    "SparseTensorProto": {1: ("values", "TensorProto"), 2: ("indices", "TensorProto"), 3: ("dims", "int")},
    "ValueInfoProto": {1: ("name", "text"), 2: ("type", "TypeProto"), 3: ("doc_string", "text")},
    # oneof value: tensor_type 1, sequence_type 4, map_type 5, opaque_type 7, sparse_tensor_type 8, optional_type 9
    "TypeProto": {1: ("tensor_type", "TypeProto.Tensor"), 4: ("sequence_type", "TypeProto.Sequence"),
                  5: ("map_type", "TypeProto.Map"), 6: ("denotation", "text"), 7: ("opaque_type", "TypeProto.Opaque"),
                  8: ("sparse_tensor_type", "TypeProto.Tensor"), 9: ("optional_type", "TypeProto.Sequence")},
    "TypeProto.Tensor": {1: ("elem_type", "int"), 2: ("shape", "TensorShapeProto")},     # also SparseTensor
    "TypeProto.Sequence": {1: ("elem_type", "TypeProto")},                                # also Optional
    "TypeProto.Map": {1: ("key_type", "int"), 2: ("value_type", "TypeProto")},
    "TypeProto.Opaque": {1: ("domain", "text"), 2: ("name", "text")},
    "TensorShapeProto": {1: ("dim", "TensorShapeProto.Dimension")},
    "TensorShapeProto.Dimension": {1: ("dim_value", "int"), 2: ("dim_param", "text"), 3: ("denotation", "text")},
    "FunctionProto": {1: ("name", "text"), 4: ("input", "text"), 5: ("output", "text"), 6: ("attribute", "text"),
                      7: ("node", "NodeProto"), 8: ("doc_string", "text"), 9: ("opset_import", "OperatorSetIdProto"),
                      10: ("domain", "text"), 11: ("attribute_proto", "AttributeProto"),
                      12: ("value_info", "ValueInfoProto"), 13: ("overload", "text")},
}
# The shape-inferred copy of a model is read for its values only: graphs' inputs, outputs and value_info,
# and the bodies inside nodes (node lists stay aligned with the original's).
SHAPES: dict[str, pb.Schema] = dict(MESSAGES, **{
    "ModelProto": {7: ("graph", "GraphProto")},
    "GraphProto": {1: ("node", "NodeProto"), 11: ("input", "ValueInfoProto"), 12: ("output", "ValueInfoProto"),
                   13: ("value_info", "ValueInfoProto")},
    "NodeProto": {5: ("attribute", "AttributeProto")},
    "AttributeProto": {1: ("name", "text"), 6: ("g", "GraphProto"), 11: ("graphs", "GraphProto")},
})
TYPE_ONEOF = ("tensor_type", "sequence_type", "map_type", "optional_type", "sparse_tensor_type", "opaque_type")

# AttributeProto.AttributeType
FLOAT, INT, STRING, TENSOR, GRAPH, FLOATS, INTS, STRINGS, TENSORS, GRAPHS = range(1, 11)
SPARSE_TENSOR, SPARSE_TENSORS, TYPE_PROTO, TYPE_PROTOS = 11, 12, 13, 14
EXTERNAL = 1                     # TensorProto.DataLocation

# TensorProto.DataType: name, numpy dtype of the values as stored in raw_data (None: packed or not stored
# that way), the typed field holding them otherwise, itemsize as onnx reports it.
DTYPES: dict[int, tuple[str, str | None, str, int]] = {
    1: ("float", "<f4", "float_data", 4), 2: ("uint8", "u1", "int32_data", 1), 3: ("int8", "i1", "int32_data", 1),
    4: ("uint16", "<u2", "int32_data", 2), 5: ("int16", "<i2", "int32_data", 2),
    6: ("int32", "<i4", "int32_data", 4), 7: ("int64", "<i8", "int64_data", 8),
    8: ("string", None, "string_data", 8), 9: ("bool", "?", "int32_data", 1),
    10: ("float16", "<f2", "int32_data", 2), 11: ("double", "<f8", "double_data", 8),
    12: ("uint32", "<u4", "uint64_data", 4), 13: ("uint64", "<u8", "uint64_data", 8),
    14: ("complex64", "<c8", "float_data", 8), 15: ("complex128", "<c16", "double_data", 16),
    16: ("bfloat16", "<u2", "int32_data", 2), 17: ("float8e4m3fn", "u1", "int32_data", 1),
    18: ("float8e4m3fnuz", "u1", "int32_data", 1), 19: ("float8e5m2", "u1", "int32_data", 1),
    20: ("float8e5m2fnuz", "u1", "int32_data", 1), 21: ("uint4", None, "int32_data", 1),
    22: ("int4", None, "int32_data", 1), 23: ("float4e2m1", None, "int32_data", 1),
    24: ("float8e8m0", "u1", "int32_data", 1), 25: ("uint2", None, "int32_data", 1),
    26: ("int2", None, "int32_data", 1), 27: ("float6e2m3", None, "int32_data", 1),
    28: ("float6e3m2", None, "int32_data", 1),
}
_PACKED_BITS = {21: 4, 22: 4, 23: 4, 25: 2, 26: 2}
_SIGNED_PACKED = {22, 26}


def parse_model(data: bytes | memoryview) -> pb.Message:
    """A serialized ModelProto as a Message (raises ProtoError when the bytes stop following the schema)."""
    return pb.decode(data, "ModelProto", MESSAGES)


def parse_shapes(data: bytes | memoryview) -> pb.Message:
    """A serialized shape-inferred ModelProto, read for its values and bodies (see SHAPES)."""
    return pb.decode(data, "ModelProto", SHAPES)


def dtype_name(elem_type: int) -> str:
    """The element type's name as ONNX spells it, lower case (``float``, ``bfloat16``)."""
    entry = DTYPES.get(elem_type)
    return entry[0] if entry else "undefined" if elem_type == 0 else f"type {elem_type}"


def itemsize(elem_type: int) -> int | None:
    entry = DTYPES.get(elem_type)
    return entry[3] if entry else None


@functools.lru_cache(maxsize=None)
def _minifloat(ebits: int, mbits: int, bias: int, special: str) -> np.ndarray:
    """float32 value of every code of a small float format; ``special`` says where its NaN and inf codes are."""
    codes = np.arange(1 << (1 + ebits + mbits))
    sign = np.where((codes >> (ebits + mbits)) & 1, -1.0, 1.0)
    exp = (codes >> mbits) & ((1 << ebits) - 1)
    man = (codes & ((1 << mbits) - 1)) / float(1 << mbits)
    val = sign * np.where(exp == 0, man * 2.0 ** (1 - bias), (1 + man) * 2.0 ** (exp - bias))
    top = exp == (1 << ebits) - 1
    if special == "fn":                       # S.1111.111 is NaN, no inf
        val[top & (man == (1 - 1 / (1 << mbits)))] = np.nan
    elif special == "fnuz":                   # only the negative-zero code is NaN
        val[1 << (ebits + mbits)] = np.nan
    elif special == "ieee":
        val[top] = np.where(man[top] == 0, sign[top] * np.inf, np.nan)
    return val.astype(np.float32)


_FLOAT_CODES = {17: (4, 3, 7, "fn"), 18: (4, 3, 8, "fnuz"), 19: (5, 2, 15, "ieee"), 20: (5, 2, 16, "fnuz"),
                23: (2, 1, 1, "none")}


def _e8m0(codes: np.ndarray) -> np.ndarray:
    out = np.ldexp(np.float32(1), np.minimum(codes.astype(np.int32), 254) - 127).astype(np.float32)
    out[codes == 255] = np.nan
    return out


def _unpack(data: np.ndarray, bits: int, count: int, signed: bool) -> np.ndarray:
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * bits
    out = ((data[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]
    if signed:
        return (out.astype(np.int8) << (8 - bits)) >> (8 - bits)
    return out


# Element types whose values are bit patterns to decode (float16, bfloat16, float8 kinds): the code's type.
_CODES = {10: "<u2", 16: "<u2", 17: "u1", 18: "u1", 19: "u1", 20: "u1", 24: "u1"}
# typed fields: how _protobuf keeps them, the numpy type they are read as
_FIELDS = {"float_data": ("float", "<f4"), "double_data": ("double", "<f8"), "int64_data": ("int", "<i8"),
           "uint64_data": ("uint", "<u8"), "int32_data": ("int", "<i8")}


def _typed(t: pb.Message, elem: int) -> np.ndarray:
    """The stored values of a tensor without raw_data, from its typed field (codes and packed bytes undecoded)."""
    field = DTYPES[elem][2]
    if field == "string_data":
        return np.array([bytes(s).decode("utf-8", "backslashreplace") for s in t.all(field)], dtype=object)
    vals = pb.raw_array(t.all(field), *_FIELDS[field])
    if elem in (14, 15):
        return vals.view(DTYPES[elem][1])           # (real, imaginary) pairs
    if elem in _PACKED_BITS:
        return vals.astype(np.uint8)                 # one byte of packed values per entry
    return vals.astype(_CODES.get(elem, DTYPES[elem][1]))


def _decoded(codes: np.ndarray, elem: int) -> np.ndarray:
    """Values from bit patterns (float16, bfloat16, float8, float4 codes); other types as they are."""
    if elem == 10:
        return codes.view("<f2")
    if elem == 16:
        return (codes.astype(np.uint32) << 16).view(np.float32)
    if elem == 24:
        return _e8m0(codes)
    if elem in _FLOAT_CODES:
        return _minifloat(*_FLOAT_CODES[elem])[codes]
    return codes


def _codes(t: pb.Message, raw: bytes | memoryview | None, signed: bool) -> np.ndarray:
    """The stored values of TensorProto ``t``, flat and counted against its dims: numbers as numpy reads them,
    float16/bfloat16/float8 as their bit patterns, 4- and 2-bit values unpacked (``signed``: int4/int2
    sign-extended to int8, else each value's bits as uint8)."""
    name = t.one("name", "")
    elem = t.one("data_type", 0)
    if t.get("segment"):
        raise ViewerError(f"tensor {name!r} is stored in segments, which Kiln does not read.")
    if elem not in DTYPES or elem in (27, 28):
        raise ViewerError(f"tensor {name!r} has element type {dtype_name(elem)}, whose values Kiln does not read.")
    dims = [int(d) for d in t.all("dims")]
    count = math.prod(dims)
    if raw is None and "raw_data" in t and elem != 8:
        raw = t.one("raw_data")
    if raw is not None:
        store = np.dtype("u1" if elem in _PACKED_BITS else _CODES.get(elem, DTYPES[elem][1]))
        if len(raw) % store.itemsize:
            raise ViewerError(f"tensor {name!r} has {len(raw)} bytes, not a whole number of "
                              f"{dtype_name(elem)} values; the file is damaged.")
        arr = np.frombuffer(raw, dtype=store)
    else:
        arr = _typed(t, elem)
    if elem in _PACKED_BITS:
        per = 8 // _PACKED_BITS[elem]
        if arr.size != -(-count // per):
            raise ViewerError(f"tensor {name!r} holds {arr.size * per} values but its shape {dims} needs "
                              f"{count}; the file is damaged.")
        arr = _unpack(arr, _PACKED_BITS[elem], count, signed and elem in _SIGNED_PACKED)
    if arr.size != count:
        raise ViewerError(f"tensor {name!r} holds {arr.size} values but its shape {dims} needs {count}; "
                          f"the file is damaged.")
    return arr


def to_array(t: pb.Message, raw: bytes | memoryview | None = None) -> np.ndarray:
    """The values of TensorProto ``t`` (``raw``: its bytes read from an external file)."""
    dims = [int(d) for d in t.all("dims")]
    return _decoded(_codes(t, raw, True), t.one("data_type", 0)).reshape(dims)


# Element types numpy lacks: the ml_dtypes type onnx.numpy_helper gives their values in.
_ML_DTYPES = {16: "bfloat16", 17: "float8_e4m3fn", 18: "float8_e4m3fnuz", 19: "float8_e5m2", 20: "float8_e5m2fnuz",
              21: "uint4", 22: "int4", 23: "float4_e2m1fn", 24: "float8_e8m0fnu", 25: "uint2", 26: "int2"}


def numpy_value(t: pb.Message) -> np.ndarray:
    """The values of TensorProto ``t`` (stored in the file) as ``onnx.numpy_helper.to_array`` gives them:
    float16 as float16, strings as str objects (UTF-8, strictly), the types numpy lacks as ml_dtypes
    arrays (ml_dtypes is imported for those only)."""
    elem = t.one("data_type", 0)
    dims = [int(d) for d in t.all("dims")]
    if elem == 8:
        values = [bytes(s).decode("utf-8") for s in t.all("string_data")]
        if len(values) != math.prod(dims):
            raise ViewerError(f"tensor {t.one('name', '')!r} holds {len(values)} values but its shape {dims} needs "
                              f"{math.prod(dims)}; the file is damaged.")
        return np.asarray(values, dtype=object).reshape(dims)
    arr = _codes(t, None, False)
    if elem == 10:
        arr = arr.view("<f2")
    elif elem in _ML_DTYPES:
        import ml_dtypes
        arr = arr.view(getattr(ml_dtypes, _ML_DTYPES[elem]))
    return arr.reshape(dims)


def type_text(tp: pb.Message) -> str:
    """A TypeProto as ONNX writes it in text: ``tensor(float)``, ``seq(tensor(int64))``, ``map(string,…)``."""
    for which in TYPE_ONEOF:
        m = tp.one(which)
        if m is None:
            continue
        if which in ("tensor_type", "sparse_tensor_type"):
            return f"{'sparse_tensor' if which[0] == 's' else 'tensor'}({dtype_name(m.one('elem_type', 0))})"
        if which == "map_type":
            return f"map({dtype_name(m.one('key_type', 0))},{type_text(m.one('value_type') or pb.Message())})"
        if which == "opaque_type":
            return f"opaque({m.one('domain', '')},{m.one('name', '')})"
        inner = type_text(m.one("elem_type") or pb.Message())
        return f"{'seq' if which == 'sequence_type' else 'optional'}({inner})"
    return "undefined"


def attribute_type(attr: pb.Message) -> int:
    """The attribute's type; files that predate the ``type`` field get it from the field that is set."""
    kind = attr.one("type", 0)
    if kind:
        return kind
    for field, k in (("floats", FLOATS), ("ints", INTS), ("strings", STRINGS), ("tensors", TENSORS),
                     ("graphs", GRAPHS), ("f", FLOAT), ("i", INT), ("s", STRING), ("t", TENSOR), ("g", GRAPH)):
        if field in attr:
            return k
    return 0

