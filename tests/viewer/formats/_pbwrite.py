"""A tiny protobuf wire-format writer for building test files by field number."""
from __future__ import annotations

import struct

import numpy as np


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def f(num: int, value, kind: str | None = None) -> bytes:
    """One field: int -> varint, float -> fixed32 ('d' kind -> double), str/bytes -> length-delimited.

    kind='packed_f' / 'packed_i' writes a packed float32 / varint list.
    """
    if kind == "packed_f":
        body = np.asarray(value, dtype="<f4").tobytes()
        return varint(num << 3 | 2) + varint(len(body)) + body
    if kind == "packed_i":
        body = b"".join(varint(int(v)) for v in value)
        return varint(num << 3 | 2) + varint(len(body)) + body
    if kind == "d":
        return varint(num << 3 | 1) + struct.pack("<d", value)
    if isinstance(value, bool) or isinstance(value, int):
        return varint(num << 3) + varint(int(value))
    if isinstance(value, float):
        return varint(num << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + bytes(value)


def msg(*fields: bytes) -> bytes:
    return b"".join(fields)


def rep(num: int, values, kind: str | None = None) -> bytes:
    """A repeated (unpacked) field."""
    return b"".join(f(num, v, kind) for v in values)
