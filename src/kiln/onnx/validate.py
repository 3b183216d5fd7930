"""What the parser checks before it trusts a model file's values: tensor dims and data types, sparse
tensors' indices, and each node against its op's ONNX schema (inputs present, graph and tensor
attributes of the right type). Each refusal is one ParseError naming the tensor or node.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from kiln.errors import ParseError
from kiln.ir.verify import fmt_bytes, host_memory, nbytes
from kiln.onnx import proto, schemas
from kiln.onnx.reader import tensor_array
from kiln.onnx.schemas import Schema

if TYPE_CHECKING:
    from kiln.onnx.parser import Node

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


def text(value: Any) -> str:
    """A string field of the model as text: protobuf hands string fields holding invalid UTF-8 over
    as bytes, which become text with the bad bytes written as backslash escapes."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value


def first_line(exc: Exception) -> str:
    s = str(exc).strip().splitlines()
    return s[0] if s else type(exc).__name__


def _check_dims(dims: Sequence[int], itemsize: int, where: str) -> None:
    """Refuse dims no tensor can have: negative ones, or more bytes than this machine has free."""
    if any(d < 0 for d in dims):
        raise ParseError(f"{where} has dims {list(dims)}; a dim is a size (0 or more), so the file is damaged or "
                         f"was written wrong.")
    size = nbytes(dims, itemsize)
    if size > (1 << 30) and size > (free := host_memory()):
        raise ParseError(f"{where} has dims {list(dims)}, {fmt_bytes(size)} as a dense tensor, more than the "
                         f"{fmt_bytes(free)} this machine has free; the file is damaged or the tensor too large.")


def _itemsize(code: int, where: str) -> int:
    """Bytes per element of an ONNX data type Kiln supports (refused in one line otherwise)."""
    onnx_dtype(code, f"{where} ")
    return proto.itemsize(int(code)) or 1


def tensor_value(tp, where: str) -> np.ndarray:
    """A TensorProto's value (onnx's message or kiln.onnx.reader's view), its dims checked first (a negative
    dim is not read as a size)."""
    _check_dims(tp.dims, _itemsize(tp.data_type, where), where)
    try:
        arr = tensor_array(tp)
    except Exception as exc:
        raise ParseError(f"{where} cannot be read ({first_line(exc)}); if the model uses external data, keep the "
                         f"data files beside the .onnx file.") from None
    if list(arr.shape) != list(tp.dims):
        raise ParseError(f"{where} has dims {list(tp.dims)} but holds {arr.size} values; the file is damaged.")
    return arr


def dense(sp, where: str) -> np.ndarray:
    """A SparseTensorProto as a dense array (indices flat, or one row of coordinates per value), its
    dims and indices checked before anything is written."""
    dims = [int(d) for d in sp.dims]
    vals = tensor_value(sp.values, f"{where} (values)").reshape(-1)
    _check_dims(dims, vals.dtype.itemsize, where)
    idx = tensor_value(sp.indices, f"{where} (indices)")
    if idx.dtype.kind not in "iu":
        raise ParseError(f"{where} has {idx.dtype} indices; sparse indices are int64.")
    n = len(vals)
    total = int(np.prod(dims, dtype=object)) if dims else 1
    if idx.ndim == 1 and idx.shape[0] == n:
        if n and (idx.min() < 0 or idx.max() >= total):
            raise ParseError(f"{where} has an index outside its {total} elements (dims {dims}); the file is damaged.")
        dense = np.zeros(dims, vals.dtype)
        dense.reshape(-1)[idx] = vals
        return dense
    if idx.ndim == 2 and idx.shape == (n, len(dims)):
        if n and ((idx < 0).any() or (idx >= np.asarray(dims, np.int64)).any()):
            raise ParseError(f"{where} has a coordinate outside its dims {dims}; the file is damaged.")
        dense = np.zeros(dims, vals.dtype)
        dense[tuple(idx.T)] = vals
        return dense
    raise ParseError(f"{where} has {n} values but indices of shape {list(idx.shape)}; they must be [{n}] (flat) or "
                     f"[{n}, {len(dims)}] (coordinates).")


def schema_of(op_type: str, opset: int, domain: str) -> Schema | None:
    """The rules of the op's ONNX schema at the model's opset, or None (contrib and custom ops have none here)."""
    return schemas.get(op_type, opset, domain)


def check_node(node: Node, rules: Schema, opset: int) -> None:
    """Refuse a node whose inputs or graph/tensor attributes break the op's ONNX schema, naming what is
    wrong (before a converter trips over it)."""
    n = len(node.proto.input)
    if not rules.min_inputs <= n <= rules.max_inputs:
        lo, hi = rules.min_inputs, rules.max_inputs
        want = str(lo) if lo == hi else f"{lo} to {hi}" if hi < 1 << 20 else f"at least {lo}"
        raise ParseError(f"{_where(node, opset)} has {n} inputs; {node.op_type} takes {want}. The file is damaged "
                         f"or was written wrong.")
    for i, name in rules.required:
        if i < n and node.inputs[i] is None:
            raise ParseError(f"{_where(node, opset)} leaves its required input {i} ({name}) empty; the file is "
                             f"damaged or was written wrong.")
    if not rules.required_attrs and not rules.typed_attrs:
        return
    given = {text(a.name): int(a.type) for a in node.proto.attribute}
    for name in rules.required_attrs:
        if name not in given:
            raise ParseError(f"{_where(node, opset)} lacks its required attribute {name!r}; the file is damaged or "
                             f"was written wrong.")
    for name, want in rules.typed_attrs.items():
        if name in given and given[name] != want:
            raise ParseError(f"{_where(node, opset)} has attribute {name!r} of type {_attr_type(given[name])}, not "
                             f"{_attr_type(want)}; the file is damaged or was written wrong.")


def _where(node: Node, opset: int) -> str:
    return f"Node {node.name!r} ({node.op_type}, opset {opset})"


# AttributeProto.AttributeType's names, by value
ATTRIBUTE_TYPES = ("UNDEFINED", "FLOAT", "INT", "STRING", "TENSOR", "GRAPH", "FLOATS", "INTS", "STRINGS", "TENSORS",
                   "GRAPHS", "SPARSE_TENSOR", "SPARSE_TENSORS", "TYPE_PROTO", "TYPE_PROTOS")


def _attr_type(t) -> str:
    return ATTRIBUTE_TYPES[int(t)] if 0 <= int(t) < len(ATTRIBUTE_TYPES) else str(int(t))
