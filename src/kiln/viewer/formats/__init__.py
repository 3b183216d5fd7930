"""The format table: every model format the viewer opens, in one place.

Each reader is a module in this package defining
``sniff(path: pathlib.Path, head: bytes) -> handle | None`` (content check;
``head`` is the file's first 4 KiB, empty for a directory) and
``read(path: pathlib.Path, handle=None) -> kiln.viewer.graph.ViewModel``.
A match returns a handle (any true value: what the check already parsed, such
as an open archive or a decoded document) that ``read`` reuses, so a file is not
parsed twice (Netron's ``match``/``open``); ``read`` called without one sniffs
for itself. A handle with a ``close`` method is closed once read is done.
Readers are imported only when their line is tried, so opening an ONNX file
never imports TensorFlow-sized dependencies.
"""
from __future__ import annotations

import importlib
import pathlib
from dataclasses import dataclass
from typing import Any, Callable

from kiln.errors import ViewerError


@dataclass(frozen=True)
class Format:
    module: str                      # reader module in kiln.viewer.formats
    name: str                        # shown to the user
    extensions: tuple[str, ...]      # lower-case suffixes (or full names) that hint at it


# One line per format. Order matters only among readers that sniff the same bytes.
FORMATS: list[Format] = [
    Format("kiln_engine", "Kiln engine", (".kiln",)),
    # Core ML and SavedModel heads can also pass ONNX's ModelProto sniff, so they are tried first.
    Format("coreml", "Core ML", (".mlmodel", ".mlpackage", "manifest.json")),
    Format("tf", "TensorFlow", (".pb", ".pbtxt", ".meta", "saved_model.pb", "saved_model.pbtxt")),
    Format("onnx", "ONNX", (".onnx", ".pb", ".onnxtxt")),
    Format("keras", "Keras", (".h5", ".hdf5", ".keras", ".json")),
    Format("tflite", "TensorFlow Lite", (".tflite", ".lite")),
    Format("caffe", "Caffe", (".caffemodel", ".prototxt", ".pbtxt")),
    Format("caffe2", "Caffe2", (".pb", "predict_net.pb", "init_net.pb", "predict_net.pbtxt")),
    Format("mxnet", "MXNet", (".json", ".params", ".mar")),
    Format("tfjs", "TensorFlow.js", (".json", "model.json")),
    Format("pt2", "PyTorch export", (".pt2",)),
    Format("torchscript", "TorchScript", (".pt", ".pth", ".jit", ".ptl", ".torchscript")),
    Format("safetensors", "safetensors", (".safetensors",)),
    Format("gguf", "GGUF", (".gguf",)),
]


def _reader(fmt: Format):
    return importlib.import_module(f"{__name__}.{fmt.module}")


def match(path: str | pathlib.Path) -> tuple[Format, Any]:
    """The format of the file (from its content; the extension only breaks ties) and its reader's handle."""
    p = pathlib.Path(path)
    if not p.exists():
        raise ViewerError(f"{str(p)!r} does not exist; check the path.")
    head = b""
    if p.is_file():
        with open(p, "rb") as f:
            head = f.read(4096)
    suffix = p.suffix.lower()
    named = [f for f in FORMATS if suffix in f.extensions or p.name.lower() in f.extensions]
    ordered = named + [f for f in FORMATS if f not in named]
    for fmt in ordered:
        try:
            reader = _reader(fmt)
        except ImportError:
            continue
        try:
            handle = reader.sniff(p, head)
        except Exception:
            continue
        if handle:
            return fmt, handle
    if len(named) == 1 and (p.is_file() or suffix):   # the name claims one format, the content says otherwise
        fmt, kind = named[0], "file" if p.is_file() else "folder"
        raise ViewerError(f"{p.name!r}: this {suffix or p.name} {kind} is not a valid {fmt.name} model (its "
                          f"content does not follow the {fmt.name} format); check that it is complete and was "
                          f"saved as {fmt.name}.")
    names = ", ".join(f"{f.name} ({' '.join(f.extensions)})" for f in FORMATS)
    raise ViewerError(f"{p.name!r} is not a model format Kiln can open; supported formats: {names}.")


def detect(path: str | pathlib.Path) -> Format:
    """Pick the format from the file's content; the extension only breaks ties."""
    fmt, handle = match(path)
    _close(handle)
    return fmt


def _close(handle: Any) -> None:
    close = getattr(handle, "close", None)
    if callable(close):
        close()


def open_model(path: str | pathlib.Path):
    """Detect the format and read the file into a ViewModel, reusing what detection parsed."""
    return _open(path, lambda reader, p, handle: reader.read(p, handle))


def open_model_first(path: str | pathlib.Path) -> tuple[Any, Callable[[], Any] | None]:
    """For a page that draws at once: the ViewModel as far as it reads quickly, and None or a function that
    returns the complete one (a reader with a slow second step defines ``read_first``; ONNX: inferred shapes)."""
    def first(reader, p: pathlib.Path, handle: Any):
        if hasattr(reader, "read_first"):
            return reader.read_first(p, handle)
        return reader.read(p, handle), None
    return _open(path, first)


def _open(path: str | pathlib.Path, read: Callable[[Any, pathlib.Path, Any], Any]) -> Any:
    fmt, handle = match(path)
    try:
        return read(_reader(fmt), pathlib.Path(path), handle)
    except ViewerError:
        raise
    except Exception as exc:  # a reader's parse failure becomes one clear line
        raise ViewerError(f"{pathlib.Path(path).name!r} looks like {fmt.name} but cannot be read: {exc}") from None
    finally:
        _close(handle)
