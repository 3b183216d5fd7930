"""TensorFlow.js: ``model.json`` with binary weight shards, graph models and layers models.

A graph model's ``modelTopology`` is a GraphDef in protobuf's JSON mapping and
is drawn by the TensorFlow reader's graph builder; a layers model's topology is
a Keras config and is drawn by the Keras reader.  Weights come from the
``weightsManifest``: each group's shards are one byte stream, read on demand.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kiln.errors import ViewerError
from kiln.paths import PathEscapeError, resolve_inside
from kiln.viewer.formats._common import guarded, refused, weights_graph
from kiln.viewer.formats._protobuf import Message
from kiln.viewer.graph import ViewModel

_FMT = "TensorFlow.js"
_SIZES = {"float32": 4, "int32": 4, "bool": 1, "uint8": 1, "uint16": 2, "float16": 2, "complex64": 8, "int8": 1,
          "int16": 2}


_MANIFEST_HEAD = re.compile(r'\s*\[\s*\{\s*"(weights|paths)"\s*:')


def sniff(path: Path, head: bytes) -> Any:
    """The parsed document of a model.json, or of a bare weights manifest (``*-weights_manifest.json``)."""
    text = head.decode("utf-8", "ignore")
    model = text.lstrip().startswith("{") and ('"modelTopology"' in text or '"weightsManifest"' in text)
    if not model and not _MANIFEST_HEAD.match(text):
        return None
    try:
        return _Document(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        return _Document(None, f"{type(exc).__name__}: {exc}")   # read reports it in the format's words


class _Document:
    """A sniffed file's JSON (or why it does not parse)."""

    def __init__(self, doc: Any, error: str | None = None) -> None:
        self.doc, self.error = doc, error


def _err(path: Path, what: Any) -> ViewerError:
    return ViewerError(f"{path.name!r} is not a readable {_FMT} file: {what}.")


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", lambda m: "_" + m.group(1).lower(), key)


def to_message(x: Any, depth: int = 0) -> Any:
    """Protobuf JSON mapping -> Message (camelCase keys to field names; maps stay dicts)."""
    if depth > 64:
        raise ValueError("the topology is nested too deeply")
    if isinstance(x, dict):
        m = Message()
        for k, v in x.items():
            key = _snake(k)
            if key in ("attr", "ret") and isinstance(v, dict):
                m[key] = {ak: to_message(av, depth + 1) for ak, av in v.items()}
            elif isinstance(v, list):
                m[key] = [to_message(i, depth + 1) for i in v]
            else:
                m[key] = [to_message(v, depth + 1)]
        return m
    if isinstance(x, str) and re.fullmatch(r"-?\d+", x):
        return int(x)   # int64 values are strings in protobuf JSON
    return x


class _Stream:
    """A weight group's shards read as one byte stream."""

    def __init__(self, files: list[Path]) -> None:
        self.parts = [(p, p.stat().st_size) for p in files]
        self.size = sum(s for _, s in self.parts)

    def read(self, offset: int, n: int) -> bytes:
        out = bytearray()
        pos = 0
        for p, s in self.parts:
            if offset < pos + s and offset + n > pos:
                start = max(offset, pos) - pos
                with open(p, "rb") as f:
                    f.seek(start)
                    out += f.read(min(s - start, offset + n - max(offset, pos)))
            pos += s
        return bytes(out)


def _loader(stream: _Stream, offset: int, n: int, spec: dict, shape: list[int]) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        q = spec.get("quantization") or {}
        qdtype = q.get("dtype")
        raw = stream.read(offset, n)
        if qdtype in ("uint8", "uint16"):
            arr = np.frombuffer(raw, dtype=qdtype).astype(np.float32)
            with np.errstate(over="ignore", invalid="ignore"):      # a huge scale gives inf, which stats count
                arr = arr * float(q.get("scale", 1.0)) + float(q.get("min", 0.0))
        elif qdtype == "float16":
            arr = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        else:
            arr = np.frombuffer(raw, dtype={"float32": "<f4", "int32": "<i4", "bool": "?", "uint8": "u1",
                                            "complex64": "<c8"}.get(spec.get("dtype", "float32"), "<f4"))
        return arr.reshape(shape) if arr.size == math.prod(shape) else arr
    return load


def _shards(path: Path, group: dict, warnings: list[str]) -> tuple[_Stream | None, str | None]:
    """The group's shards as one stream, or None and the reason its values cannot be shown."""
    paths = group.get("paths", [])
    if not isinstance(paths, list):
        raise TypeError("a weightsManifest group's paths is not a list")
    try:
        files = [resolve_inside(path.parent, p, "weight shard") for p in paths]
    except PathEscapeError as exc:
        warnings.append(f"{path.name!r}: {exc} The weights stored there are shown without values.")
        return None, f"Values not read: {exc}"
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise _err(path, f"weight shard {missing[0]!r} is missing beside it")
    return _Stream(files), None


