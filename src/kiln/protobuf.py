"""A minimal protobuf reader shared by the protobuf-based model formats (the viewer's readers, and
``kiln.onnx``, which reads ONNX files with it instead of importing onnx).

Readers describe only the messages they need, by field number, from each
format's published ``.proto`` schema; nothing here depends on generated
``_pb2`` modules or on the frameworks themselves.  Every length is checked
against the bytes that remain, every loop advances, and nesting is bounded,
so a damaged file fails with one :class:`ViewerError` instead of a crash.

Decoded messages are :class:`Message` objects mapping field *name* to a list of
values (protobuf's "last one wins" for singular fields is :meth:`Message.one`).
Bytes fields and raw numeric arrays stay zero-copy ``memoryview`` slices.
"""
from __future__ import annotations

import struct
from typing import Any, Iterable

import numpy as np

from kiln.errors import ViewerError

# A schema is {field_number: (name, type)}; type is a scalar kind below, a
# message name in the registry, "map:<keytype>:<valuetype>", or "raw:<dtype>"
# (a packed numeric array kept as raw little-endian bytes, read with np.frombuffer).
# Strings: "string" replaces invalid UTF-8, "text" keeps such bytes visible as \x escapes.
Schema = dict[int, tuple[str, str]]

_VARINT = {"int", "uint", "sint", "bool", "enum", "int32", "uint32", "sint32"}
_FIXED32 = {"float": "<f", "fixed32": "<I", "sfixed32": "<i"}
_FIXED64 = {"double": "<d", "fixed64": "<Q", "sfixed64": "<q"}
_MAX_DEPTH = 100


class Message(dict):
    """Field name -> list of values, as decoded from the wire or from text."""

    def one(self, name: str, default: Any = None) -> Any:
        values = self.get(name)
        return values[-1] if values else default

    def all(self, name: str) -> list:
        return self.get(name) or []


