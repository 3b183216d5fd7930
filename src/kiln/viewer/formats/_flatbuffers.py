"""A minimal, bounds-checked FlatBuffers table reader (for TensorFlow Lite).

Readers address fields by slot number from the published ``.fbs`` schema.
Every offset and vector length is checked against the buffer before use, so
a damaged file raises :class:`FlatBufferError` rather than reading garbage.
"""
from __future__ import annotations

import struct
from typing import Any

import numpy as np


class FlatBufferError(ValueError):
    """An offset or length points outside the buffer."""


class Table:
    """One table: a position in the buffer and its vtable."""

    __slots__ = ("buf", "pos", "vtable", "vt_size")

    def __init__(self, buf: Any, pos: int) -> None:
        n = len(buf)
        if pos < 0 or pos + 4 > n:
            raise FlatBufferError(f"table at byte {pos} lies outside the {n}-byte buffer")
        vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        if vtable < 0 or vtable + 4 > n:
            raise FlatBufferError(f"vtable of the table at byte {pos} lies outside the buffer")
        vt_size = struct.unpack_from("<H", buf, vtable)[0]
        if vt_size < 4 or vt_size & 1 or vtable + vt_size > n:
            raise FlatBufferError(f"vtable at byte {vtable} has an impossible size {vt_size}")
        self.buf, self.pos, self.vtable, self.vt_size = buf, pos, vtable, vt_size

    @classmethod
    def root(cls, buf: Any) -> "Table":
        if len(buf) < 8:
            raise FlatBufferError("buffer is too short to hold a root table")
        return cls(buf, struct.unpack_from("<I", buf, 0)[0])

    def _field(self, slot: int) -> int:
        o = 4 + 2 * slot
        if o + 2 > self.vt_size:
            return 0
        off = struct.unpack_from("<H", self.buf, self.vtable + o)[0]
        if off and self.pos + off >= len(self.buf):
            raise FlatBufferError(f"field {slot} of the table at byte {self.pos} lies outside the buffer")
        return self.pos + off if off else 0

    def has(self, slot: int) -> bool:
        return self._field(slot) != 0

    def scalar(self, slot: int, fmt: str, default: Any = 0) -> Any:
        p = self._field(slot)
        if not p:
            return default
        if p + struct.calcsize(fmt) > len(self.buf):
            raise FlatBufferError(f"scalar field {slot} runs past the end of the buffer")
        return struct.unpack_from(fmt, self.buf, p)[0]

    def _indirect(self, slot: int) -> int:
        p = self._field(slot)
        if not p:
            return 0
        if p + 4 > len(self.buf):
            raise FlatBufferError(f"offset field {slot} runs past the end of the buffer")
        target = p + struct.unpack_from("<I", self.buf, p)[0]
        if target >= len(self.buf):
            raise FlatBufferError(f"field {slot} points past the end of the buffer")
        return target

    def table(self, slot: int) -> "Table | None":
        t = self._indirect(slot)
        return Table(self.buf, t) if t else None

    def _vector(self, slot: int, elem: int) -> tuple[int, int]:
        v = self._indirect(slot)
        if not v:
            return 0, 0
        if v + 4 > len(self.buf):
            raise FlatBufferError(f"vector field {slot} runs past the end of the buffer")
        n = struct.unpack_from("<I", self.buf, v)[0]
        if n * elem > len(self.buf) - v - 4:
            raise FlatBufferError(f"vector field {slot} claims {n} elements, more than the buffer holds")
        return v + 4, n

    def string(self, slot: int, default: str | None = None) -> str | None:
        start, n = self._vector(slot, 1)
        if not start:
            return default
        return bytes(self.buf[start:start + n]).decode("utf-8", "replace")

    def vector(self, slot: int, dtype: str) -> np.ndarray:
        dt = np.dtype(dtype)
        start, n = self._vector(slot, dt.itemsize)
        if not start:
            return np.zeros(0, dtype=dt)
        return np.frombuffer(self.buf, dtype=dt, count=n, offset=start)

    def bytes_view(self, slot: int) -> tuple[int, int]:
        """(start, length) of a ``[ubyte]`` vector, without copying it."""
        return self._vector(slot, 1)

    def tables(self, slot: int) -> list["Table"]:
        start, n = self._vector(slot, 4)
        out = []
        for i in range(n):
            p = start + 4 * i
            out.append(Table(self.buf, p + struct.unpack_from("<I", self.buf, p)[0]))
        return out

    def strings(self, slot: int) -> list[str]:
        start, n = self._vector(slot, 4)
        out = []
        for i in range(n):
            p = start + 4 * i
            s = p + struct.unpack_from("<I", self.buf, p)[0]
            if s + 4 > len(self.buf):
                raise FlatBufferError("string offset points past the end of the buffer")
            k = struct.unpack_from("<I", self.buf, s)[0]
            if s + 4 + k > len(self.buf):
                raise FlatBufferError("string runs past the end of the buffer")
            out.append(bytes(self.buf[s + 4:s + 4 + k]).decode("utf-8", "replace"))
        return out
