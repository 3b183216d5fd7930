"""MXNet: ``<prefix>-symbol.json`` (the graph) with ``<prefix>-<epoch>.params`` (an NDArray list).

``null`` nodes are graph inputs or, when the params file holds ``arg:<name>`` /
``aux:<name>``, weights.  The params file is indexed (names, shapes, offsets)
without reading tensor bytes.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ViewerError
from kiln.viewer.formats._common import GraphBuilder, file_array, inside
from kiln.viewer.graph import ViewModel

_FMT = "MXNet"
_LIST_MAGIC = 0x112
_V1, _V2, _V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
_MAX_OUTPUTS = 1 << 16     # outputs of one operator; more is a damaged or hostile file
_DTYPES = {0: "float32", 1: "float64", 2: "float16", 3: "uint8", 4: "int32", 5: "int8", 6: "int64", 7: "bool",
           8: "int16", 9: "uint16", 10: "uint32", 11: "uint64", 12: "bfloat16"}
_NUMPY = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "uint8": "u1", "int32": "<i4", "int8": "i1",
          "int64": "<i8", "bool": "?", "int16": "<i2", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8",
          "bfloat16": "<u2"}


def sniff(path: Path, head: bytes) -> bool:
    if len(head) >= 16 and struct.unpack("<Q", head[:8])[0] == _LIST_MAGIC:
        return True
    text = head.decode("utf-8", "ignore")
    return bool(re.match(r'\s*\{\s*"nodes"\s*:\s*\[', text)) and '"op"' in text


def _err(path: Path, what: Any) -> ViewerError:
    return ViewerError(f"{path.name!r} is not a readable {_FMT} file: {what}.")


def _siblings(path: Path, warnings: list[str]) -> tuple[Path | None, Path | None]:
    """(symbol file, params file) for whichever of the pair was opened; its partner only from inside the folder."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 8 and struct.unpack("<Q", head[:8])[0] == _LIST_MAGIC:
        prefix = re.sub(r"-\d+$", "", path.stem)
        return inside(path.parent, f"{prefix}-symbol.json", "the symbol file", warnings), path
    prefix = path.name.removesuffix(".json").removesuffix("-symbol")
    params = sorted(path.parent.glob(f"{glob_escape(prefix)}-*.params"))
    return path, (inside(path.parent, params[-1].name, "the parameters file", warnings) if params else None)


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def read_params(path: Path) -> dict[str, tuple[list[int], str, int]]:
    """Name -> (shape, dtype, byte offset) for every NDArray in a ``.params`` file."""
    size = path.stat().st_size
    out: list[tuple[list[int], str, int] | None] = []
    with open(path, "rb") as f:
        def take(fmt: str) -> Any:
            n = struct.calcsize(fmt)
            b = f.read(n)
            if len(b) < n:
                raise _err(path, f"it ends at byte {f.tell()} inside its header; it is truncated")
            return struct.unpack(fmt, b)[0]

        if take("<Q") != _LIST_MAGIC:
            raise _err(path, "it lacks the NDArray-list magic")
        take("<Q")
        n = take("<Q")
        if n > size // 8:
            raise _err(path, f"it claims {n} arrays, more than the file can hold")
        for _ in range(n):
            magic = take("<I")
            if magic in (_V2, _V3):
                if take("<i") != 0:
                    raise _err(path, "sparse NDArrays are not supported")
            # V1-V3: int32 rank (-1: no array), int64 dims; before V1 the magic word was the rank, dims uint32
            ndim = take("<i") if magic in (_V1, _V2, _V3) else magic
            if ndim > 32 or ndim < -1:
                raise _err(path, f"an array claims {ndim} dimensions")
            shape = [take("<q" if magic in (_V1, _V2, _V3) else "<I") for _ in range(max(ndim, 0))]
            if ndim == -1 or (ndim == 0 and magic != _V3) or min(shape, default=0) < 0:
                out.append(None)   # an empty NDArray (unknown shape): no context, type or data follow; with V3's
                continue           # numpy shapes rank 0 is a scalar with data
            take("<i"), take("<i")   # context: device type and id
            dtype = _DTYPES.get(take("<i"))
            if dtype is None:
                raise _err(path, "an array has an unknown type flag")
            count = int(np.prod(shape)) if all(d >= 0 for d in shape) else -1
            nbytes = count * np.dtype(_NUMPY[dtype]).itemsize
            if count < 0 or f.tell() + nbytes > size:
                raise _err(path, "an array's data runs past the end of the file; it is truncated")
            out.append((shape, dtype, f.tell()))
            f.seek(nbytes, 1)
        k = take("<Q")
        names = []
        if k > size // 8:
            raise _err(path, f"it claims {k} names, more than the file can hold")
        for _ in range(k):
            ln = take("<Q")
            if ln > size - f.tell():
                raise _err(path, "a name runs past the end of the file")
            names.append(f.read(ln).decode("utf-8", "replace"))
    if names and len(names) != len(out):
        raise _err(path, f"it has {len(out)} arrays but {len(names)} names")
    names = names or [f"array{i}" for i in range(len(out))]
    return {name.split(":", 1)[-1]: entry for name, entry in zip(names, out) if entry is not None}