class ProtoError(ValueError):
    """The bytes do not follow the protobuf wire format."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise ProtoError(f"varint runs past the end at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ProtoError(f"varint longer than 10 bytes at byte {pos}")


def _signed(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def iter_fields(buf: memoryview, start: int = 0, end: int | None = None) -> Iterable[tuple[int, int, Any, int]]:
    """Yield (field, wire_type, value, value_start) for each field; LEN values as memoryview slices."""
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        field, wt = tag >> 3, tag & 7
        if field == 0:
            raise ProtoError(f"field number 0 at byte {pos}")
        at = pos
        if wt == 0:
            value, pos = _varint(buf, pos, end)
        elif wt == 1:
            if pos + 8 > end:
                raise ProtoError(f"8-byte field {field} runs past the end")
            value, pos = buf[pos:pos + 8], pos + 8
        elif wt == 2:
            n, pos = _varint(buf, pos, end)
            if n > end - pos:
                raise ProtoError(f"field {field} claims {n} bytes but only {end - pos} remain")
            at = pos
            value, pos = buf[pos:pos + n], pos + n
        elif wt == 5:
            if pos + 4 > end:
                raise ProtoError(f"4-byte field {field} runs past the end")
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ProtoError(f"unsupported wire type {wt} for field {field}")
        yield field, wt, value, at


def _scalar(kind: str, wt: int, value: Any) -> list:
    """Convert one wire value of a scalar field; packed LEN values give several."""
    if kind in _VARINT:
        if wt == 0:
            vals = [value]
        elif wt == 2:
            vals, pos, mv = [], 0, value
            while pos < len(mv):
                v, pos = _varint(mv, pos, len(mv))
                vals.append(v)
        else:
            raise ProtoError(f"wire type {wt} for a varint field")
        if kind == "bool":
            return [bool(v) for v in vals]
        if kind in ("sint", "sint32"):
            return [(v >> 1) ^ -(v & 1) for v in vals]
        if kind in ("int", "enum", "int32"):
            return [_signed(v) for v in vals]
        return vals
    if kind in _FIXED32 or kind in _FIXED64:
        fmt = _FIXED32.get(kind) or _FIXED64[kind]
        size = struct.calcsize(fmt)
        if (wt == 5 and size == 4) or (wt == 1 and size == 8):
            return [struct.unpack(fmt, value)[0]]
        if wt == 2 and len(value) % size == 0:
            return list(struct.unpack(f"<{len(value) // size}{fmt[1]}", value))
        raise ProtoError(f"wire type {wt} for a {kind} field")
    if kind in ("string", "text"):
        if wt != 2:
            raise ProtoError(f"wire type {wt} for a string field")
        return [bytes(value).decode("utf-8", "replace" if kind == "string" else "backslashreplace")]
    if kind == "bytes":
        if wt != 2:
            raise ProtoError(f"wire type {wt} for a bytes field")
        return [value]
    raise ProtoError(f"unknown field kind {kind!r} in schema")


_MSG, _MAP, _RAW, _TEXT, _SIGNED, _OTHER = range(6)
_PLANS: dict[int, tuple[dict, dict]] = {}


def _plan(registry: dict[str, Schema], type_name: str) -> dict[int, tuple[str, int, Any]]:
    """The schema of ``type_name`` as field -> (name, how to decode, argument), made once per registry."""
    entry = _PLANS.get(id(registry))
    if entry is None or entry[0] is not registry:
        entry = _PLANS[id(registry)] = (registry, {})
    plans = entry[1]
    plan = plans.get(type_name)
    if plan is None:
        plan = {}
        for field, (name, kind) in registry[type_name].items():
            if kind in registry:
                plan[field] = (name, _MSG, kind)
            elif kind.startswith("map:"):
                plan[field] = (name, _MAP, tuple(kind.split(":")[1:]))
            elif kind.startswith("raw:"):
                plan[field] = (name, _RAW, wire_types(kind, registry))
            elif kind == "text":
                plan[field] = (name, _TEXT, kind)
            elif kind in ("int", "enum", "int32"):
                plan[field] = (name, _SIGNED, kind)
            else:
                plan[field] = (name, _OTHER, kind)
        plans[type_name] = plan
    return plan


def decode(buf: bytes | memoryview, type_name: str, registry: dict[str, Schema], _depth: int = 0) -> Message:
    """Decode ``buf`` as message ``type_name``; unknown fields are skipped."""
    if _depth > _MAX_DEPTH:
        raise ProtoError("messages nested too deeply")
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    plan = _plan(registry, type_name)
    msg = Message()
    pos, end = 0, len(mv)
    while pos < end:                     # iter_fields, inlined: one-byte varints (most tags) read directly
        tag = mv[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _varint(mv, pos, end)
        field, wt = tag >> 3, tag & 7
        if field == 0:
            raise ProtoError(f"field number 0 at byte {pos}")
        if wt == 0:
            if pos < end and mv[pos] < 0x80:
                value = mv[pos]
                pos += 1
            else:
                value, pos = _varint(mv, pos, end)
        elif wt == 2:
            if pos < end and mv[pos] < 0x80:
                n = mv[pos]
                pos += 1
            else:
                n, pos = _varint(mv, pos, end)
            if n > end - pos:
                raise ProtoError(f"field {field} claims {n} bytes but only {end - pos} remain")
            value = mv[pos:pos + n]
            pos += n
        elif wt == 5 or wt == 1:
            size = 4 if wt == 5 else 8
            if pos + size > end:
                raise ProtoError(f"{size}-byte field {field} runs past the end")
            value = mv[pos:pos + size]
            pos += size
        else:
            raise ProtoError(f"unsupported wire type {wt} for field {field}")
        spec = plan.get(field)
        if spec is None:
            continue
        name, how, arg = spec
        if how == _MSG:
            if wt != 2:
                raise ProtoError(f"wire type {wt} for message field {type_name}.{name}")
            item = decode(value, arg, registry, _depth + 1)
        elif how == _TEXT and wt == 2:
            item = str(value, "utf-8", "backslashreplace")
        elif how == _SIGNED and wt == 0:
            item = value if value < 1 << 63 else _signed(value)
        elif how == _RAW:
            if wt not in arg:
                raise ProtoError(f"wire type {wt} for numeric field {type_name}.{name}")
            item = value                 # keep bytes; see raw_array()
        elif how == _MAP:
            if wt != 2:
                raise ProtoError(f"wire type {wt} for map field {type_name}.{name}")
            key, val = _map_entry(value, arg[0], arg[1], registry, _depth)
            msg.setdefault(name, {})[key] = val
            continue
        else:
            msg.setdefault(name, []).extend(_scalar(arg, wt, value))
            continue
        values = msg.get(name)
        if values is None:
            msg[name] = [item]
        else:
            values.append(item)
    return msg


def _map_entry(buf: memoryview, ktype: str, vtype: str, registry: dict[str, Schema], depth: int) -> tuple[Any, Any]:
    key: Any = "" if ktype == "string" else 0
    val: Any = None
    for field, wt, value, _ in iter_fields(buf):
        if field == 1:
            key = _scalar(ktype, wt, value)[0]
        elif field == 2:
            val = decode(value, vtype, registry, depth + 1) if vtype in registry else _scalar(vtype, wt, value)[0]
    if val is None and vtype in registry:
        val = Message()
    return key, val


def raw_array(chunks: list, kind: str, dtype: str) -> np.ndarray:
    """Join a ``raw:`` field's chunks into one numpy array (packed or not on the wire)."""
    if not chunks:
        return np.zeros(0, dtype=dtype)
    if kind in ("float", "double", "fixed32", "fixed64", "sfixed32", "sfixed64"):
        return np.frombuffer(b"".join(bytes(c) for c in chunks) if len(chunks) > 1 else chunks[0], dtype=dtype).copy()
    vals: list[int] = []
    unsigned = kind in ("uint", "uint32")
    for c in chunks:   # a packed chunk, or one unpacked varint
        if isinstance(c, int):
            vals.append(c if unsigned else _signed(c))
        else:
            vals.extend(_scalar("uint" if unsigned else "int", 2, c))
    return np.asarray(vals, dtype=dtype)


