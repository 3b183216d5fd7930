"""Helpers the format readers share: graph assembly, categories, lazy weights.

Kept free of format libraries so any reader may import it cheaply.
"""
from __future__ import annotations

import mmap
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from kiln.errors import ViewerError
from kiln.paths import PathEscapeError, resolve_inside
from kiln.viewer.graph import ViewArgument, ViewGraph, ViewNode, ViewTensor, ViewWeight

# Exact op names first (normalised: lower case, no '_' or '-'), then substrings in order.
_EXACT = {
    "add": "elementwise", "sub": "elementwise", "mul": "elementwise", "div": "elementwise",
    "sum": "elementwise", "addv2": "elementwise", "biasadd": "elementwise", "eltwise": "elementwise",
    "maximum": "elementwise", "minimum": "elementwise", "pow": "elementwise", "power": "elementwise",
    "sqrt": "elementwise", "rsqrt": "elementwise", "exp": "elementwise", "log": "elementwise",
    "abs": "elementwise", "neg": "elementwise", "square": "elementwise", "floor": "elementwise",
    "ceil": "elementwise", "round": "elementwise", "multiply": "elementwise", "subtract": "elementwise",
    "average": "elementwise", "maximumminimum": "elementwise", "addn": "elementwise", "scale": "elementwise",
    "bias": "elementwise", "squareddifference": "elementwise", "realdiv": "elementwise",
    "input": "data", "inputlayer": "data", "placeholder": "data", "const": "data", "data": "data",
    "variable": "data", "variablev2": "data", "varhandleop": "data", "readvariableop": "data",
    "giventensorfill": "data", "constantfill": "data", "null": "data", "parameter": "data",
    "identity": "other", "dropout": "other", "noop": "control", "split": "shape", "concat": "shape",
    "mean": "reduce", "argmax": "reduce", "argmin": "reduce", "topk": "reduce", "topkv2": "reduce",
    "fc": "matmul", "dense": "matmul", "linear": "matmul", "gemm": "matmul", "embedding": "matmul",
    "softmax": "activation", "logsoftmax": "activation", "activation": "activation",
    "if": "control", "while": "control", "switch": "control", "merge": "control", "call": "control",
    "enter": "control", "exit": "control", "nextiteration": "control", "loopcond": "control",
}
_SUBSTRINGS: list[tuple[str, tuple[str, ...]]] = [
    ("quantization", ("dequantize", "quantize", "fakequant")),
    ("attention", ("attention",)),
    ("recurrent", ("lstm", "gru", "rnn", "recurrent")),
    ("normalization", ("batchnorm", "layernorm", "normaliz", "instancenorm", "groupnorm", "lrn", "l2norm",
                       "mvn", "localresponse", "rmsnorm")),
    ("pooling", ("pool",)),
    ("conv", ("conv", "deconv")),
    ("matmul", ("matmul", "innerproduct", "fullyconnected", "einsum", "dense", "embedding")),
    ("activation", ("relu", "sigmoid", "tanh", "gelu", "elu", "swish", "silu", "softplus", "softsign",
                    "logistic", "hardswish", "mish", "clip", "threshold", "softmax", "prelu", "bnll")),
    ("shape", ("reshape", "flatten", "transpose", "squeeze", "permute", "expanddims", "shape", "concat",
               "split", "slice", "pad", "gather", "tile", "pack", "stack", "crop", "resize", "upsampl",
               "broadcast", "repeat", "spacetodepth", "depthtospace", "spacetobatch", "batchtospace",
               "cropping", "zeropadding", "mirrorpad", "cast", "fill", "range", "where", "onehot")),
    ("reduce", ("reduce", "mean", "argmax", "argmin", "globalaverage", "globalmax")),
    ("elementwise", ("add", "sub", "mul", "div", "maximum", "minimum", "floor", "equal", "greater",
                     "less", "logical", "select")),
    ("data", ("const", "placeholder", "variable", "input")),
    ("control", ("while", "loop", "cond")),
]