def read(path: Path, handle: Any = None) -> ViewModel:
    warnings: list[str] = []
    symbol, params_path = _siblings(path, warnings)
    params = read_params(params_path) if params_path else {}
    if symbol is None:
        from kiln.viewer.formats._common import weights_graph
        entries = [(n, s, d, file_array(params_path, o, _NUMPY[d], s, _FMT), None) for n, (s, d, o) in params.items()]
        return ViewModel(format=_FMT, path=str(path), properties={"content": "parameters only"},
                         graphs=[weights_graph(path.stem, entries, sep="_")], file_size=path.stat().st_size,
                         warnings=warnings)
    try:
        sym = json.loads(symbol.read_text(encoding="utf-8"))
        nodes = sym["nodes"]
        if not isinstance(nodes, list):
            raise TypeError("'nodes' is not a list")
        graph = _graph(sym, nodes, params, params_path, symbol.name.removesuffix("-symbol.json"))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise _err(symbol, f"{type(exc).__name__}: {exc}") from None
    attrs = sym.get("attrs", {}) if isinstance(sym, dict) else {}
    version = attrs.get("mxnet_version", [None, None])
    props: dict[str, Any] = {"nodes": len(nodes)}
    if params_path:
        props["params"] = params_path.name
    return ViewModel(format=_FMT, path=str(symbol), producer="MXNet",
                     version=f"MXNet {version[1]}" if isinstance(version, list) and len(version) > 1 else None,
                     properties=props, graphs=[graph], file_size=symbol.stat().st_size, warnings=warnings)


def _graph(sym: dict, nodes: list, params: dict, params_path: Path | None, name: str) -> Any:
    b = GraphBuilder(name)

    def out_name(i: int, k: int) -> str:
        n = nodes[i]["name"]
        return n if k == 0 else f"{n}:{k}"

    used = _outputs_used(sym, nodes)
    inputs = []
    for i, node in enumerate(nodes):
        op, nname = node.get("op", "null"), str(node.get("name", f"node{i}"))
        if op == "null":
            if nname in params and params_path is not None:
                shape, dtype, offset = params[nname]
                b.weight(nname, shape, dtype, file_array(params_path, offset, _NUMPY[dtype], shape, _FMT))
            else:
                inputs.append(b.tensor(nname))
            continue
        ins = []
        for k, entry in enumerate(node.get("inputs", [])):
            src, idx = int(entry[0]), int(entry[1])
            if not 0 <= src < len(nodes):
                raise ValueError(f"node {nname!r} refers to node {src} of {len(nodes)}")
            tname = out_name(src, idx)
            label = tname.removeprefix(nname + "_") if nodes[src].get("op") == "null" and tname in params else \
                ("input" if k == 0 else f"input{k}")
            ins.append((label, [tname]))
        attrs = node.get("attrs") or node.get("attr") or node.get("param") or {}
        n_out = int(attrs.get("num_outputs", 1)) if str(attrs.get("num_outputs", "1")).isdigit() else 1
        n_out = max(1, n_out, used.get(i, 0))        # topk, RNN, BatchNorm... have more outputs than they declare
        if n_out > _MAX_OUTPUTS:
            raise ValueError(f"node {nname!r} claims {n_out} outputs")
        outs = [("output" if k == 0 else f"output{k}", [out_name(i, k)]) for k in range(n_out)]
        b.node(nname, str(op), ins, outs, {k: _value(v) for k, v in attrs.items()})
    heads = [out_name(int(h[0]), int(h[1])) for h in sym.get("heads", []) if 0 <= int(h[0]) < len(nodes)]
    return b.finish(inputs=inputs, outputs=heads or None)


def _outputs_used(sym: dict, nodes: list) -> dict[int, int]:
    """Node index -> how many outputs its consumers and the graph's heads refer to (highest index + 1)."""
    used: dict[int, int] = {}
    entries = [e for node in nodes for e in node.get("inputs", [])] + list(sym.get("heads", []))
    for entry in entries:
        src, idx = int(entry[0]), int(entry[1])
        if idx < 0:
            raise ValueError(f"an input refers to output {idx} of node {src}")
        used[src] = max(used.get(src, 0), idx + 1)
    return used


def _value(v: Any) -> Any:
    """MXNet stores every attribute as a string: '(3, 3)', 'True', '64'."""
    if not isinstance(v, str):
        return v
    s = v.strip()
    if re.fullmatch(r"-?\d+", s):
        return int(s)
    if re.fullmatch(r"\(\s*-?\d+(\s*,\s*-?\d+)*\s*,?\s*\)", s):
        return [int(x) for x in re.findall(r"-?\d+", s)]
    if s in ("True", "False"):
        return s == "True"
    return s
