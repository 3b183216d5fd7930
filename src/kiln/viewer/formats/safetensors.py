"""safetensors: a JSON header of tensor names, dtypes, shapes and offsets, then raw data.

The header is read and checked against the file size; tensor bytes are read
only when a weight is opened.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ViewerError
from kiln.viewer.formats._common import NUMPY_DTYPES, bf16_to_f32, count, weights_graph
from kiln.viewer.graph import ViewModel

_FMT = "safetensors"
_MAX_HEADER = 100 << 20


def sniff(path: Path, head: bytes) -> bool:
    if len(head) < 10:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= _MAX_HEADER and head[8:9] == b"{" and n + 8 <= path.stat().st_size


def _loader(path: Path, start: int, end: int, dtype: str, shape: list[int]):
    def load() -> np.ndarray:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        arr = np.frombuffer(data, dtype=NUMPY_DTYPES.get(dtype, "u1"))
        if dtype == "BF16":
            arr = bf16_to_f32(arr)
        return arr.reshape(shape) if count(shape) == arr.size else arr
    return load


def read(path: Path, handle: Any = None) -> ViewModel:
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise ViewerError(f"{path.name!r} is not a readable {_FMT} file: it is shorter than its 8-byte header size.")
        (n,) = struct.unpack("<Q", first)
        if n > min(size - 8, _MAX_HEADER):
            raise ViewerError(f"{path.name!r} is not a readable {_FMT} file: its header claims {n} bytes "
                              f"but the file has {size}; it is truncated or damaged.")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ViewerError(f"{path.name!r} is not a readable {_FMT} file: its JSON header is damaged ({exc}).") from None
    if not isinstance(header, dict):
        raise ViewerError(f"{path.name!r} is not a readable {_FMT} file: its header is not a JSON object.")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    entries = []
    for name, info in header.items():
        try:
            dtype = str(info["dtype"])
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ViewerError(f"{path.name!r} is not a readable {_FMT} file: tensor {name!r} lacks "
                              "dtype, shape or data_offsets.") from None
        if not 0 <= begin <= end or base + end > size:
            raise ViewerError(f"{path.name!r} is not a readable {_FMT} file: tensor {name!r} lies past the end "
                              "of the file; it is truncated.")
        entries.append((name, shape, dtype.lower(), _loader(path, base + begin, base + end, dtype, shape), end - begin))
    graph = weights_graph(path.stem, entries)
    props = {str(k): v for k, v in meta.items()} if isinstance(meta, dict) else {}
    props["tensors"] = len(entries)
    return ViewModel(format=_FMT, path=str(path), producer=props.get("format"), properties=props,
                     graphs=[graph], file_size=size)
