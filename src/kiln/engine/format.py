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
and both CRCs before anything is used, so a damaged file is refused in one line.
JSON is the only thing decoded: loading never runs code from the file.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
import zlib
from typing import Any

import numpy as np

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
    if not isinstance(header, dict) or "plan" not in header or "device" not in header:
        raise _damaged(path, "header lacks the plan or the device fingerprint")
    table = header.get("weights", {})
    if not isinstance(table, dict):
        raise _damaged(path, "weight table is malformed")
    for key, info in table.items():
        try:
            dt = np_dtype(info["dtype"])
            shape = info["shape"]
            if dt.hasobject or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise ValueError(shape)
            n = math.prod(shape) * dt.itemsize      # Python ints: no int64 wrap-around to a "valid" size
            off, nb = int(info["offset"]), int(info["nbytes"])
        except Exception:
            raise _damaged(path, f"weight {key!r} has a malformed entry") from None
        if n != nb or off < 0 or nb < 0 or off + nb > w_len:
            raise _damaged(path, f"weight {key!r} lies outside the weights section")
    why = _structure_problem(header)
    if why:
        raise _damaged(path, why)
    return header, w_off, w_len, crc_w


def _structure_problem(header: dict[str, Any]) -> str | None:
    """What the runtime would trip over in a header that decodes but is not a plan (None if fine).

    The checksum only proves the bytes are the ones written; this proves they have the
    shape the runtime indexes blindly, so a bad file is one EngineFormatError, not a KeyError.
    """
    dev = header["device"]
    if not isinstance(dev, dict) or not isinstance(dev.get("kind"), str):
        return "device fingerprint is malformed"
    if not isinstance(header.get("precision", "fp32"), str):
        return "precision is malformed"
    profiles = header.get("profiles", [])
    if not isinstance(profiles, list) or not all(
            isinstance(p, dict) and all(isinstance(r, dict) and _int_list(r.get("min")) and _int_list(r.get("max"))
                                        for r in p.values()) for p in profiles):
        return "optimization profiles are malformed"
    return _plan_problem(header["plan"], set())


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and all(type(d) is int for d in v)


def _plan_problem(plan: Any, outer: set[str]) -> str | None:
    if not isinstance(plan, dict):
        return "plan is not a table"
    io = [plan.get("inputs"), plan.get("outputs")]
    if not all(isinstance(v, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                           and isinstance(t.get("dtype"), str) for t in v) for v in io):
        return "plan inputs/outputs are malformed"
    weights, tensors = plan.get("weights", {}), plan.get("tensors", {})
    if not isinstance(weights, dict) or not all(isinstance(v, str) for v in weights.values()) \
            or not isinstance(tensors, dict) or not isinstance(plan.get("outer", []), list):
        return "plan weight or tensor table is malformed"
    defined = outer | set(weights) | {t["name"] for t in io[0]} | {n for n in plan.get("outer", []) if isinstance(n, str)}
    layers = plan.get("layers")
    if not isinstance(layers, list):
        return "plan has no layer list"
    for layer in layers:
        if not (isinstance(layer, dict) and isinstance(layer.get("name"), str) and isinstance(layer.get("kind"), str)
                and isinstance(layer.get("inputs"), list) and isinstance(layer.get("outputs"), list)
                and isinstance(layer.get("attrs", {}), dict)
                and all(n is None or isinstance(n, str) for n in layer["inputs"])
                and all(isinstance(n, str) for n in layer["outputs"])):
            return f"layer entry {str(layer)[:60]!r} is malformed"
        missing = [n for n in layer["inputs"] if n is not None and n not in defined]
        if missing:
            return f"layer {layer['name']!r} reads {missing[0]!r}, which nothing before it produces"
        for value in layer.get("attrs", {}).values():
            sub = value.get("__graph__") if isinstance(value, dict) else None
            if sub is not None and (why := _plan_problem(sub, defined)):
                return why
            rec = value.get("__plugin__") if isinstance(value, dict) else None
            if rec is not None and not (isinstance(rec, dict) and isinstance(rec.get("name"), str)
                                        and isinstance(rec.get("fields", {}), dict)):
                return f"layer {layer['name']!r} has a malformed plugin record"
        defined.update(layer["outputs"])
    for t in io[1]:
        if t["name"] not in defined:
            return f"plan output {t['name']!r} is produced by no layer"
    return None


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
