"""TorchScript archives (``torch.jit.save``: ``.pt``, ``.jit``) and ``torch.save`` checkpoints, read as data.

Nothing in the archive is executed.  ``data.pkl`` and ``constants.pkl`` are
replayed by ``_pickle`` into inert objects: modules are the classes they name,
tensors are ``_rebuild_tensor_v2`` records pointing at raw storages under
``data/`` and ``constants/``, read on demand.  The graph comes from the
serialized TorchScript source under ``code/``, parsed with :mod:`ast` (parsing
only) and walked: each call becomes a node, each submodule's ``forward`` is
inlined under its module path as a group, and ``self.<param>`` reads become the
module's weights.  Branches and loop bodies are walked once, in order.  A
checkpoint without code (a zip, or the older sequence of pickles followed by
raw storages) shows its tensors grouped by key.
"""
from __future__ import annotations

import ast
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ViewerError
from kiln.viewer.formats import _pickle
from kiln.viewer.formats._common import GraphBuilder, open_zip, reuse_zip, strided, weights_graph
from kiln.viewer.graph import ViewModel

_FMT = "TorchScript"
_STORAGES = {"FloatStorage": ("float32", "f4"), "DoubleStorage": ("float64", "f8"), "HalfStorage": ("float16", "f2"),
             "BFloat16Storage": ("bfloat16", "u2"), "LongStorage": ("int64", "i8"), "IntStorage": ("int32", "i4"),
             "ShortStorage": ("int16", "i2"), "CharStorage": ("int8", "i1"), "ByteStorage": ("uint8", "u1"),
             "BoolStorage": ("bool", "?"), "ComplexFloatStorage": ("complex64", "c8"),
             "ComplexDoubleStorage": ("complex128", "c16")}
