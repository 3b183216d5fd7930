"""Core ML packages (``.mlpackage``) and the MIL blob files that hold an ML Program's weights.

A package is a folder: ``Manifest.json`` names the root model by an item whose
``path`` is relative to ``Data/``; an ML Program constant stored outside the
model is a ``BlobFileValue`` (``@model_path/weights/weight.bin`` plus the byte
offset of its metadata record). Both paths come from the files, so both are
resolved inside the package with :func:`kiln.paths.resolve_inside`.

Blob file layout (coremltools ``MILBlob/Blob/StorageFormat.hpp``): a 64-byte
header (count, version 2), then per blob a 64-byte metadata record (sentinel
0xDEADBEEF, data type, size in bytes, data offset) followed by its data.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kiln.errors import ViewerError
from kiln.paths import PathEscapeError, resolve_inside
from kiln.viewer.formats._common import count, refused

_FMT = "Core ML"
_SENTINEL = 0xDEADBEEF
_METADATA = struct.Struct("<IIQQ")            # sentinel, data type, size in bytes, data offset
_MODEL_PATH = "@model_path/"
_MAX_MANIFEST = 16 << 20
# BlobDataType -> numpy dtype; bfloat16 and float8 load as raw integers, sub-byte types as packed bytes.
_BLOB_DTYPES = {1: "<f2", 2: "<f4", 3: "u1", 4: "i1", 5: "<u2", 6: "<i2", 7: "<u2", 8: "u1", 9: "u1", 10: "u1",
                11: "u1", 12: "u1", 13: "u1", 14: "<i4", 15: "<u4", 16: "u1", 17: "u1"}
_PACKED = {8, 9, 10, 11, 12, 13}              # int4, uint1..uint6: shown as their packed bytes


@dataclass(frozen=True)
class Package:
    """A package folder and its root model, or the reason the manifest does not name one."""
    folder: Path
    model: Path | None
    error: str | None = None


def package(path: Path) -> Package | None:
    """The package at ``path`` (a package folder, or the Manifest.json inside one), its manifest read once."""
    if not (path.is_dir() or path.name == "Manifest.json"):
        return None
    folder = path if path.is_dir() else path.parent
    try:
        manifest_file = resolve_inside(folder, "Manifest.json", "the package manifest")
    except PathEscapeError as exc:
        if path.suffix.lower() == ".mlpackage" or path.name == "Manifest.json":
            return Package(folder, None, f"{folder.name!r}: {exc}")
        return None
    if not manifest_file.is_file():
        return None
    if manifest_file.stat().st_size > _MAX_MANIFEST:
        return Package(folder, None, f"{folder.name!r} is not a readable {_FMT} package: its Manifest.json is "
                       f"larger than {_MAX_MANIFEST >> 20} MiB.")
    raw = manifest_file.read_bytes()
    if b"rootModelIdentifier" not in raw:
        return None
    try:
        manifest = json.loads(raw.decode("utf-8"))
        items = manifest["itemInfoEntries"]
        rel = items[manifest["rootModelIdentifier"]]["path"]
        model = resolve_inside(folder / "Data", rel, "the package's root model")
    except PathEscapeError as exc:
        return Package(folder, None, f"{folder.name!r}: {exc}")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return Package(folder, None, f"{folder.name!r} is not a readable {_FMT} package: its Manifest.json lacks "
                       f"the root model's path ({type(exc).__name__}: {exc}).")
    if not model.is_file():
        return Package(folder, None, f"{folder.name!r} is not a readable {_FMT} package: its root model {rel!r} "
                       f"is missing.")
    return Package(folder, model)


class Blobs:
    """Loaders for BlobFileValue constants, resolved inside ``base`` (the folder holding the .mlmodel)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.warnings: list[str] = []

    def loader(self, name: str, blob: Any, shape: list | None) -> Callable[[], np.ndarray]:
        file_name = str(blob.one("fileName", ""))
        offset = int(blob.one("offset", 0))
        rel = file_name[len(_MODEL_PATH):] if file_name.startswith(_MODEL_PATH) else file_name
        try:
            file = resolve_inside(self.base, rel, f"the weights file of constant {name!r}")
        except PathEscapeError as exc:
            self.warnings.append(f"{exc} Its values are not shown.")
            return refused(f"Values not read: {exc}")
        return lambda: _read_blob(file, file_name, offset, shape)


def _read_blob(file: Path, file_name: str, offset: int, shape: list | None) -> np.ndarray:
    if not file.is_file():
        raise ViewerError(f"The weights file {file_name!r} is missing beside the model.")
    size = file.stat().st_size
    if offset < 0 or offset + _METADATA.size > size:
        raise ViewerError(f"{_FMT}: a blob record at byte {offset} lies past the end of {file_name!r} ({size} "
                          f"bytes); the weights file is truncated.")
    with open(file, "rb") as f:
        f.seek(offset)
        sentinel, dtype, nbytes, data_offset = _METADATA.unpack(f.read(_METADATA.size))
        if sentinel != _SENTINEL or dtype not in _BLOB_DTYPES:
            raise ViewerError(f"{_FMT}: no blob record at byte {offset} of {file_name!r}; the weights file is "
                              f"damaged or does not belong to this model.")
        if data_offset + nbytes > size:
            raise ViewerError(f"{_FMT}: a blob at byte {data_offset} ({nbytes} bytes) lies past the end of "
                              f"{file_name!r} ({size} bytes); the weights file is truncated.")
        f.seek(data_offset)
        data = f.read(nbytes)
    dt = np.dtype(_BLOB_DTYPES[dtype])
    arr = np.frombuffer(data, dtype=dt, count=len(data) // dt.itemsize)
    if dtype not in _PACKED and shape and count(shape) == arr.size:
        return arr.reshape(shape)
    return arr
