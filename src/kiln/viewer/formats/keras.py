"""Keras: legacy HDF5 ``.h5`` (``model_config`` attribute), Keras 3 ``.keras`` zips, ``model.to_json()`` files.

All hold the model as a JSON config (Sequential or functional, Keras 2 or 3
spelling); nested models become groups named after the inner model.  Weights
come from HDF5 (``h5py``, imported only here) and are read when opened; a JSON
config alone has none.
"""
from __future__ import annotations

import json
import re
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable

from kiln.errors import ViewerError
from kiln.viewer.formats._common import GraphBuilder, open_zip, reuse_zip, weights_graph
from kiln.viewer.graph import ViewModel

_FMT = "Keras"
_HDF5 = b"\x89HDF\r\n\x1a\n"
_MODELS = {"Sequential", "Functional", "Model"}
_MAX_JSON = 64 << 20
# Variable names in the order Keras stores them, for files that keep only indices (.keras).
_VARS = {
    "Dense": ["kernel", "bias"], "EinsumDense": ["kernel", "bias"], "Embedding": ["embeddings"],
    "SeparableConv1D": ["depthwise_kernel", "pointwise_kernel", "bias"],
    "SeparableConv2D": ["depthwise_kernel", "pointwise_kernel", "bias"], "PReLU": ["alpha"],
    "LSTM": ["kernel", "recurrent_kernel", "bias"], "GRU": ["kernel", "recurrent_kernel", "bias"],
    "SimpleRNN": ["kernel", "recurrent_kernel", "bias"], "Normalization": ["mean", "variance", "count"],
}


def sniff(path: Path, head: bytes) -> Any:
    if head.startswith(_HDF5):
        return True
    if head.lstrip()[:1] == b"{":
        return _json_config(path, head)
    return open_zip(path, head, lambda names: "config.json" in names and (
        "model.weights.h5" in names or "metadata.json" in names))


def _json_config(path: Path, head: bytes) -> dict | None:
    """The config of a ``model.to_json()`` file (a model's class_name and config at the top), or None."""
    if b'"class_name"' not in head or path.stat().st_size > _MAX_JSON:
        return None
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(doc, dict) and doc.get("class_name") in _MODELS and isinstance(doc.get("config"), (dict, list)):
        return doc
    return None


def _err(path: Path, what: str) -> ViewerError:
    return ViewerError(f"{path.name!r} is not a readable {_FMT} file: {what}.")


def read(path: Path, handle: Any = None) -> ViewModel:
    size = path.stat().st_size
    if not isinstance(handle, dict):
        with open(path, "rb") as f:
            head = f.read(4096)
        handle = _json_config(path, head) if head.lstrip()[:1] == b"{" else handle
    if isinstance(handle, dict):                 # architecture only: the JSON names no weights file
        version = handle.get("keras_version")
        try:
            return _model(path, handle, {}, size, str(version) if version else None, None)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise _err(path, f"{type(exc).__name__} in its model config") from None
    try:
        import h5py
    except ImportError:
        raise ViewerError("Opening Keras files needs h5py, which is not installed; install it with "
                          "'pip install kiln[viewer]' (or 'pip install h5py').") from None
    with open(path, "rb") as f:
        head = f.read(8)
    try:
        if head.startswith(_HDF5):
            return _read_h5(path, h5py, size)
        return _read_zip(path, h5py, size, handle)
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, TypeError,
            ValueError, AttributeError, IndexError) as exc:
        if isinstance(exc, ViewerError):
            raise
        raise _err(path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'damaged'}") from None


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _read_h5(path: Path, h5py: Any, size: int) -> ViewModel:
    with h5py.File(path, "r") as f:
        attrs = {k: _text(v) for k, v in f.attrs.items() if k in ("model_config", "keras_version", "backend")}
        weights = _legacy_weights(path, f)
        if "model_config" not in attrs and not weights:
            weights = _v3_weights(path, f, _shared(lambda: h5py.File(path, "r")))
            if not weights:
                raise _err(path, "it is an HDF5 file without a Keras model_config or layer weights")
    version = attrs.get("keras_version")
    if "model_config" not in attrs:
        entries = [("/".join(k[0]) + "/" + str(k[1]), w[0], w[1], w[2], None) for k, w in weights.items()]
        return ViewModel(format=_FMT, path=str(path), version=version, producer=attrs.get("backend"),
                         graphs=[weights_graph(path.stem, entries, sep="/")], file_size=size,
                         properties={"content": "weights only"})
    config = json.loads(attrs["model_config"])
    return _model(path, config, weights, size, version, attrs.get("backend"))


