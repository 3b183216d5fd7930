"""GGUF (llama.cpp): key/value metadata, then tensor infos, then aligned tensor data.

Metadata is shown as model properties (``general.architecture`` and the
architecture's own keys such as ``llama.block_count``); tensors are listed by
layer with their GGML types.  Every count and length is bounded by the file
size before anything is allocated.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ViewerError
from kiln.viewer.formats._common import weights_graph
from kiln.viewer.formats._ggml import dequantize
from kiln.viewer.graph import ViewModel

_FMT = "GGUF"

# GGML tensor types: name, elements per block, bytes per block, numpy dtype for unquantized types.
GGML_TYPES: dict[int, tuple[str, int, int, str | None]] = {
    0: ("F32", 1, 4, "<f4"), 1: ("F16", 1, 2, "<f2"), 2: ("Q4_0", 32, 18, None), 3: ("Q4_1", 32, 20, None),
    6: ("Q5_0", 32, 22, None), 7: ("Q5_1", 32, 24, None), 8: ("Q8_0", 32, 34, None), 9: ("Q8_1", 32, 36, None),
    10: ("Q2_K", 256, 84, None), 11: ("Q3_K", 256, 110, None), 12: ("Q4_K", 256, 144, None),
    13: ("Q5_K", 256, 176, None), 14: ("Q6_K", 256, 210, None), 15: ("Q8_K", 256, 292, None),
    16: ("IQ2_XXS", 256, 66, None), 17: ("IQ2_XS", 256, 74, None), 18: ("IQ3_XXS", 256, 98, None),
    19: ("IQ1_S", 256, 50, None), 20: ("IQ4_NL", 32, 18, None), 21: ("IQ3_S", 256, 110, None),
    22: ("IQ2_S", 256, 82, None), 23: ("IQ4_XS", 256, 136, None), 24: ("I8", 1, 1, "i1"),
    25: ("I16", 1, 2, "<i2"), 26: ("I32", 1, 4, "<i4"), 27: ("I64", 1, 8, "<i8"), 28: ("F64", 1, 8, "<f8"),
    29: ("IQ1_M", 256, 56, None), 30: ("BF16", 1, 2, "<u2"), 34: ("TQ1_0", 256, 54, None),
    35: ("TQ2_0", 256, 66, None), 39: ("MXFP4", 32, 17, None),
}
# Metadata value types: struct format (None for string/array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_SHOWN_ARRAY = 16   # longer arrays (tokenizer vocabularies) are summarised, not listed


def sniff(path: Path, head: bytes) -> bool:
    return head[:4] == b"GGUF" and len(head) >= 8 and struct.unpack("<I", head[4:8])[0] in (1, 2, 3)


class _Cursor:
    """Bounded reads over the mapped file; any overrun is a damaged file."""

    def __init__(self, buf: Any, name: str, version: int = 3) -> None:
        self.buf, self.pos, self.end, self.name, self.version = buf, 0, len(buf), name, version

    def take(self, n: int) -> Any:
        if n < 0 or self.pos + n > self.end:
            raise ViewerError(f"{self.name!r} is not a readable {_FMT} file: it ends inside its header at byte "
                              f"{self.pos}; it is truncated.")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def length(self, unit: int = 1) -> int:
        n = self.unpack("<I" if self.version == 1 else "<Q")
        if n * unit > self.end - self.pos:
            raise ViewerError(f"{self.name!r} is not a readable {_FMT} file: a length of {n} at byte {self.pos} "
                              "runs past the end of the file.")
        return n

    def string(self) -> str:
        return bytes(self.take(self.length())).decode("utf-8", "replace")

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9 and depth < 4:
            etype = self.unpack("<I")
            n = self.length(1 if etype in (8, 9) else struct.calcsize(_SCALARS.get(etype, "<B")))
            if etype in _SCALARS and n > _SHOWN_ARRAY:
                self.take(n * struct.calcsize(_SCALARS[etype]))
                return f"[{n} values]"
            items = [self.value(etype, depth + 1) for _ in range(n)]
            return items if n <= _SHOWN_ARRAY else f"[{n} {'strings' if etype == 8 else 'arrays'}]"
        raise ViewerError(f"{self.name!r} is not a readable {_FMT} file: unknown metadata value type {vtype}.")


def _loader(path: Path, offset: int, nbytes: int, npdtype: str | None, shape: list[int], tname: str,
            block_bytes: int):
    def load() -> np.ndarray:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(nbytes)
        if npdtype is None:                               # quantized blocks, decoded to float32
            values = dequantize(tname, data, block_bytes)
            if values is None:
                raise ViewerError(f"{path.name!r}: {_FMT} tensors of type {tname} are shown with their shape "
                                  "only; Kiln does not decode that quantization.")
            return values.reshape(shape)
        arr = np.frombuffer(data, dtype=npdtype)
        if tname == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.reshape(shape)
    return load


def read(path: Path, handle: Any = None) -> ViewModel:
    size = path.stat().st_size
    if size < 16:
        raise ViewerError(f"{path.name!r} is not a readable {_FMT} file: it is only {size} bytes long.")
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _read(path, buf, size)
    finally:
        buf.close()


def _read(path: Path, buf: Any, size: int) -> ViewModel:
    cur = _Cursor(buf, path.name)
    if cur.take(4) != b"GGUF":
        raise ViewerError(f"{path.name!r} is not a {_FMT} file: it lacks the 'GGUF' magic.")
    version = cur.unpack("<I")
    if version not in (1, 2, 3):
        raise ViewerError(f"{path.name!r}: {_FMT} version {version} is not supported (1 to 3 are).")
    cur.version = version
    n_tensors = cur.length(8)
    n_kv = cur.length(9)
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if n_dims > 8:
            raise ViewerError(f"{path.name!r} is not a readable {_FMT} file: tensor {name!r} claims {n_dims} dims.")
        ne = [cur.unpack("<Q") for _ in range(n_dims)]
        ttype = cur.unpack("<I")
        offset = cur.unpack("<Q")
        infos.append((name, ne, ttype, offset))
    align = meta.get("general.alignment", 32)
    align = align if isinstance(align, int) and 0 < align <= 1 << 20 else 32
    data_start = (cur.pos + align - 1) // align * align
    entries = []
    for name, ne, ttype, offset in infos:
        tname, block, block_bytes, npdtype = GGML_TYPES.get(ttype, (f"type{ttype}", 0, 0, None))
        n = 1
        for d in ne:
            n *= d
        if block > 1 and ne and ne[0] % block:
            raise ViewerError(f"{path.name!r} is not a readable {_FMT} file: tensor {name!r} ({tname}) has rows of "
                              f"{ne[0]} elements, not whole blocks of {block}; it is damaged.")
        nbytes = n // block * block_bytes if block else None
        if nbytes is None or data_start + offset + nbytes > size or n > size * 8:
            raise ViewerError(f"{path.name!r} is not a readable {_FMT} file: tensor {name!r} ({tname}) lies past "
                              "the end of the file; it is truncated or damaged.")
        shape = list(reversed(ne))   # GGUF lists the innermost dimension first
        load = _loader(path, data_start + offset, nbytes, npdtype, shape, tname, block_bytes)
        entries.append((name, shape, tname.lower() if npdtype else tname, load, nbytes))
    graph = weights_graph(str(meta.get("general.name") or path.stem), entries)
    arch = meta.get("general.architecture")
    props: dict[str, Any] = {"architecture": arch, "tensors": len(infos)} if arch else {"tensors": len(infos)}
    props.update(meta)
    return ViewModel(format=_FMT, path=str(path), producer=arch, version=f"GGUF v{version}",
                     properties=props, graphs=[graph], file_size=size)