def category(op_type: str) -> str:
    """Guess a node category from its op type, the same way for every format."""
    key = re.sub(r"[_\-\s]", "", op_type.lower().rsplit("::", 1)[-1])   # aten::conv2d -> conv2d
    key = re.sub(r"(\d+d)$", "", key) if key.endswith(("1d", "2d", "3d")) else key
    if key in _EXACT:
        return _EXACT[key]
    for cat, words in _SUBSTRINGS:
        if any(w in key for w in words):
            return cat
    return "other"


def dims(shape: Iterable[Any] | None) -> list[int | str | None] | None:
    """Normalise a shape: ints stay ints, unknown (-1/None) becomes None, names stay str."""
    if shape is None:
        return None
    out: list[int | str | None] = []
    for d in shape:
        if d is None or (isinstance(d, (int, np.integer)) and d < 0):
            out.append(None)
        elif isinstance(d, (int, np.integer)):
            out.append(int(d))
        else:
            out.append(str(d))
    return out


def count(shape: Sequence[Any] | None) -> int | None:
    """Element count of a fully known shape, else None."""
    if shape is None:
        return None
    n = 1
    for d in shape:
        if not isinstance(d, (int, np.integer)) or d < 0:
            return None
        n *= int(d)
    return n


class GraphBuilder:
    """Collects nodes, tensors and weights; finds graph inputs/outputs when the format does not say."""

    def __init__(self, name: str) -> None:
        self.graph = ViewGraph(name=name)
        self._ids: set[str] = set()

    def tensor(self, name: str, shape: Any = None, dtype: str | None = None,
               quantization: dict[str, Any] | None = None, doc: str | None = None) -> str:
        t = self.graph.tensors.get(name)
        if t is None:
            t = self.graph.tensors[name] = ViewTensor(name=name)
        if shape is not None:
            t.shape = dims(shape)
        if dtype is not None:
            t.dtype = dtype
        if quantization:
            t.quantization = quantization
        if doc:
            t.doc = doc
        return name

    def weight(self, name: str, shape: Any, dtype: str | None, load: Callable[[], Any] | None = None,
               nbytes: int | None = None) -> str:
        shp = [int(d) for d in shape] if shape is not None else None
        self.graph.weights[name] = ViewWeight(name=name, shape=shp, dtype=dtype, load=guarded(load, name),
                                              nbytes=nbytes)
        self.tensor(name, shp, dtype)
        return name

    def node(self, name: str, op_type: str, inputs: Sequence[tuple[str, Sequence[str]]] = (),
             outputs: Sequence[tuple[str, Sequence[str]]] = (), attributes: dict[str, Any] | None = None,
             group: Sequence[str] = (), category_: str | None = None, doc: str | None = None) -> ViewNode:
        nid = name or op_type
        base, k = nid, 1
        while nid in self._ids:
            k += 1
            nid = f"{base}:{k}"
        self._ids.add(nid)
        for _, values in list(inputs) + list(outputs):
            for v in values:
                self.tensor(v)
        node = ViewNode(
            id=nid, name=name, op_type=op_type, category=category_ or category(op_type),
            attributes=dict(attributes or {}),
            inputs=[ViewArgument(a, list(v)) for a, v in inputs],
            outputs=[ViewArgument(a, list(v)) for a, v in outputs],
            group=tuple(group), doc=doc,
        )
        self.graph.nodes.append(node)
        return node

    def finish(self, inputs: Sequence[str] | None = None, outputs: Sequence[str] | None = None) -> ViewGraph:
        g = self.graph
        produced = {v for n in g.nodes for a in n.outputs for v in a.values}
        consumed = {v for n in g.nodes for a in n.inputs for v in a.values}
        if inputs is None:
            inputs = [v for v in _ordered(n.inputs for n in g.nodes) if v not in produced and v not in g.weights]
        if outputs is None:
            outputs = [v for v in _ordered(n.outputs for n in g.nodes) if v not in consumed]
        g.inputs = [g.tensors.get(v) or ViewTensor(v) for v in inputs]
        g.outputs = [g.tensors.get(v) or ViewTensor(v) for v in outputs]
        for t in g.inputs + g.outputs:
            g.tensors.setdefault(t.name, t)
        return g