def _read_zip(path: Path, h5py: Any, size: int, handle: Any) -> ViewModel:
    with reuse_zip(path, handle) as z:
        config = json.loads(z.read("config.json"))
        meta = json.loads(z.read("metadata.json")) if "metadata.json" in z.namelist() else {}
        weights: dict = {}
        if "model.weights.h5" in z.namelist():
            def opener() -> Any:
                zz = zipfile.ZipFile(path)
                return h5py.File(zz.open("model.weights.h5"), "r")
            with z.open("model.weights.h5") as member, h5py.File(member, "r") as f:
                weights = _v3_weights(path, f, _shared(opener))
    return _model(path, config, weights, size, meta.get("keras_version"), None)


def _legacy_weights(path: Path, f: Any) -> dict:
    """(layer path, variable) -> (shape, dtype, load) from a legacy ``model_weights`` group."""
    root = f["model_weights"] if "model_weights" in f else f
    out: dict = {}
    for lname in root.attrs.get("layer_names", []):
        lname = _text(lname)
        group = root.get(lname)
        if group is None:
            continue
        for wname in group.attrs.get("weight_names", []):
            wname = _text(wname)
            ds = group.get(wname)
            if ds is None:
                continue
            parts = wname.split(":")[0].split("/")
            at = parts.index(lname) if lname in parts[:-1] else -1   # Keras 3 may prefix the model name
            if at < 0 and re.fullmatch(re.escape(lname) + r"_\d+", parts[0]):
                parts[0], at = lname, 0                                # Keras 2 under TF1: scope "conv2d_1_1"
            layer = tuple(parts[at:-1]) if at >= 0 else (lname, *parts[:-1])
            out[(layer, parts[-1])] = (list(ds.shape), str(ds.dtype), _h5_loader(path, ds.name, None))
    return out


def _v3_weights(path: Path, f: Any, opener: Callable[[], Any]) -> dict:
    """(layer path, index) -> (shape, dtype, load) from a Keras 3 ``layers/<x>/vars/<i>`` tree."""
    out: dict = {}

    def walk(group: Any, prefix: tuple[str, ...], depth: int) -> None:
        if depth > 32 or "layers" not in group:
            return
        for key in group["layers"]:
            layer = group["layers"][key]
            name = _text(layer["vars"].attrs.get("name", key)) if "vars" in layer else key
            lpath = (*prefix, name)
            datasets: list = []
            layer.visititems(lambda n, o: datasets.append((n, o)) if hasattr(o, "shape") and
                             not n.startswith("layers/") else None)
            for i, (n, ds) in enumerate(sorted(datasets, key=lambda d: _natural(d[0]))):
                out[(lpath, i)] = (list(ds.shape), str(ds.dtype), _h5_loader(path, ds.name, opener))
            walk(layer, lpath, depth + 1)
    walk(f, (), 0)
    return out


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


_SHARED_READ = threading.Lock()


def _shared(opener: Callable[[], Any]) -> Callable[[], Any]:
    """One HDF5 handle for all of a model's weights, opened at the first load and kept while the model is
    (reopening the zip member for each of hundreds of weights costs 20 times more)."""
    handle: list = []

    def get() -> Any:
        with _SHARED_READ:
            if not handle:
                handle.append(opener())
            return handle[0]
    return get


def _h5_loader(path: Path, dataset: str, opener: Callable[[], Any] | None) -> Callable[[], Any]:
    """Reads one dataset: through the model's shared handle, or from a file opened for this read."""
    def load() -> Any:
        if opener is not None:
            f = opener()
            with _SHARED_READ:
                return f[dataset][()]
        import h5py
        with h5py.File(path, "r") as f:
            return f[dataset][()]
    return load