def wire_types(kind: str, registry: dict[str, Schema]) -> set[int]:
    """The wire types a field of this kind may legally use."""
    if kind in registry or kind.startswith("map:") or kind in ("string", "text", "bytes"):
        return {2}
    base = kind[4:].split(":")[0] if kind.startswith("raw:") else kind
    if base in _VARINT:
        return {0, 2}
    if base in _FIXED32:
        return {5, 2}
    if base in _FIXED64:
        return {1, 2}
    return {0, 1, 2, 5}


def conforming_fields(buf: bytes | memoryview, type_name: str, registry: dict[str, Schema],
                      depth: int = 2, nested_unknown: bool = False, _top: bool = True) -> set[int] | None:
    """The top-level field numbers of ``buf`` if it reads as ``type_name``, else None.

    ``buf`` may be cut short (a file's head).  Used for sniffing: every field
    must be known with a legal wire type, and nested messages must conform too,
    down to ``depth`` levels.  With ``nested_unknown``, nested messages may also
    carry fields the schema lacks (legal protobuf, written by forks and newer
    versions of a format) as long as their wire format is sound.
    """
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    schema = registry[type_name]
    seen: set[int] = set()
    pos, end = 0, len(mv)
    try:
        while pos < end:
            tag, pos = _varint(mv, pos, end)
            field, wt = tag >> 3, tag & 7
            spec = schema.get(field)
            if spec is None and nested_unknown and not _top and wt in (0, 1, 2, 5):
                spec = (f"field{field}", "bytes" if wt == 2 else "any")
            if spec is None or wt not in wire_types(spec[1], registry):
                return None
            kind = spec[1]
            if wt == 0:
                _, pos = _varint(mv, pos, end)
            elif wt in (1, 5):
                pos += 8 if wt == 1 else 4
            else:
                n, pos = _varint(mv, pos, end)
                chunk = mv[pos:min(end, pos + n)]
                truncated = pos + n > end
                if kind in ("string", "text") and not truncated:
                    try:
                        bytes(chunk).decode("utf-8")
                    except UnicodeDecodeError:
                        return None
                if depth > 0 and len(chunk) and (kind in registry or kind.startswith("map:")):
                    sub = kind if kind in registry else None
                    if sub and conforming_fields(chunk, sub, registry, depth - 1, nested_unknown, False) is None:
                        return None
                pos += n
            seen.add(field)
    except ProtoError:
        pass   # a cut-off head ends mid-field; what came before still counts
    return seen or None


def conforms(buf: bytes | memoryview, type_name: str, registry: dict[str, Schema], depth: int = 2) -> bool:
    """Whether ``buf`` (possibly cut short) reads as ``type_name``; see conforming_fields."""
    return conforming_fields(buf, type_name, registry, depth) is not None


def fail(fmt: str, path_name: str, err: Exception) -> ViewerError:
    """One-line error for a file whose bytes stop following the schema."""
    return ViewerError(f"{path_name!r} is not a readable {fmt} file: {err}.")
