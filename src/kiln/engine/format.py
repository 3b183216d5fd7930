"""The engine file: one file, no code inside, weights readable in place.

Layout (little-endian)::

    0   8  magic  b"KILNENG\\0"
    8   4  format version
    12  4  reserved (0)
    16  8  header length H
    24  8  weights offset W (64-byte aligned)
    32  8  weights length L
    40  4  CRC-32 of the header
    44  4  CRC-32 of the weights
    48 16  reserved (0)
    64  H  header: UTF-8 JSON (device fingerprint, plan, plugin records, weight table)
    W   L  weights, each 64-byte aligned, raw little-endian

Every length is checked against the file size before anything is allocated,
and both CRCs before anything is used; the header is then validated against
the engine schema (``kiln.engine.schema``), so a damaged or forged file is
refused in one line. JSON is the only thing decoded: loading never runs code
from the file.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from typing import Any

import numpy as np

from kiln.engine.schema import MAX_DEPTH, header_problem
from kiln.errors import EngineFormatError, IncompatibleEngineError
from kiln.ir.dtypes import np_dtype

MAGIC = b"KILNENG\x00"
FORMAT_VERSION = 1
_PRE = struct.Struct("<8sII QQQ II 16s")
ALIGN = 64
MAX_HEADER = 1 << 30


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def write_engine(path: str, header: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    """Write atomically: a temporary file renamed over ``path`` (an old engine survives a failed write)."""
    table = {}
    offset = 0
    order = list(weights)
    for key in order:
        arr = weights[key]
        table[key] = {"dtype": arr.dtype.name if arr.dtype.name != "bfloat16" else "bfloat16",
                      "shape": list(arr.shape), "offset": offset, "nbytes": int(arr.nbytes)}
        offset = _align(offset + arr.nbytes)
    full = dict(header)
    full["weights"] = table
    head = json.dumps(full, separators=(",", ":"), allow_nan=True).encode("utf-8")
    w_off = _align(_PRE.size + len(head))
    w_len = offset
    crc_w = 0
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * _PRE.size)
            f.write(head)
            f.write(b"\0" * (w_off - _PRE.size - len(head)))
            pos = 0
            for key in order:
                arr = np.ascontiguousarray(weights[key])
                data = arr.view(np.uint8).reshape(-1) if arr.size else b""
                pad = table[key]["offset"] - pos
                if pad:
                    f.write(b"\0" * pad)
                    crc_w = zlib.crc32(b"\0" * pad, crc_w)
                f.write(data)
                crc_w = zlib.crc32(data, crc_w)
                pos = table[key]["offset"] + arr.nbytes
            if pos < w_len:
                f.write(b"\0" * (w_len - pos))
                crc_w = zlib.crc32(b"\0" * (w_len - pos), crc_w)
            f.seek(0)
            f.write(_PRE.pack(MAGIC, FORMAT_VERSION, 0, len(head), w_off, w_len, zlib.crc32(head), crc_w, b"\0" * 16))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _damaged(path: str, why: str) -> EngineFormatError:
    return EngineFormatError(f"{path!r} is damaged or not a Kiln engine ({why}); rebuild it with kiln build.")


def read_prelude(path: str) -> tuple[dict[str, Any], int, int, int]:
    """Validate the fixed part and the header; return (header, weights offset, length, weights crc)."""
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except FileNotFoundError:
        raise EngineFormatError(f"{path!r} does not exist; check the path or build it with kiln build.") from None
    except IsADirectoryError:
        raise EngineFormatError(f"{path!r} is a directory, not an engine file.") from None
    with f:
        pre = f.read(_PRE.size)
        if len(pre) < len(MAGIC) or pre[:len(MAGIC)] != MAGIC:
            raise EngineFormatError(f"{path!r} is not a Kiln engine (no KILNENG magic at the start); "
                                    f"build one with kiln build model.onnx -o model.kiln.")
        if len(pre) < _PRE.size:
            raise _damaged(path, "truncated before the end of the fixed header")
        magic, version, _, h_len, w_off, w_len, crc_h, crc_w, _ = _PRE.unpack(pre)
        if version != FORMAT_VERSION:
            raise IncompatibleEngineError(
                f"{path!r} has engine format version {version}, but this Kiln reads version {FORMAT_VERSION}; "
                f"rebuild it with this Kiln: kiln build model.onnx -o {os.path.basename(path)}")
        if h_len > MAX_HEADER or _PRE.size + h_len > size:
            raise _damaged(path, f"header length {h_len} runs past the end of the {size}-byte file")
        if w_off < _PRE.size + h_len or w_off % ALIGN or w_off + w_len != size:
            raise _damaged(path, f"weights section {w_off}+{w_len} does not match the file size {size}")
        head = f.read(h_len)
        if len(head) != h_len or zlib.crc32(head) != crc_h:
            raise _damaged(path, "header checksum mismatch")
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _damaged(path, f"header is not valid JSON: {exc}") from None
    except RecursionError:
        raise _damaged(path, f"header nests deeper than {MAX_DEPTH} levels") from None
    why = header_problem(header, w_len=w_len)
    if why:
        raise _damaged(path, why)
    return header, w_off, w_len, crc_w


def read_engine(path: str, verify_weights: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Header plus weights as zero-copy numpy views over a copy-on-write map of the file."""
    header, w_off, w_len, crc_w = read_prelude(path)
    weights: dict[str, np.ndarray] = {}
    if w_len == 0:
        return header, weights
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if verify_weights and zlib.crc32(memoryview(mm)[w_off:w_off + w_len]) != crc_w:
        raise _damaged(path, "weights checksum mismatch")
    for key, info in header.get("weights", {}).items():
        dt = np_dtype(info["dtype"])
        arr = np.frombuffer(mm, dtype=dt, count=int(np.prod(info["shape"], dtype=np.int64)),
                            offset=w_off + int(info["offset"]))
        weights[key] = arr.reshape(info["shape"])
    return header, weights