class _Graph:
    """Expands a (possibly nested) Keras config into view nodes."""

    def __init__(self, name: str, weights: dict) -> None:
        self.b = GraphBuilder(name)
        self.weights = weights

    def model(self, cfg: dict, group: tuple[str, ...], feeds: list[str] | None) -> list[str]:
        cls = cfg.get("class_name")
        conf = cfg.get("config", {})
        layers = conf if isinstance(conf, list) else conf.get("layers", [])
        if cls == "Sequential" or not isinstance(conf, dict) or "input_layers" not in conf:
            return self._sequential(layers, group, feeds)
        return self._functional(conf, layers, group, feeds)

    def _sequential(self, layers: list, group: tuple[str, ...], feeds: list[str] | None) -> list[str]:
        current = feeds
        for layer in layers:
            lname = _layer_name(layer)
            conf = layer.get("config", {})
            if layer.get("class_name") == "InputLayer":
                if current is None:
                    current = [self._input(lname, conf, group)]
                continue
            if current is None:   # Keras 2: the first layer carries the input shape
                shape = conf.get("batch_input_shape") or conf.get("batch_shape")
                bshape = layer.get("build_config", {}).get("input_shape")
                current = [self._input("/".join((*group, "input")), {"batch_shape": shape or bshape}, ())]
            current = self._layer(layer, group, current, 0)
        return current or []

    def _input(self, name: str, conf: dict, group: tuple[str, ...]) -> str:
        tname = "/".join((*group, name))
        shape = conf.get("batch_shape") or conf.get("batch_input_shape")
        return self.b.tensor(tname, shape, _dtype(conf.get("dtype")))

    def _functional(self, conf: dict, layers: list, group: tuple[str, ...], feeds: list[str] | None) -> list[str]:
        produced: dict[tuple[str, int, int], str] = {}
        inputs = _refs(conf.get("input_layers", []))
        for i, (lname, k, t) in enumerate(inputs):
            if feeds is not None and i < len(feeds):
                produced[(lname, k, t)] = feeds[i]
        by_name = {_layer_name(layer): layer for layer in layers}
        for lname, k, t in inputs:
            if (lname, k, t) not in produced:
                layer_conf = by_name.get(lname, {}).get("config", {})
                produced[(lname, k, t)] = self._input(lname, layer_conf, group)
        for layer in layers:
            lname = _layer_name(layer)
            if layer.get("class_name") == "InputLayer":
                continue
            for k, call in enumerate(layer.get("inbound_nodes", [])):
                srcs = []
                for ref, shape, dtype in _call_refs(call):
                    tname = produced.get(ref)
                    if tname is None:
                        tname = self.b.tensor("/".join((*group, f"{ref[0]}:{ref[1]}:{ref[2]}")))
                    if shape is not None:
                        self.b.tensor(tname, shape, dtype)
                    srcs.append(tname)
                outs = self._layer(layer, group, srcs, k)
                for t, out in enumerate(outs):
                    produced[(lname, k, t)] = out
        return [produced.get(ref) or "/".join((*group, ref[0])) for ref in _refs(conf.get("output_layers", []))]

    def _layer(self, layer: dict, group: tuple[str, ...], srcs: list[str], call: int) -> list[str]:
        cls = str(layer.get("class_name", "Layer"))
        lname = _layer_name(layer)
        conf = layer.get("config", {})
        if cls in _MODELS or (isinstance(conf, dict) and "layers" in conf) or isinstance(conf, list):
            inner = (*group, lname if call == 0 else f"{lname}:{call}")
            return self.model(layer, inner, srcs)
        path = (*group, lname)
        out = "/".join(path) + (f":{call}" if call else "")
        ins: list[tuple[str, list[str]]] = [("inputs" if len(srcs) > 1 else "input", srcs)]
        wkeys = sorted((k for k in self.weights if k[0] == path),
                       key=lambda k: (0, k[1], "") if isinstance(k[1], int) else (1, *_legacy_order(k[1])))
        names = _var_names(cls, conf, len(wkeys))
        for i, key in enumerate(wkeys):
            shape, dtype, load = self.weights[key]
            vname = key[1] if isinstance(key[1], str) else names[i]
            wname = "/".join(path) + "/" + vname
            if wname not in self.b.graph.weights:
                self.b.weight(wname, shape, dtype, load)
            ins.append((vname, [wname]))
        self.b.node(lname, cls, inputs=ins, outputs=[("output", [out])], attributes=_attributes(conf),
                    group=group)
        return [out]


