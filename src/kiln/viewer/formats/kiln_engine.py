"""Kiln engine reader: the built plan's layers (after fusion) with precision, tactic and origin.

Only the validated header is read (``kiln.engine.read_header``) and the weights
section's checksum verified; weights are read one at a time when the page asks
(``kiln.engine.read_weight``). Each layer keeps
the ONNX node names it was built from in ``overlay["origin"]``, which links it
to the original model in the two-pane view.
"""
from __future__ import annotations

import mmap
import pathlib
import zlib
from typing import Any

from kiln.errors import KilnError, ViewerError
from kiln.viewer.formats._common import refused
from kiln.viewer.graph import ViewArgument, ViewGraph, ViewModel, ViewNode, ViewTensor, ViewWeight

MAGIC = b"KILNENG\x00"

# layer kind (lower case, substring) → category, first match wins
_KINDS = (
    ("plugin", "plugin"), ("deconv", "conv"), ("conv", "conv"), ("pool", "pooling"), ("norm", "normalization"),
    ("lrn", "normalization"), ("attention", "attention"), ("softmax", "activation"), ("activation", "activation"),
    ("matmul", "matmul"), ("fullyconnected", "matmul"), ("gemm", "matmul"), ("einsum", "matmul"),
    ("lstm", "recurrent"), ("gru", "recurrent"), ("rnn", "recurrent"), ("reduce", "reduce"), ("topk", "tensor"),
    ("elementwise", "elementwise"), ("unary", "elementwise"), ("scale", "elementwise"), ("pointwise", "elementwise"),
    ("shuffle", "shape"), ("reshape", "shape"), ("transpose", "shape"), ("squeeze", "shape"), ("flatten", "shape"),
    ("padding", "shape"), ("shape", "shape"), ("concat", "tensor"), ("slice", "tensor"), ("gather", "tensor"),
    ("scatter", "tensor"), ("resize", "tensor"), ("split", "tensor"), ("cast", "tensor"), ("identity", "tensor"),
    ("quantize", "quantization"), ("constant", "data"), ("condition", "control"), ("if", "control"),
    ("loop", "control"), ("select", "elementwise"),
)


def category(kind: str) -> str:
    key = kind.lower().replace("_", "")
    for word, cat in _KINDS:
        if word in key:
            return cat
    return "other"


def sniff(path: pathlib.Path, head: bytes) -> bool:
    return head.startswith(MAGIC)


def read(path: pathlib.Path, handle: Any = None) -> ViewModel:
    """The engine's layers as a view graph; refuses a damaged header with the engine module's own message.

    Damaged weights (their checksum fails) still show the plan, with a warning and no weight values."""
    from kiln import engine
    path = pathlib.Path(path)
    try:
        header = engine.read_header(str(path))
        damaged = weights_damage(path)
    except KilnError as exc:
        raise ViewerError(str(exc)) from None
    if damaged:
        no_values = refused(damaged)
        model = from_header(header, path, lambda name: no_values())
        model.warnings.append(damaged)
        return model
    return from_header(header, path, lambda name: engine.read_weight(str(path), name))


def weights_damage(path: pathlib.Path) -> str | None:
    """Why the engine's weights section cannot be trusted (its CRC-32 does not match the header's), or None."""
    from kiln.engine.format import read_prelude
    _, offset, length, crc = read_prelude(str(path))
    if length == 0:
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
        actual = zlib.crc32(view[offset:offset + length])
    if actual == crc:
        return None
    return (f"The weights of {path.name!r} fail their checksum (CRC-32 {actual:08x}, the header says {crc:08x}): "
            f"the file is damaged, so weight values are not shown. Rebuild the engine with kiln build.")