def guarded(load: Callable[[], Any] | None, name: str) -> Callable[[], Any] | None:
    """A loader whose failures (damaged bytes, odd dtypes) surface as one ViewerError line."""
    if load is None:
        return None

    def run() -> Any:
        try:
            return load()
        except ViewerError:
            raise
        except Exception as exc:   # noqa: BLE001 - any reader bug or bad byte becomes a clear message
            raise ViewerError(f"The values of weight {name!r} cannot be read: {exc}.") from None
    return run


def refused(reason: str) -> Callable[[], Any]:
    """A loader for a weight whose values are not read (its file lies outside the model's folder)."""
    def load() -> Any:
        raise ViewerError(reason)
    return load


def inside(folder: Path, name: str, what: str, warnings: list[str]) -> Path | None:
    """``folder / name`` with links resolved, when it is a file inside ``folder``; else None.

    A link that leads out of the folder is not followed: the reason goes to ``warnings``
    (shown by the page and ``kiln view``) and the caller carries on without that file.
    """
    try:
        p = resolve_inside(folder, name, what)
    except PathEscapeError as exc:
        warnings.append(f"{exc} It is not read.")
        return None
    return p if p.is_file() else None


def _ordered(arg_lists: Iterable[list[ViewArgument]]) -> list[str]:
    seen: dict[str, None] = {}
    for args in arg_lists:
        for a in args:
            for v in a.values:
                seen.setdefault(v, None)
    return list(seen)


def open_zip(path: Path, head: bytes, wanted: Callable[[list[str]], bool]) -> zipfile.ZipFile | None:
    """The archive, left open as a sniff handle, when it is a zip whose member names ``wanted`` accepts."""
    if not head.startswith(b"PK\x03\x04"):
        return None
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    infos = z.infolist()   # a cut-off archive can show a zip stored inside it: its members do not start at byte 0
    if infos and min(i.header_offset for i in infos) == 0 and wanted(z.namelist()):
        return z
    z.close()
    return None


def reuse_zip(path: Path, handle: Any) -> zipfile.ZipFile:
    """The archive a sniff left open, or the file opened now (a reader called without a handle)."""
    return handle if isinstance(handle, zipfile.ZipFile) else zipfile.ZipFile(path)


def file_bytes(path: Path) -> bytes | mmap.mmap:
    """The whole file, memory-mapped when large so nothing is copied up front."""
    size = path.stat().st_size
    if size < (64 << 20):
        return path.read_bytes()
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def file_array(path: Path, offset: int, dtype: Any, shape: Sequence[int], fmt: str) -> Callable[[], np.ndarray]:
    """A lazy loader for a tensor stored raw at ``offset``; bounds are checked now, bytes read later."""
    dt = np.dtype(dtype)
    n = count(shape)
    if n is None:
        raise ViewerError(f"{fmt}: tensor shape {list(shape)} is not fully known.")
    size = os.path.getsize(path)
    if offset < 0 or offset + n * dt.itemsize > size:
        raise ViewerError(f"{fmt}: a tensor at byte {offset} ({n * dt.itemsize} bytes) lies past the end of "
                          f"{path.name!r} ({size} bytes); the file is truncated.")

    def load() -> np.ndarray:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(n * dt.itemsize)
        return np.frombuffer(data, dtype=dt).reshape(tuple(shape))
    return load


