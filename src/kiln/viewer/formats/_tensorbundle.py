"""TensorFlow checkpoints (TensorBundle): ``variables.index`` plus ``variables.data-*`` shards.

The index is a LevelDB-style table (TensorFlow writes it uncompressed) whose
values are ``BundleEntryProto`` messages from ``tensor_bundle.proto``: dtype,
shape, shard, offset and size of each variable.  Only the index is read when a
SavedModel opens; variable bytes are read when a weight is shown.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kiln.errors import ViewerError
from kiln.viewer.formats import _protobuf as pb
from kiln.paths import PathEscapeError, resolve_inside
from kiln.viewer.formats._common import count, refused

_MAGIC = 0xDB4775248B80FB57
SCHEMA: dict[str, pb.Schema] = {
    "BundleHeaderProto": {1: ("num_shards", "int"), 2: ("endianness", "enum"), 3: ("version", "bytes")},
    "BundleEntryProto": {1: ("dtype", "enum"), 2: ("shape", "TensorShapeProto"), 3: ("shard_id", "int"),
                         4: ("offset", "int"), 5: ("size", "int"), 6: ("crc32c", "fixed32"), 7: ("slices", "bytes")},
    "TensorShapeProto": {2: ("dim", "Dim"), 3: ("unknown_rank", "bool")},
    "Dim": {1: ("size", "int"), 2: ("name", "string")},
}


def _err(path: Path, what: str) -> ViewerError:
    return ViewerError(f"{path.name!r} is not a readable TensorFlow checkpoint index: {what}.")


def _handle(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    off, pos = pb._varint(memoryview(buf), pos, end)
    size, pos = pb._varint(memoryview(buf), pos, end)
    return off, size, pos


def _block(path: Path, data: bytes, off: int, size: int) -> list[tuple[bytes, bytes]]:
    if off + size + 5 > len(data) or size < 4:
        raise _err(path, f"a block at byte {off} runs past the end of the file")
    if data[off + size] != 0:
        raise _err(path, "its blocks are compressed, which Kiln does not read")
    block = data[off:off + size]
    (n_restarts,) = struct.unpack_from("<I", block, size - 4)
    end = size - 4 * (n_restarts + 1)
    if n_restarts == 0 or end < 0:
        raise _err(path, f"a block at byte {off} has an impossible restart count")
    entries, pos, key = [], 0, b""
    mv = memoryview(block)
    while pos < end:
        shared, pos = pb._varint(mv, pos, end)
        unshared, pos = pb._varint(mv, pos, end)
        vlen, pos = pb._varint(mv, pos, end)
        if shared > len(key) or pos + unshared + vlen > end:
            raise _err(path, f"an entry in the block at byte {off} runs past its end")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        entries.append((key, block[pos:pos + vlen]))
        pos += vlen
    return entries


def read_index(path: Path) -> tuple[dict[str, pb.Message], int]:
    """Variable name -> BundleEntryProto, and the number of data shards."""
    data = path.read_bytes()
    if len(data) < 48 or struct.unpack_from("<Q", data, len(data) - 8)[0] != _MAGIC:
        raise _err(path, "it lacks the table footer magic; it is truncated or not an index")
    footer = len(data) - 48
    try:
        _, _, pos = _handle(data, footer, len(data) - 8)
        ioff, isize, _ = _handle(data, pos, len(data) - 8)
        entries: dict[str, pb.Message] = {}
        shards = 1
        for _, handle in _block(path, data, ioff, isize):
            doff, dsize, _ = _handle(handle, 0, len(handle))
            for key, value in _block(path, data, doff, dsize):
                if key == b"":
                    shards = int(pb.decode(value, "BundleHeaderProto", SCHEMA).one("num_shards", 1) or 1)
                else:
                    entries[key.decode("utf-8", "replace")] = pb.decode(value, "BundleEntryProto", SCHEMA)
    except pb.ProtoError as exc:
        raise _err(path, str(exc)) from None
    if not 0 < shards <= 1 << 16:
        raise _err(path, f"it claims {shards} shards")
    return entries, shards


def variables(index: Path, dtypes: dict[int, str], numpy: dict[str, str], warnings: list[str]
              ) -> dict[str, tuple[list[int], str, Callable[[], Any] | None, int]]:
    """Name -> (shape, dtype, lazy loader, nbytes) for every variable in a checkpoint.

    Shards are looked up inside the index's folder; one whose link leads elsewhere is not read
    (its variables show no values, and ``warnings`` says why)."""
    entries, shards = read_index(index)
    prefix = index.name.removesuffix(".index")
    out = {}
    files: dict[int, Path | str] = {}
    for name, e in entries.items():
        if name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH") or e.all("slices"):
            continue
        dtype = dtypes.get(int(e.one("dtype", 0)), "unknown")
        shape_msg = e.one("shape", pb.Message())
        shape = [int(d.one("size", 0)) for d in shape_msg.all("dim")]
        shard_id = int(e.one("shard_id", 0))
        if shard_id not in files:
            files[shard_id] = _shard(index, f"{prefix}.data-{shard_id:05d}-of-{shards:05d}", warnings)
        shard = files[shard_id]
        off, size = int(e.one("offset", 0)), int(e.one("size", 0))
        if isinstance(shard, str):
            load = refused(shard)
        else:
            load = _loader(shard, off, size, numpy.get(dtype), shape) if dtype in numpy else None
        out[name] = (shape, dtype, load, size)
    return out


def _shard(index: Path, name: str, warnings: list[str]) -> Path | str:
    """The shard file inside the index's folder, or the reason it is not read."""
    try:
        return resolve_inside(index.parent, name, "checkpoint shard")
    except PathEscapeError as exc:
        warnings.append(f"{exc} The variables stored there are shown without values.")
        return f"Values not read: {exc}"


def _loader(shard: Path, off: int, size: int, npdt: str | None, shape: list[int]) -> Callable[[], Any]:
    def load() -> np.ndarray:
        if not shard.is_file() or off < 0 or off + size > shard.stat().st_size:
            raise ViewerError(f"Checkpoint shard {shard.name!r} is missing or shorter than its index says.")
        with open(shard, "rb") as f:
            f.seek(off)
            arr = np.frombuffer(f.read(size), dtype=npdt)
        return arr.reshape(shape) if count(shape) == arr.size else arr
    return load
