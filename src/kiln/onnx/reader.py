"""ONNX models read without the onnx package, for the parser and ``kiln check``.

``load`` decodes a model file with ``kiln.onnx.proto`` and hands it over as :class:`Proto` views, which
read like onnx's generated classes (fields by name, repeated fields as lists, ``HasField``,
``WhichOneof``) as far as the parser and its converters use them. Importing onnx costs seconds of
start-up (its ml_dtypes extension), so onnx is loaded only where the file needs it: a model whose
tensors live in external data files (onnx reads those, with its own path checks), bytes this reader
refuses (onnx then says what is wrong, or reads what it accepts), and ONNX Runtime fallback islands,
which embed onnx's own messages.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from kiln import protobuf as pb
from kiln.onnx import proto as P

# Repeated fields of the messages read (each other field is singular: its last value, or the default).
_REPEATED: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in {
    "ModelProto": ("opset_import", "metadata_props", "functions"),
    "GraphProto": ("node", "initializer", "sparse_initializer", "input", "output", "value_info"),
    "NodeProto": ("input", "output", "attribute"),
    "AttributeProto": ("floats", "ints", "strings", "tensors", "graphs", "type_protos", "sparse_tensors"),
    "TensorProto": ("dims", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data",
                    "external_data"),
    "SparseTensorProto": ("dims",),
    "TensorShapeProto": ("dim",),
    "FunctionProto": ("input", "output", "attribute", "node", "opset_import", "attribute_proto", "value_info"),
}.items()}
_KINDS: dict[str, dict[str, str]] = {msg: {name: kind for name, kind in fields.values()}
                                     for msg, fields in P.MESSAGES.items()}
_RAW_DTYPES = {"float": "<f4", "double": "<f8", "int": "<i8", "uint": "<u8"}
_DEFAULTS = {"int": 0, "uint": 0, "enum": 0, "float": 0.0, "double": 0.0, "text": "", "bytes": b""}


class Proto:
    """A decoded ONNX message, read like onnx's generated class of the same name (read-only)."""

    __slots__ = ("_msg", "_type")

    def __init__(self, msg: pb.Message, type_name: str) -> None:
        self._msg = msg
        self._type = type_name

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):            # not a field (copy and pickle probe dunder names on bare instances)
            raise AttributeError(name)
        kind = _KINDS[self._type].get(name)
        if kind is None:
            raise AttributeError(f"{self._type} has no field {name!r}")
        values = self._msg.get(name)
        if name in _REPEATED.get(self._type, ()):
            if kind.startswith("raw:"):
                base = kind[4:]
                return pb.raw_array(values or [], base, _RAW_DTYPES[base]).tolist()
            return [self._value(kind, v) for v in values or ()]
        if not values:
            return Proto(pb.Message(), kind) if kind in _KINDS else _DEFAULTS[kind]
        return self._value(kind, values[-1])

    @staticmethod
    def _value(kind: str, v: Any) -> Any:
        if kind in _KINDS:
            return Proto(v, kind)
        return bytes(v) if kind == "bytes" else v

    def HasField(self, name: str) -> bool:  # noqa: N802 (protobuf's name)
        if name not in _KINDS[self._type] or name in _REPEATED.get(self._type, ()):
            raise ValueError(f"{self._type} has no singular field {name!r}")
        return bool(self._msg.get(name))

    def WhichOneof(self, group: str) -> str | None:  # noqa: N802 (protobuf's name)
        """The set field of TypeProto's ``value`` oneof, or None."""
        if self._type != "TypeProto" or group != "value":
            raise ValueError(f"{self._type} has no oneof {group!r}")
        return next((f for f in P.TYPE_ONEOF if self._msg.get(f)), None)

    @property
    def message(self) -> pb.Message:
        """The decoded message this view reads."""
        return self._msg

    def __repr__(self) -> str:
        return f"<{self._type} read by kiln.onnx.reader>"


def is_view(obj: Any) -> bool:
    """Whether ``obj`` is one of this module's views (else an onnx message)."""
    return isinstance(obj, Proto)


def tensor_array(t: Any) -> np.ndarray:
    """A TensorProto's values as ``onnx.numpy_helper.to_array`` gives them (onnx's own for onnx messages)."""
    if isinstance(t, Proto):
        return P.numpy_value(t.message)
    from onnx import numpy_helper
    return numpy_helper.to_array(t)


def load(model: str | os.PathLike | bytes | bytearray, load_external_data: bool = True) -> Any:
    """A model file (path) or serialized model (bytes) as a ModelProto: this module's view, or onnx's
    ModelProto where the model needs onnx (external data; bytes this reader refuses). Raises what
    ``onnx.load`` raises for a file it cannot read."""
    path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    if path is not None:
        with open(path, "rb") as f:
            data = f.read()
    else:
        data = bytes(model)
    try:
        msg = P.parse_model(data)
    except (pb.ProtoError, RecursionError):
        msg = None
    if msg is not None and not _uses_external_data(msg):
        return Proto(msg, "ModelProto")
    import onnx
    if path is not None:
        return onnx.load(path, load_external_data=load_external_data)
    return onnx.load_from_string(data)


def _uses_external_data(model: pb.Message) -> bool:
    """Whether any tensor of the model (initializers, attributes, subgraphs, functions) is stored outside it."""
    stack: list[tuple[pb.Message, str]] = [(g, "GraphProto") for g in model.all("graph")]
    stack += [(f, "FunctionProto") for f in model.all("functions")]
    while stack:
        msg, kind = stack.pop()
        if kind == "TensorProto":
            if msg.one("data_location", 0) == P.EXTERNAL:
                return True
            continue
        for name, sub in _KINDS[kind].items():
            if sub in ("GraphProto", "NodeProto", "AttributeProto", "TensorProto", "SparseTensorProto"):
                stack.extend((m, sub) for m in msg.all(name))
    return False
