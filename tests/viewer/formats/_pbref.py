"""Reference protobuf parsing for real-file tests: message classes built from field numbers with Google's library.

A test writes only the fields it checks, as the format's own .proto numbers them (caffe.proto, graph.proto,
caffe2.proto); every other field is skipped by the library as an unknown field. The parse is Google's protobuf
runtime, independent of Kiln's own wire decoder (kiln.viewer.formats._protobuf).
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES, "float": _F.TYPE_FLOAT, "int32": _F.TYPE_INT32,
            "int64": _F.TYPE_INT64, "uint32": _F.TYPE_UINT32}


def messages(package: str, spec: dict[str, list[tuple[str, int, str, bool]]]) -> dict[str, type]:
    """Message classes for ``{message: [(field, number, type, repeated), ...]}``; a type that is not a scalar
    names another message of the spec."""
    fd = descriptor_pb2.FileDescriptorProto(name=f"kiln_ref_{package}.proto", package=package, syntax="proto2")
    for msg, fields in spec.items():
        m = fd.message_type.add(name=msg)
        for name, number, typ, repeated in fields:
            f = m.field.add(name=name, number=number,
                            label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
            if typ in _SCALARS:
                f.type = _SCALARS[typ]
            else:
                f.type, f.type_name = _F.TYPE_MESSAGE, f".{package}.{typ}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return {msg: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{msg}")) for msg in spec}


def parse(cls: type, data: bytes):
    """One message of ``cls`` parsed from ``data``."""
    msg = cls()
    msg.ParseFromString(data)
    return msg