_REBUILD = ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor")
_PARAMETER = ("torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C      # torch.serialization's magic number, the first pickle of the file
_LEGACY_HEAD = b"\x80\x02\x8a\x0a"            # protocol 2, then that number as a 10-byte LONG1
_MAX_PICKLE = 256 << 20
_MAX_SOURCE = 16 << 20
_MAX_INLINE = 48            # submodule forwards inlined inside one another at most this deep
_MAX_NODES = 200_000


def sniff(path: Path, head: bytes) -> zipfile.ZipFile | str | None:
    """The open archive (TorchScript or a zip checkpoint), or "legacy" for a pre-zip ``torch.save`` file."""
    if head.startswith(_LEGACY_HEAD) and int.from_bytes(head[4:14], "little") == _LEGACY_MAGIC:
        return "legacy"
    return open_zip(path, head, lambda names: any(n == "data.pkl" or n.endswith("/data.pkl") for n in names)
                    and not any(n.endswith(("/archive_format", "serialized_exported_program.json")) for n in names))


def _err(path: Path, what: Any) -> ViewerError:
    return ViewerError(f"{path.name!r} is not a readable {_FMT} archive: {what}.")


def read(path: Path, handle: Any = None) -> ViewModel:
    if handle is None:
        with open(path, "rb") as f:
            handle = sniff(path, f.read(64))
    try:
        return _read_legacy(path) if handle == "legacy" else _read_archive(path, handle)
    except ViewerError:
        raise
    except _pickle.PickleError as exc:
        raise _err(path, exc) from None
    except (zipfile.BadZipFile, OSError, KeyError, ValueError, TypeError, AttributeError, IndexError, EOFError,
            RecursionError, MemoryError, SyntaxError) as exc:
        raise _err(path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'damaged'}") from None


def _read_archive(path: Path, handle: Any) -> ViewModel:
    with reuse_zip(path, handle) as z:
        archive = _Archive(path, z)
        root = archive.pickle("data.pkl")
        if archive.has_code:
            constants = archive.pickle("constants.pkl") if archive.has("constants.pkl") else ()
            graph = _Walker(archive, constants if isinstance(constants, tuple) else ()).graph(root)
            content = "TorchScript module"
        else:
            graph = _checkpoint(path, archive, root)
            content = "checkpoint (tensors only)"
        version = archive.text("version")
    cls = root.func.qualname if isinstance(root, _pickle.Call) and isinstance(root.func, _pickle.Global) else None
    props = {"content": content, **({"module": cls.removeprefix("__torch__.")} if cls and archive.has_code else {})}
    return ViewModel(format=_FMT, path=str(path), producer="torch", version=f"archive {version}" if version else None,
                     properties=props, graphs=[graph], file_size=path.stat().st_size)


def _read_legacy(path: Path) -> ViewModel:
    legacy = _Legacy(path)
    return ViewModel(format=_FMT, path=str(path), producer="torch", version="legacy torch.save",
                     properties={"content": "checkpoint (tensors only)"},
                     graphs=[_checkpoint(path, legacy, legacy.root)], file_size=path.stat().st_size)


def _checkpoint(path: Path, storages: "_Storages", root: Any) -> Any:
    graph = weights_graph(path.stem, storages.tensors(root), sep=".")
    if not graph.weights:
        raise _err(path, "it holds neither TorchScript code nor tensors")
    return graph


class _Storages:
    """Tensors rebuilt from ``_rebuild_tensor_v2`` records; subclasses say where storages' bytes are."""

    path: Path
    endian = "<"

    def tensor(self, obj: Any, folder: str) -> tuple[list[int], str, Any] | None:
        """(shape, dtype, loader) of a rebuilt tensor record, or None when ``obj`` is not one."""
        if isinstance(obj, _pickle.Call) and obj.named(*_PARAMETER) and isinstance(obj.args, tuple) and obj.args:
            obj = obj.args[0]
        if not (isinstance(obj, _pickle.Call) and obj.named(*_REBUILD) and isinstance(obj.args, tuple)
                and len(obj.args) >= 4 and isinstance(obj.args[0], _pickle.Persistent)):
            return None
        pid, offset, size, stride = obj.args[0].pid, obj.args[1], obj.args[2], obj.args[3]
        if not (isinstance(pid, tuple) and len(pid) >= 3 and isinstance(pid[1], _pickle.Global)):
            return None
        dtype, np_dtype = _STORAGES.get(pid[1].name, (None, None))
        shape = [int(d) for d in size] if isinstance(size, (tuple, list)) else []
        if dtype is None:
            return shape, pid[1].name, None
        raw = self.storage(folder, str(pid[2]))
        strides = [int(s) for s in stride] if isinstance(stride, (tuple, list)) else None
        what = f"{_FMT}: tensor storage {folder}/{pid[2]!s}"
        np_dtype = self.endian + np_dtype

        def load() -> np.ndarray:
            arr = strided(np.frombuffer(raw(), dtype=np_dtype), shape, strides, int(offset), what)
            return (arr.astype(np.uint32) << 16).view(np.float32) if dtype == "bfloat16" else arr
        return shape, dtype, load

    def tensors(self, root: Any) -> list[tuple[str, list[int], str, Any, None]]:
        """Every tensor reachable from ``root`` (dicts, lists, module states), named by its key path."""
        out: list[tuple[str, list[int], str, Any, None]] = []
        seen: set[int] = set()

        def walk(obj: Any, key: str, depth: int) -> None:
            if depth > 64 or id(obj) in seen:
                return
            seen.add(id(obj))
            t = self.tensor(obj, "data")
            if t is not None:
                out.append((key or "tensor", t[0], t[1], t[2], None))
            elif isinstance(obj, dict):
                for k, v in obj.items():
                    walk(v, f"{key}.{k}" if key else str(k), depth + 1)
            elif isinstance(obj, (list, tuple)):
                for i, v in enumerate(obj):
                    walk(v, f"{key}.{i}" if key else str(i), depth + 1)
            elif isinstance(obj, _pickle.Call):
                walk(obj.state if obj.state is not None else obj.args, key, depth + 1)
        walk(root, "", 0)
        return out

    def storage(self, folder: str, key: str) -> Any:
        raise NotImplementedError


class _Archive(_Storages):
    """Members of a zip archive (TorchScript or ``torch.save``) under its one top folder."""

    def __init__(self, path: Path, z: zipfile.ZipFile) -> None:
        self.path, self.z = path, z
        names = z.namelist()
        pkl = next(n for n in names if n == "data.pkl" or n.endswith("/data.pkl"))
        self.prefix = pkl[:-len("data.pkl")]
        self.names = set(names)
        self.has_code = any(n.startswith(self.prefix + "code/") and n.endswith(".py") for n in names)
        order = self.text("byteorder")
        self.endian = ">" if order == "big" else "<"

    def has(self, name: str) -> bool:
        return self.prefix + name in self.names

    def read(self, name: str, limit: int) -> bytes:
        info = self.z.getinfo(self.prefix + name)
        if info.file_size > limit:
            raise ValueError(f"{name} claims {info.file_size} bytes")
        return self.z.read(info)

    def text(self, name: str) -> str | None:
        return self.read(name, 4096).decode("utf-8", "replace").strip() if self.has(name) else None

    def pickle(self, name: str) -> Any:
        return _pickle.loads(self.read(name, _MAX_PICKLE))

    def source(self, module: str) -> str | None:
        """The code file of a ``__torch__.a.b`` module (``code/__torch__/a/b.py``)."""
        parts = module.split(".")
        if not parts or any(not p.isidentifier() for p in parts):
            return None
        name = "code/" + "/".join(parts) + ".py"
        return self.read(name, _MAX_SOURCE).decode("utf-8", "replace") if self.has(name) else None

    def storage(self, folder: str, key: str) -> Any:
        """A reader of one storage's bytes (the member ``folder/key``), checked to exist now."""
        member = f"{folder}/{key}"
        if not key.isalnum() or not self.has(member):
            raise ValueError(f"the storage {member} of a tensor is missing")
        path, name = self.path, self.prefix + member

        def raw() -> bytes:
            with zipfile.ZipFile(path) as z:
                return z.read(name)
        return raw


class _Legacy(_Storages):
    """A ``torch.save`` file from before the zip format: pickles for the magic number, protocol, system
    info, the object and its storage keys, then each storage as an 8-byte element count and its bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            size = path.stat().st_size
            magic, protocol = _pickle.load(f), _pickle.load(f)
            if magic != _LEGACY_MAGIC or not isinstance(protocol, int):
                raise ValueError("its header is not a torch.save header")
            info = _pickle.load(f)
            if isinstance(info, dict) and info.get("little_endian") is False:
                self.endian = ">"
            self.root = _pickle.load(f)
            keys = _pickle.load(f)
            if not isinstance(keys, list):
                raise ValueError("its storage list is damaged")
            itemsize = {str(p[2]): np.dtype(_STORAGES[p[1].name][1]).itemsize for p in _persistent_ids(self.root)
                        if len(p) >= 3 and isinstance(p[1], _pickle.Global) and p[1].name in _STORAGES}
            self.offsets: dict[str, tuple[int, int]] = {}
            pos = f.tell()
            for key in map(str, keys):
                if key not in itemsize or pos + 8 > size:
                    break                       # later storages' places are unknown: their tensors show no values
                f.seek(pos)
                nbytes = int.from_bytes(f.read(8), "little" if self.endian == "<" else "big") * itemsize[key]
                if pos + 8 + nbytes > size:
                    raise ValueError(f"storage {key} runs past the end of the file; it is truncated")
                self.offsets[key] = (pos + 8, nbytes)
                pos += 8 + nbytes

    def storage(self, folder: str, key: str) -> Any:
        if key not in self.offsets:
            raise ValueError(f"the storage {key} of a tensor is missing")
        start, nbytes = self.offsets[key]
        path = self.path

        def raw() -> bytes:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(nbytes)
        return raw


def _persistent_ids(root: Any) -> list[tuple]:
    """Every persistent id (storage reference) reachable from ``root``."""
    out: list[tuple] = []
    seen: set[int] = set()
    todo = [(root, 0)]
    while todo:
        obj, depth = todo.pop()
        if id(obj) in seen or depth > 64:
            continue
        seen.add(id(obj))
        if isinstance(obj, _pickle.Persistent) and isinstance(obj.pid, tuple):
            out.append(obj.pid)
        elif isinstance(obj, dict):
            todo.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, (list, tuple)):
            todo.extend((v, depth + 1) for v in obj)
        elif isinstance(obj, _pickle.Call):
            todo.extend([(obj.args, depth + 1), (obj.state, depth + 1)])
    return out


class _Value:
    """What a name holds while the code is walked."""

    def __init__(self, kind: str, data: Any = None, path: tuple[str, ...] = ()) -> None:
        self.kind, self.data, self.path = kind, data, path   # kind: tensor, weight, module, const, items, func


class _Walker:
    """Walks ``forward`` of the root module, inlining submodules, into one graph."""

    def __init__(self, archive: _Archive, constants: tuple) -> None:
        self.archive, self.constants = archive, constants
        self.b = GraphBuilder("module")
        self.classes: dict[str, ast.ClassDef | None] = {}
        self.names: dict[str, int] = {}
        self.weights: dict[int, str] = {}

    def graph(self, root: Any) -> Any:
        module = _Value("module", root)
        cls = self._class(root)
        self.b.graph.name = cls.name if cls is not None else "module"
        fn = self._method(root, "forward")
        if fn is None:
            raise ValueError("the root module has no forward method in the archive's code")
        inputs = [self._fresh(a.arg, ()) for a in fn.args.args[1:]]
        for name in inputs:
            self.b.tensor(name)
        outs = self._call_method(module, fn, [_Value("tensor", n) for n in inputs], 0)
        outputs = [v for o in outs for v in self._tensors(o)]
        return self.b.finish(inputs=inputs, outputs=outputs)

    # --- classes and modules -------------------------------------------------------------------------------------
    def _class(self, obj: Any) -> ast.ClassDef | None:
        if not (isinstance(obj, _pickle.Call) and isinstance(obj.func, _pickle.Global)):
            return None
        key = obj.func.qualname
        if key not in self.classes:
            self.classes[key] = None
            source = self.archive.source(obj.func.module)
            if source is not None:
                tree = ast.parse(source, filename=obj.func.module)
                self.classes[key] = next((c for c in tree.body if isinstance(c, ast.ClassDef)
                                          and c.name == obj.func.name), None)
        return self.classes[key]

    def _method(self, obj: Any, name: str) -> ast.FunctionDef | None:
        cls = self._class(obj)
        if cls is None:
            return None
        return next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == name), None)

    def _attribute(self, module: _Value, attr: str) -> _Value:
        obj = module.data
        state = obj.state if isinstance(obj, _pickle.Call) and isinstance(obj.state, dict) else {}
        if attr not in state:
            return _Value("const", f"self.{attr}")
        value = state[attr]
        path = (*module.path, attr)
        if self.archive.tensor(value, "data") is not None:
            return _Value("weight", self._weight(value, ".".join(path), "data"))
        if isinstance(value, _pickle.Call):
            return _Value("module", value, path)
        return _Value("const", value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)[:64])

    def _weight(self, obj: Any, name: str, folder: str) -> str:
        if id(obj) not in self.weights:
            shape, dtype, load = self.archive.tensor(obj, folder)
            self.weights[id(obj)] = self.b.weight(self._unique(name), shape, dtype, load)
        return self.weights[id(obj)]

    # --- names -----------------------------------------------------------------------------------------------------
    def _unique(self, name: str) -> str:
        k = self.names.get(name, 0)
        self.names[name] = k + 1
        return name if k == 0 else f"{name}:{k}"

    def _fresh(self, var: str, path: tuple[str, ...]) -> str:
        return self._unique("/".join((*path, var)))

    @staticmethod
    def _tensors(v: _Value | None) -> list[str]:
        if v is None:
            return []
        if v.kind in ("tensor", "weight"):
            return [v.data]
        if v.kind == "items":
            return [t for x in v.data for t in _Walker._tensors(x)]
        return []

    # --- statements ------------------------------------------------------------------------------------------------
    def _call_method(self, module: _Value, fn: ast.FunctionDef, args: list[_Value | None], depth: int) -> list:
        env: dict[str, _Value | None] = {"self": module}
        for a, v in zip(fn.args.args[1:], args):
            env[a.arg] = v
        returns: list = []
        self._block(fn.body, env, module.path, depth, returns)
        return returns

    def _block(self, body: list, env: dict, path: tuple[str, ...], depth: int, returns: list) -> None:
        for stmt in body:
            if len(self.b.graph.nodes) > _MAX_NODES:
                raise ValueError(f"the module's code unrolls to more than {_MAX_NODES} operations")
            if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                if stmt.value is None:
                    continue
                names = _target_names(targets[-1])
                value = self._expr(stmt.value, env, path, depth, names)
                self._bind(targets, value, env)
            elif isinstance(stmt, ast.Expr):
                self._expr(stmt.value, env, path, depth, [])
            elif isinstance(stmt, ast.Return):
                if stmt.value is not None:
                    v = self._expr(stmt.value, env, path, depth, [])
                    returns.extend(v.data if v is not None and v.kind == "items" else [v])
            elif isinstance(stmt, ast.If):
                self._expr(stmt.test, env, path, depth, [])
                self._block(stmt.body, env, path, depth, returns)
                self._block(stmt.orelse, env, path, depth, returns)
            elif isinstance(stmt, (ast.For, ast.While)):
                self._expr(stmt.iter if isinstance(stmt, ast.For) else stmt.test, env, path, depth, [])
                self._block(stmt.body, env, path, depth, [])
            elif isinstance(stmt, ast.With):
                self._block(stmt.body, env, path, depth, returns)

    def _bind(self, targets: list, value: _Value | None, env: dict) -> None:
        for t in targets:
            if isinstance(t, ast.Name):
                env[t.id] = value
            elif isinstance(t, (ast.Tuple, ast.List)):
                items = value.data if value is not None and value.kind == "items" else []
                for k, elt in enumerate(t.elts):
                    self._bind([elt], items[k] if k < len(items) else None, env)

    # --- expressions -----------------------------------------------------------------------------------------------
    def _expr(self, e: ast.AST, env: dict, path: tuple[str, ...], depth: int, names: list[str]) -> _Value | None:
        if isinstance(e, ast.Name):
            return env.get(e.id, _Value("const", e.id))
        if isinstance(e, ast.Constant):
            return _Value("const", e.value)
        if isinstance(e, ast.Attribute):
            base = e.value
            if isinstance(base, ast.Name) and base.id == "CONSTANTS" and e.attr[1:].isdigit():
                k = int(e.attr[1:])
                if k < len(self.constants) and self.archive.tensor(self.constants[k], "constants") is not None:
                    return _Value("weight", self._weight(self.constants[k], f"CONSTANTS.{e.attr}", "constants"))
                return _Value("const", f"CONSTANTS.{e.attr}")
            owner = self._expr(base, env, path, depth, [])
            if owner is not None and owner.kind == "module":
                return self._attribute(owner, e.attr)
            return _Value("func", _dotted(e))
        if isinstance(e, (ast.Tuple, ast.List)):
            return _Value("items", [self._expr(x, env, path, depth, []) for x in e.elts])
        if isinstance(e, ast.Call):
            return self._call(e, env, path, depth, names)
        if isinstance(e, (ast.BinOp, ast.BoolOp, ast.Compare, ast.UnaryOp, ast.Subscript, ast.IfExp)):
            for child in ast.iter_child_nodes(e):
                if isinstance(child, ast.expr):
                    self._expr(child, env, path, depth, [])
            return None
        return None

    def _call(self, e: ast.Call, env: dict, path: tuple[str, ...], depth: int, names: list[str]) -> _Value | None:
        func = e.func
        if isinstance(func, ast.Name) and func.id == "getattr" and len(e.args) == 2 \
                and isinstance(e.args[1], ast.Constant) and isinstance(e.args[1].value, str):
            owner = self._expr(e.args[0], env, path, depth, [])
            return self._attribute(owner, e.args[1].value) if owner is not None and owner.kind == "module" else None
        args = [self._expr(a, env, path, depth, []) for a in e.args]
        if isinstance(func, ast.Attribute):
            owner = self._expr(func.value, env, path, depth, [])
            if owner is not None and owner.kind == "module":
                return self._module_call(owner, func.attr, args, path, depth, names)
        target = self._expr(func, env, path, depth, [])
        op = _op_name(target.data if target is not None and target.kind in ("func", "const") else _dotted(func))
        keywords = {k.arg or "kwargs": self._expr(k.value, env, path, depth, []) for k in e.keywords}
        labels = [a.id if isinstance(a, ast.Name) and a.id.isidentifier() else f"input{i}" if i else "input"
                  for i, a in enumerate(e.args)]
        return self._node(op, path, list(zip(labels, args)) + list(keywords.items()), names)

    def _module_call(self, module: _Value, method: str, args: list, path: tuple[str, ...], depth: int,
                     names: list[str]) -> _Value | None:
        fn = self._method(module.data, method)
        if fn is not None and depth < _MAX_INLINE:
            outs = self._call_method(module, fn, args, depth + 1)
            if len(outs) == 1:
                return outs[0]
            return _Value("items", outs)
        name = module.data.func.name if isinstance(module.data.func, _pickle.Global) else "Module"
        op = name if method == "forward" else f"{name}.{method}"
        state = module.data.state if isinstance(module.data.state, dict) else {}   # not inlined: its own tensors
        weights = [(k, self._attribute(module, k)) for k, v in state.items() if self.archive.tensor(v, "data")]
        return self._node(op, module.path, [(f"input{i}" if i else "input", a) for i, a in enumerate(args)]
                          + weights, names)

    def _node(self, op: str, path: tuple[str, ...], args: list[tuple[str, _Value | None]],
              names: list[str]) -> _Value:
        inputs: list[tuple[str, list[str]]] = []
        attrs: dict[str, Any] = {}
        for arg, v in args:
            tensors = self._tensors(v)
            if tensors:
                inputs.append((arg, tensors))
            elif v is not None and v.kind == "const":
                attrs[arg] = v.data
            elif v is not None and v.kind == "items":
                consts = [x.data if x is not None and x.kind == "const" else None for x in v.data]
                attrs[arg] = consts
        outs = [self._fresh(n, path) for n in (names or [op.rsplit("::", 1)[-1].rsplit(".", 1)[-1]])]
        self.b.node(outs[0], op, inputs, [("output" if k == 0 else f"output{k}", [o]) for k, o in enumerate(outs)],
                    attrs, group=path)
        values = [_Value("tensor", o) for o in outs]
        return values[0] if len(values) == 1 else _Value("items", values)


def _target_names(t: ast.AST) -> list[str]:
    if isinstance(t, ast.Name):
        return [t.id]
    if isinstance(t, (ast.Tuple, ast.List)):
        return [n for x in t.elts for n in _target_names(x)]
    return []


def _dotted(e: ast.AST) -> str:
    parts: list[str] = []
    while isinstance(e, ast.Attribute):
        parts.append(e.attr)
        e = e.value
    if isinstance(e, ast.Name):
        parts.append(e.id)
    return ".".join(reversed(parts)) or "call"


def _op_name(dotted: Any) -> str:
    """``torch.conv2d`` -> ``aten::conv2d``, ``ops.prim.X`` -> ``prim::X``; script functions by their last name."""
    text = str(dotted)
    parts = text.split(".")
    if parts[0] == "torch" and len(parts) == 2:
        return f"aten::{parts[1]}"
    if parts[0] == "ops" and len(parts) >= 3:
        return f"{parts[1]}::{parts[-1]}"
    if parts[0] == "torch" and len(parts) > 2 and parts[1] in ("nn", "_C") and parts[-2] != "functional":
        return ".".join(parts[1:])
    return parts[-1] if parts[0] == "__torch__" else text