def from_header(header: dict[str, Any], path: pathlib.Path | None, read_weight) -> ViewModel:
    """Build the ViewModel from a header dict (as ``kiln.engine.read_header`` returns it)."""
    graph = _graph(header, header.get("name") or "engine", header.get("layers") or [], header.get("tensors") or {},
                   header.get("weights") or {}, header.get("inputs") or [], header.get("outputs") or [], read_weight)
    dev = header.get("device") or {}
    props: dict[str, Any] = {
        "Device": " ".join(str(x) for x in (dev.get("kind"), dev.get("name")) if x),
        "Architecture": dev.get("arch"), "Compute capability": dev.get("compute_capability"),
        "Precision": header.get("precision"), "Torch": dev.get("torch"), "CUDA": dev.get("cuda"),
        "cuDNN": dev.get("cudnn"), "Layers": len(header.get("layers") or []),
        "Weights": f"{sum(int(w.get('nbytes') or 0) for w in (header.get('weights') or {}).values()):,} bytes",
    }
    for i, prof in enumerate(header.get("profiles") or []):
        for name, r in (prof or {}).items():
            rng = " / ".join("×".join(map(str, r.get(k, []))) for k in ("min", "opt", "max") if r.get(k) is not None)
            props[f"Profile {i} · {name}"] = f"min / opt / max: {rng}"
    for p in header.get("plugins") or []:
        props[f"Plugin {p.get('name')}"] = f"{p.get('namespace') or ''} v{p.get('version')}".strip()
    build = header.get("build") or {}
    if build.get("source"):
        props["Built from"] = pathlib.Path(str(build["source"])).name
    if build.get("seconds") is not None:
        props["Build time"] = f"{build['seconds']} s"
    props = {k: v for k, v in props.items() if v not in (None, "")}
    return ViewModel(format="Kiln engine", path=str(path) if path else None,
                     producer=f"Kiln {header.get('kiln_version') or (dev.get('kiln') or '')}".strip(),
                     version=f"engine format {header.get('format_version')}", properties=props, graphs=[graph],
                     file_size=path.stat().st_size if path else None)


def _slot(tensor: str, j: int, weights: dict) -> str:
    """A weight input is named by its last dotted part (``…conv.weight`` → weight), others by position."""
    if tensor in weights:
        tail = tensor.rsplit(".", 1)[-1]
        if tail.isidentifier() and len(tail) <= 16:
            return tail
    return f"input {j}"


def _shape(v) -> list | None:
    return list(v) if isinstance(v, (list, tuple)) else None


def _graph(header, name, layers, tensors, weights, inputs, outputs, read_weight) -> ViewGraph:
    from kiln.viewer.formats.onnx import group_path
    g = ViewGraph(name=name)
    for tname, t in tensors.items():
        g.tensors[tname] = ViewTensor(tname, _shape(t.get("shape")), t.get("dtype"))
    for io in list(inputs) + list(outputs):
        g.tensors[io["name"]] = ViewTensor(io["name"], _shape(io.get("shape")), io.get("dtype"))
    g.inputs = [g.tensors[i["name"]] for i in inputs]
    g.outputs = [g.tensors[o["name"]] for o in outputs]
    for wname, w in weights.items():
        shape = _shape(w.get("shape"))
        g.weights[wname] = ViewWeight(wname, shape, w.get("dtype"), load=lambda n=wname: read_weight(n),
                                      nbytes=w.get("nbytes"))
        g.tensors.setdefault(wname, ViewTensor(wname, shape, w.get("dtype")))
    for i, layer in enumerate(layers):
        attrs, subgraphs = {}, {}
        for k, v in (layer.get("attrs") or {}).items():
            if isinstance(v, dict) and "__graph__" in v:
                sub = v["__graph__"]
                subgraphs[k] = _graph(header, k, sub.get("layers") or [], sub.get("tensors") or {}, {},
                                      sub.get("inputs") or [], sub.get("outputs") or [], read_weight)
                attrs[k] = f"graph ({len(sub.get('layers') or [])} layers)"
            else:
                attrs[k] = v
        kind = str(layer.get("kind", "?"))
        node = ViewNode(id=f"l{i}", name=str(layer.get("name", "")), op_type=kind, category=category(kind),
                        attributes=attrs, group=group_path(str(layer.get("name", ""))), subgraphs=subgraphs)
        node.inputs = [ViewArgument(_slot(t, j, weights), [t]) for j, t in enumerate(layer.get("inputs") or []) if t]
        node.outputs = [ViewArgument(f"output {j}", [t]) for j, t in enumerate(layer.get("outputs") or []) if t]
        for arg in node.inputs + node.outputs:
            for t in arg.values:
                g.tensors.setdefault(t, ViewTensor(t))
        node.overlay = {"origin": list(layer.get("origin") or []), "precision": layer.get("precision"),
                        "tactic": layer.get("tactic")}
        if layer.get("host"):
            node.properties["runs on"] = "host"
        g.nodes.append(node)
    return g