def _legacy_order(v: str) -> tuple[int, str]:
    order = ["kernel", "depthwise_kernel", "pointwise_kernel", "recurrent_kernel", "embeddings", "gamma",
             "beta", "bias", "moving_mean", "moving_variance"]
    return (order.index(v) if v in order else len(order), v)


def _var_names(cls: str, conf: dict, n: int) -> list[str]:
    if cls.startswith(("Conv", "DepthwiseConv")) and n <= 2:
        names = ["kernel", "bias"]
    elif cls in ("BatchNormalization", "LayerNormalization", "GroupNormalization"):
        names = (["gamma"] if conf.get("scale", True) else []) + (["beta"] if conf.get("center", True) else [])
        if cls == "BatchNormalization":
            names += ["moving_mean", "moving_variance"]
    else:
        names = list(_VARS.get(cls, []))
    return names + [f"weight_{i}" for i in range(len(names), n)] if len(names) < n else names[:n]


def _layer_name(layer: dict) -> str:
    conf = layer.get("config", {})
    return str(layer.get("name") or (conf.get("name") if isinstance(conf, dict) else None) or layer.get("class_name"))


def _dtype(d: Any) -> str | None:
    if isinstance(d, dict):
        return _dtype(d.get("config", {}).get("name"))
    return str(d) if d else None


def _refs(spec: Any) -> list[tuple[str, int, int]]:
    """input_layers/output_layers: one [name, node, tensor] or a (nested) list/dict of them."""
    if isinstance(spec, dict):
        return [r for v in spec.values() for r in _refs(v)]
    if isinstance(spec, list) and len(spec) >= 3 and isinstance(spec[0], str) and isinstance(spec[1], int):
        return [(spec[0], int(spec[1]), int(spec[2]))]
    if isinstance(spec, list):
        return [r for v in spec for r in _refs(v)]
    return []


def _call_refs(call: Any) -> list[tuple[tuple[str, int, int], Any, Any]]:
    """The tensors one layer call consumes: Keras 3 ``__keras_tensor__`` dicts or Keras 2 lists."""
    found: list = []

    def walk(x: Any, depth: int) -> None:
        if depth > 16:
            return
        if isinstance(x, dict):
            if x.get("class_name") == "__keras_tensor__":
                c = x.get("config", {})
                h = c.get("keras_history", [])
                if len(h) >= 3:
                    found.append(((str(h[0]), int(h[1]), int(h[2])), c.get("shape"), _dtype(c.get("dtype"))))
                return
            for v in x.values():
                walk(v, depth + 1)
        elif isinstance(x, list):
            if len(x) >= 3 and isinstance(x[0], str) and isinstance(x[1], int) and isinstance(x[2], int):
                found.append(((x[0], x[1], x[2]), None, None))
            else:
                for v in x:
                    walk(v, depth + 1)
    walk(call.get("args", call) if isinstance(call, dict) else call, 0)
    return found


def _attributes(conf: Any) -> dict[str, Any]:
    if not isinstance(conf, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in conf.items():
        if k in ("name", "trainable", "dtype") or v is None:
            continue
        if isinstance(v, dict) and "class_name" in v:
            v = v["class_name"]
        out[k] = v
    return out


def _model(path: Path, config: dict, weights: dict, size: int, version: str | None, backend: str | None) -> ViewModel:
    if not isinstance(config, dict) or "class_name" not in config:
        raise _err(path, "its model config is not a Keras layer config")
    conf = config.get("config", {})
    name = (conf.get("name") if isinstance(conf, dict) else None) or path.stem
    g = _Graph(name, weights)
    cls = config.get("class_name")
    if cls in _MODELS or isinstance(conf, list) or (isinstance(conf, dict) and "layers" in conf):
        outputs = g.model(config, (), None)
    else:   # a single layer saved on its own
        outputs = g._layer(config, (), [g.b.tensor("input")], 0)
    graph = g.b.finish(outputs=outputs)
    return ViewModel(format=_FMT, path=str(path), producer=f"Keras {version}" if version else "Keras",
                     version=version, properties={"class": cls, **({"backend": backend} if backend else {})},
                     graphs=[graph], file_size=size)