def _weights(path: Path, manifest: list, warnings: list[str]) -> dict[str, tuple[list[int], str, Callable]]:
    out = {}
    if not isinstance(manifest, list):
        raise TypeError("weightsManifest is not a list")
    for group in manifest:
        if not isinstance(group, dict):
            raise TypeError("a weightsManifest group is not an object")
        stream, reason = _shards(path, group, warnings)
        offset = 0
        for spec in group.get("weights", []):
            shape = [int(d) for d in spec.get("shape", [])]
            if any(d < 0 for d in shape):
                raise _err(path, f"weight {spec.get('name')!r} has a negative dimension in {shape}")
            dtype = spec.get("dtype", "float32")
            q = spec.get("quantization") or {}
            size = _SIZES.get(q.get("dtype") or dtype)
            if size is None:
                break   # variable-length (string) weights: later offsets are unknown
            n = math.prod(shape) * size
            if reason is not None:
                out[str(spec.get("name"))] = (shape, dtype, refused(reason))
            elif offset + n > stream.size:
                raise _err(path, f"weight {spec.get('name')!r} lies past the end of its shards; they are truncated")
            else:
                out[str(spec.get("name"))] = (shape, dtype, _loader(stream, offset, n, spec, shape))
            offset += n
    return out


def read(path: Path, handle: Any = None) -> ViewModel:
    sniffed = handle if isinstance(handle, _Document) else sniff(path, path.read_bytes()[:4096])
    if sniffed is None or sniffed.error is not None:
        raise _err(path, sniffed.error if sniffed is not None else "it is neither a model.json nor a weights manifest")
    doc = sniffed.doc
    try:
        warnings: list[str] = []
        if isinstance(doc, list):
            return _manifest_only(path, doc, warnings)
        if not isinstance(doc, dict):
            raise TypeError("the top level is not an object")
        topology = doc.get("modelTopology") or {}
        weights = _weights(path, doc.get("weightsManifest") or [], warnings)
        fmt = doc.get("format") or ("graph-model" if "node" in topology else "layers-model")
        if "node" in topology or fmt == "graph-model":
            model = _graph_model(path, topology, weights)
        else:
            model = _layers_model(path, topology, weights)
    except ViewerError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise _err(path, f"{type(exc).__name__}: {exc}") from None
    model.format = _FMT
    model.path = str(path)
    model.file_size = path.stat().st_size
    model.producer = " ".join(str(doc[k]) for k in ("generatedBy", "convertedBy") if doc.get(k)) or model.producer
    model.properties["model_format"] = fmt
    model.warnings += warnings
    return model


def _manifest_only(path: Path, manifest: list, warnings: list[str]) -> ViewModel:
    """A weights manifest without a topology (face-api.js ships these): its tensors, grouped by layer."""
    weights = _weights(path, manifest, warnings)
    if not weights:
        raise _err(path, "the weights manifest lists no weights")
    graph = weights_graph(path.name.removesuffix(".json").removesuffix("-weights_manifest"),
                          [(name, shape, dtype, load, None) for name, (shape, dtype, load) in weights.items()],
                          sep="/")
    return ViewModel(format=_FMT, path=str(path), graphs=[graph], file_size=path.stat().st_size, warnings=warnings,
                     properties={"model_format": "weights manifest", "content": "weights only",
                                 "weights": len(weights)})


def _graph_model(path: Path, topology: dict, weights: dict) -> ViewModel:
    from kiln.viewer.formats import tf

    gd = to_message(topology)
    graphs = tf.with_functions(tf._graph(path.parent.name or path.stem, gd.all("node"), None, None),
                               gd.one("library", Message()).all("function"))
    g = graphs[0]
    for name, (shape, dtype, load) in weights.items():
        if name in g.weights:
            w = g.weights[name]
            w.shape, w.dtype, w.load = shape, dtype, guarded(load, name)
    return ViewModel(format=_FMT, graphs=graphs, properties={"content": "graph model"})


def _layers_model(path: Path, topology: dict, weights: dict) -> ViewModel:
    from kiln.viewer.formats import keras

    config = topology.get("model_config", topology)
    kw = {}
    for name, (shape, dtype, load) in weights.items():
        parts = name.split(":")[0].split("/")
        kw[(tuple(parts[:-1]), parts[-1])] = (shape, dtype, load)
    model = keras._model(path, config, kw, path.stat().st_size, topology.get("keras_version"), topology.get("backend"))
    model.properties["content"] = "layers model"
    return model