def strided(flat: np.ndarray, shape: Sequence[int], strides: Sequence[int] | None, offset: int,
            what: str) -> np.ndarray:
    """A tensor viewed out of its flat storage (element strides and offset), copied; bounds checked first."""
    shape = [int(d) for d in shape]
    n = count(shape)
    if n is None:
        return flat
    if n == 0:
        return flat[:0].reshape(shape)
    strides = [int(s) for s in strides] if strides is not None and len(strides) == len(shape) else None
    top = offset + (sum((d - 1) * s for d, s in zip(shape, strides)) if strides else n - 1)
    if offset < 0 or min(strides or [0]) < 0 or top >= flat.size:
        raise ViewerError(f"{what} holds {flat.size} values, too few for shape {shape}.")
    if strides is None:
        return flat[offset:offset + n].reshape(shape)
    item = flat.itemsize
    return np.lib.stride_tricks.as_strided(flat[offset:], shape=shape, strides=[s * item for s in strides],
                                           writeable=False).copy()


def buffer_array(buf: Any, dtype: Any, shape: Sequence[int] | None, fmt: str) -> Callable[[], np.ndarray]:
    """A lazy loader over bytes already in memory (or a memoryview/mmap slice)."""
    dt = np.dtype(dtype)

    def load() -> np.ndarray:
        arr = np.frombuffer(buf, dtype=dt)
        n = count(shape) if shape is not None else None
        if n is not None and n == arr.size:
            return arr.reshape(tuple(shape))
        if shape is not None and n is not None and arr.size != n:
            raise ViewerError(f"{fmt}: tensor holds {arr.size} values but its shape {list(shape)} needs {n}.")
        return arr
    return load


def check_count(n: int, limit: int, what: str, fmt: str) -> int:
    """Refuse element counts a file could not possibly hold (guards allocations)."""
    if n < 0 or n > limit:
        raise ViewerError(f"{fmt}: {what} count {n} is impossible for a file of this size; the file is damaged.")
    return n


def weights_graph(name: str, entries: Iterable[tuple[str, list[int], str, Callable[[], Any] | None, int | None]],
                  sep: str = ".") -> ViewGraph:
    """A graph for weight-only files: one node per module (name prefix), its tensors as weights.

    Grouping by prefix keeps a 1,000-tensor checkpoint browsable by layer.
    """
    b = GraphBuilder(name)
    modules: dict[str, list[tuple[str, str]]] = {}
    for tname, shape, dtype, load, nbytes in entries:
        b.weight(tname, shape, dtype, load, nbytes)
        prefix, _, leaf = tname.rpartition(sep)
        modules.setdefault(prefix, []).append((leaf or tname, tname))
    for prefix, items in modules.items():
        parts = prefix.split(sep) if prefix else []
        b.node(prefix or name, "Weights", inputs=[(leaf, [t]) for leaf, t in items],
               group=tuple(parts[:-1]), category_="data")
    g = b.finish(inputs=[], outputs=[])
    return g


# numpy dtypes by the short names many weight formats use; bfloat16 and fp8 load as raw integers.
NUMPY_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?", "BF16": "<u2",
    "F8_E4M3": "u1", "F8_E5M2": "u1",
}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen bfloat16 stored as uint16 to float32 (exact), so numpy can show it."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class BlobVersions:
    """Names for blobs that layers overwrite in place (Caffe ReLU, Caffe2 in-place ops).

    Writing a blob that already exists makes a new version ``name:1``, ``name:2``…
    so an in-place layer sits *between* its producer and later consumers
    instead of beside them.
    """

    def __init__(self) -> None:
        self.current: dict[str, str] = {}
        self.count: dict[str, int] = {}

    def read(self, name: str) -> str:
        return self.current.get(name, name)

    def write(self, name: str) -> str:
        if name not in self.current:
            self.current[name] = name
            self.count[name] = 0
            return name
        self.count[name] += 1
        self.current[name] = f"{name}:{self.count[name]}"
        return self.current[name]
