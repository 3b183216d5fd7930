"""PyTorch ``.pt2``: a ``torch.export`` archive (zip) holding an ExportedProgram as JSON.

Read without torch and without unpickling anything: the graph comes from
``models/<name>.json`` (older archives: ``serialized_exported_program.json``),
weights from the raw ``data/weights`` entries described by
``model_weights_config.json``.  Pickled weights are listed but not loaded.
Groups follow each node's ``nn_module_stack`` (the module path).
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ViewerError
from kiln.viewer.formats._common import GraphBuilder, open_zip, reuse_zip, strided
from kiln.viewer.graph import ViewModel

_FMT = "PyTorch export"
_DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16", 7: "float32", 8: "float64",
           10: "complex64", 11: "complex128", 12: "bool", 13: "bfloat16", 28: "uint16", 29: "float8_e4m3fn",
           30: "float8_e5m2", 34: "uint32", 35: "uint64"}
_NUMPY = {"uint8": "u1", "int8": "i1", "int16": "<i2", "int32": "<i4", "int64": "<i8", "float16": "<f2",
          "float32": "<f4", "float64": "<f8", "complex64": "<c8", "complex128": "<c16", "bool": "?",
          "bfloat16": "<u2", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "float8_e4m3fn": "u1",
          "float8_e5m2": "u1"}
_MAX_JSON = 512 << 20


def _members(z: zipfile.ZipFile) -> list[str]:
    return [n for n in z.namelist() if n.endswith(("models/model.json", "serialized_exported_program.json"))
            or ("/models/" in n and n.endswith(".json"))]


def sniff(path: Path, head: bytes) -> zipfile.ZipFile | None:
    return open_zip(path, head, lambda names: any(
        n.endswith(("/archive_format", "models/model.json", "serialized_exported_program.json")) for n in names))


def _err(path: Path, what: Any) -> ViewerError:
    return ViewerError(f"{path.name!r} is not a readable {_FMT} archive: {what}.")


def _json(z: zipfile.ZipFile, name: str) -> Any:
    info = z.getinfo(name)
    if info.file_size > _MAX_JSON:
        raise ValueError(f"{name} claims {info.file_size} bytes")
    return json.loads(z.read(name).decode("utf-8"))


def read(path: Path, handle: Any = None) -> ViewModel:
    try:
        with reuse_zip(path, handle) as z:
            members = _members(z)
            if not members:
                raise _err(path, "it holds no serialized ExportedProgram (models/*.json)")
            doc = _json(z, members[0])
            prefix = members[0].rsplit("models/", 1)[0] if "models/" in members[0] else members[0].rsplit("/", 1)[0] + "/"
            names = set(z.namelist())
            wcfg = _config(z, names, prefix + "data/weights/model_weights_config.json")
            ccfg = _config(z, names, prefix + "data/constants/model_constants_config.json")
        graph = _graph(path, doc, wcfg, ccfg, prefix)
    except ViewerError:
        raise
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
            ValueError, AttributeError, IndexError, EOFError) as exc:
        raise _err(path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'damaged'}") from None
    schema = doc.get("schema_version") or {}
    return ViewModel(format=_FMT, path=str(path), producer=f"torch {doc.get('torch_version')}" if doc.get(
        "torch_version") else "torch.export", version=f"schema {schema.get('major')}.{schema.get('minor')}"
        if schema else None, properties={"opset": doc.get("opset_version")}, graphs=[graph],
        file_size=path.stat().st_size)


def _config(z: zipfile.ZipFile, names: set[str], name: str) -> dict:
    if name not in names:
        return {}
    return (_json(z, name) or {}).get("config", {})


def _dims(meta: dict) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in meta.get("sizes", []):
        if "as_int" in d:
            out.append(int(d["as_int"]))
        else:
            expr = d.get("as_expr", {})
            out.append(str(expr.get("expr_str", "?")) if isinstance(expr, dict) else "?")
    return out


def _loader(path: Path, member: str, dtype: str, meta: dict):
    shape = _dims(meta)
    strides = [int(s.get("as_int", 0)) for s in meta.get("strides", [])]
    offset = int((meta.get("storage_offset") or {}).get("as_int", 0))

    def load() -> np.ndarray:
        with zipfile.ZipFile(path) as z:
            raw = z.read(member)
        flat = np.frombuffer(raw, dtype=_NUMPY[dtype])
        if dtype == "bfloat16":
            flat = (flat.astype(np.uint32) << 16).view(np.float32)
        if any(not isinstance(d, int) for d in shape):
            return flat
        return strided(flat, shape, strides, offset, f"{_FMT}: weight {member!r}")
    return load


def _arg_tensors(arg: dict) -> list[str] | None:
    if "as_tensor" in arg:
        return [arg["as_tensor"]["name"]]
    if "as_tensors" in arg:
        return [t["name"] for t in arg["as_tensors"]]
    if "as_optional_tensors" in arg:
        return [t["as_tensor"]["name"] for t in arg["as_optional_tensors"] if "as_tensor" in t]
    if "as_optional_tensor" in arg and "as_tensor" in (arg["as_optional_tensor"] or {}):
        return [arg["as_optional_tensor"]["as_tensor"]["name"]]
    return None


def _arg_value(arg: dict) -> Any:
    for k, v in arg.items():
        if k == "as_none":
            return None
        if k in ("as_sym_int", "as_sym_float", "as_sym_bool") and isinstance(v, dict):
            return v.get("as_name") or v.get("as_int") or v.get("as_float") or v.get("as_bool")
        if k == "as_scalar_type":
            return _DTYPES.get(v, v)
        return v
    return None


def _op_type(target: str) -> str:
    parts = target.split(".")
    if target.startswith("torch.ops.") and len(parts) >= 4:
        return f"{parts[2]}::{parts[3]}"   # torch.ops.aten.conv2d.default -> aten::conv2d
    return parts[-1] if target.startswith("_operator.") else target


def _group(meta: dict) -> tuple[str, ...]:
    stack = meta.get("nn_module_stack") or ""
    if not isinstance(stack, str) or not stack:
        return ()
    last = stack.split(";")[-1].split(",")
    path = last[1] if len(last) > 1 else ""
    return tuple(p for p in path.split(".") if p)


def _graph(path: Path, doc: dict, wcfg: dict, ccfg: dict, prefix: str) -> Any:
    gm = doc["graph_module"]
    g = gm["graph"]
    b = GraphBuilder(path.stem)
    values = g.get("tensor_values", {})
    for name, meta in values.items():
        b.tensor(name, _dims(meta), _DTYPES.get(meta.get("dtype"), None))
    inputs = []
    for spec in gm.get("signature", {}).get("input_specs", []):
        kind, body = next(iter(spec.items()))
        arg = body.get("arg", {})
        tname = arg.get("name") or (arg.get("as_tensor") or {}).get("name")
        if tname is None:
            continue
        target = body.get("parameter_name") or body.get("buffer_name") or body.get("tensor_constant_name")
        cfg, folder = (wcfg, "weights") if kind in ("parameter", "buffer") else (ccfg, "constants")
        if kind == "user_input" or target is None:
            inputs.append(tname)
            continue
        meta = values.get(tname, {})
        dtype = _DTYPES.get(meta.get("dtype"), "float32")
        entry = cfg.get(target)
        load = None
        if entry and not entry.get("use_pickle", False) and dtype in _NUMPY:
            load = _loader(path, f"{prefix}data/{folder}/{entry['path_name']}", dtype, entry.get("tensor_meta", meta))
        shape = [d if isinstance(d, int) else 0 for d in _dims(meta)]
        b.weight(tname, shape, dtype, load)
        b.graph.weights[tname].name = target
    for i, node in enumerate(g.get("nodes", [])):
        op_type = _op_type(str(node.get("target", "op")))
        ins: list[tuple[str, list[str]]] = []
        attrs: dict[str, Any] = {}
        for inp in node.get("inputs", []):
            arg = inp.get("arg", {})
            tensors = _arg_tensors(arg)
            if tensors is not None:
                ins.append((inp.get("name", "input"), tensors))
            else:
                attrs[inp.get("name", "arg")] = _arg_value(arg)
        outs = []
        for k, out in enumerate(node.get("outputs", [])):
            tensors = _arg_tensors(out)
            if tensors:
                outs.append(("output" if k == 0 else f"output{k}", tensors))
        b.node(str(node.get("name") or f"{op_type}_{i}"), op_type, ins, outs, attrs,
               group=_group(node.get("metadata") or {}))
    outputs = []
    for o in g.get("outputs", []):
        outputs.extend(_arg_tensors(o) or [])
    return b.finish(inputs=inputs, outputs=outputs)
