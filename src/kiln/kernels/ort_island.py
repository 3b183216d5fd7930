"""The OrtIsland layer: ONNX nodes Kiln cannot run, run by ONNX Runtime on the CPU.

An island's ONNX model is data: serialized ModelProto bytes, the layer's first input
(a uint8 weight, stored in the engine's weights section). Before any session is made the
bytes are checked (``island_problem``): they hash to the plan's SHA-256, parse as ONNX,
import exactly the ai.onnx opset the plan names and no domain outside ``DOMAINS``, define
no functions, hold no subgraphs and no external-data references, and run exactly the ops
the plan names; ONNX Runtime then checks the graph itself. The session (CPU provider) is
made once per execution context, on its first run; inputs on a GPU are copied to the host and the
outputs copied back, so the tactic is ``dynamic`` (the runtime never captures it in a CUDA
graph). Output shapes for the builder come from ONNX Runtime's own type and shape
inference at the given input shapes; a dim it cannot fix there depends on the data and is
left unknown, as for NonZero.
"""
from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from kiln.errors import BuildError, EngineFormatError
from kiln.ir.dtypes import np_dtype
from kiln.kernels.registry import tactic

if TYPE_CHECKING:
    import torch

# NOTE: torch is imported where a tactic runs: `kiln check --fallback` reads this module's tables without it.

KIND = "OrtIsland"
# ONNX domains an island may use: the standard ones ONNX Runtime implements itself, and its contrib ops.
DOMAINS = {"": None, "ai.onnx": None, "ai.onnx.ml": (1, 5), "com.microsoft": (1, 1)}
# Types that may cross an island's boundary (engines take and return numeric tensors).
IO_TYPES = ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
            "int64", "uint64", "bool")
_ORT_TYPES = {"float": "float32", "double": "float64", "float16": "float16", "bfloat16": "bfloat16",
              "int8": "int8", "uint8": "uint8", "int16": "int16", "uint16": "uint16", "int32": "int32",
              "uint32": "uint32", "int64": "int64", "uint64": "uint64", "bool": "bool"}

# Island bytes by SHA-256 while the Network holding them is alive: shape inference runs the tactic on
# meta tensors, where the bytes input carries no data.
_LIVE: "weakref.WeakValueDictionary[str, np.ndarray]" = weakref.WeakValueDictionary()
_TYPES: "OrderedDict[tuple, tuple]" = OrderedDict()      # (sha256, input types) → output types
_TYPES_SIZE = 256


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def island_bytes(data: bytes) -> np.ndarray:
    """The uint8 array a Network stores an island as; remembered (weakly) for shape inference."""
    arr = np.frombuffer(data, dtype=np.uint8).copy()
    _LIVE[digest(data)] = arr
    return arr


def onnxruntime():
    """The onnxruntime module, or one line saying how to get it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BuildError("ONNX Runtime is not installed, and this network runs some nodes through it "
                         "(fallback='onnxruntime'); pip install onnxruntime.") from None
    return ort


def ort_dtype(type_str: str) -> str | None:
    """Kiln's name for an ONNX Runtime type string ('tensor(float)' → 'float32'); None if not a tensor we take."""
    if not (type_str.startswith("tensor(") and type_str.endswith(")")):
        return None
    return _ORT_TYPES.get(type_str[7:-1])


def session(data: bytes, optimize: bool = True):
    ort = onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    from kiln.kernels.cpu_threads import default_threads
    opts.intra_op_num_threads = default_threads()      # the CPU engine's threads, never more than the cores
    opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def output_types(data: bytes, in_shapes: list[tuple | None]) -> list[tuple[tuple | None, str]]:
    """(shape, dtype) of each island output for inputs of these shapes (None: unknown rank).

    Shapes may hold ints, names (dims that follow an input's named dim) or None (unknown);
    ONNX Runtime infers them from its op schemas (contrib ops included).
    """
    key = (digest(data), tuple(tuple(s) if s is not None else None for s in in_shapes))
    hit = _TYPES.get(key)
    if hit is None:
        hit = tuple(_infer(data, in_shapes))
        if len(_TYPES) >= _TYPES_SIZE:
            _TYPES.popitem(last=False)
        _TYPES[key] = hit
    return list(hit)


def _infer(data: bytes, in_shapes: list[tuple | None]) -> list[tuple[tuple | None, str]]:
    import onnx
    model = onnx.load_model_from_string(data)
    for vi, shape in zip(model.graph.input, in_shapes):
        tt = vi.type.tensor_type
        tt.ClearField("shape")
        if shape is not None:
            tt.shape.SetInParent()
            for d in shape:
                dim = tt.shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                elif isinstance(d, str):
                    dim.dim_param = d
    for vi in model.graph.output:
        vi.ClearField("type")
    try:
        sess = session(model.SerializeToString(), optimize=False)
    except Exception as exc:
        raise BuildError(f"ONNX Runtime refuses the island at input shapes {list(in_shapes)}: "
                         f"{_first_line(exc)}") from None
    types: list[list] = []
    for o in sess.get_outputs():
        dt = ort_dtype(o.type)
        if dt is None:
            raise BuildError(f"Island output {o.name!r} is a {o.type}; a fallback island must return tensors of "
                             f"{', '.join(IO_TYPES)}.")
        # ONNX Runtime shows an unknown shape as [], like a scalar's
        shape = tuple(d if isinstance(d, int) and d >= 0 else d if isinstance(d, str) and not d.startswith("unk__")
                      else None for d in o.shape) if o.shape else None
        types.append([shape, dt])
    static = all(s is not None and all(isinstance(d, int) for d in s) for s in in_shapes)
    if static and any(s is None for s, _ in types):
        try:        # a scalar or an output ONNX Runtime cannot shape: run on zeros and believe only a scalar
            feeds = {i.name: np.zeros(s, dtype=np_dtype(ort_dtype(i.type) or "float32"))
                     for i, s in zip(sess.get_inputs(), in_shapes)}
            for t, v in zip(types, sess.run(None, feeds)):
                if t[0] is None and np.ndim(v) == 0:
                    t[0] = ()
        except Exception:
            pass
    return [(s, d) for s, d in types]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


# ---- validation ----------------------------------------------------------------------------------

def island_problem(data: bytes, attrs: dict[str, Any], n_inputs: int, n_outputs: int) -> str | None:
    """How the island bytes break the layer's declaration (a phrase), or None."""
    import onnx
    if digest(data) != attrs.get("sha256"):
        return "does not match its SHA-256"
    try:
        model = onnx.load_model_from_string(data)
    except Exception:
        return "is not a valid ONNX model"
    if model.functions:
        return "defines ONNX functions"
    opsets: dict[str, int] = {}
    for imp in model.opset_import:
        dom = "" if imp.domain == "ai.onnx" else imp.domain
        if dom not in DOMAINS:
            return f"imports custom domain {imp.domain[:40]!r} (only ai.onnx, ai.onnx.ml and com.microsoft)"
        bounds = DOMAINS[dom]
        if bounds is not None and not bounds[0] <= imp.version <= bounds[1]:
            return f"imports {imp.domain} version {imp.version}, which ONNX Runtime does not define"
        opsets[dom] = int(imp.version)
    if opsets.get("") != attrs.get("opset"):
        return f"imports ai.onnx opset {opsets.get('')}, but the layer declares opset {attrs.get('opset')}"
    g = model.graph
    if len(g.input) != n_inputs or len(g.output) != n_outputs:
        return f"has {len(g.input)} inputs and {len(g.output)} outputs, but the layer has {n_inputs} and {n_outputs}"
    for vi in list(g.input) + list(g.output):
        if vi.type.WhichOneof("value") != "tensor_type":
            return f"passes {vi.name[:40]!r}, which is not a tensor"
    tensors = list(g.initializer) + [s.values for s in g.sparse_initializer] + [s.indices for s in g.sparse_initializer]
    ops = []
    for node in g.node:
        dom = "" if node.domain == "ai.onnx" else node.domain
        if dom not in opsets:
            return f"runs {node.op_type[:40]} from domain {node.domain[:40]!r}, which it does not import"
        ops.append(op_label(dom, node.op_type))
        for a in node.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                return f"holds a subgraph in node {node.name[:40]!r}"
            tensors += [a.t] if a.HasField("t") else []
            tensors += list(a.tensors)
            if a.HasField("sparse_tensor"):
                tensors += [a.sparse_tensor.values, a.sparse_tensor.indices]
    if any(t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) for t in tensors):
        return "references external data"
    if ops != list(attrs.get("ops") or []):
        return f"runs {ops[:8]}, but the layer declares {list(attrs.get('ops') or [])[:8]}"
    return None


def op_label(domain: str, op_type: str) -> str:
    """How a plan names an island node's op: 'MaxRoiPool', 'com.microsoft::Inverse'."""
    return op_type if domain in ("", "ai.onnx") else f"{domain}::{op_type}"


def check_island(data: bytes, attrs: dict[str, Any], name: str, n_inputs: int, n_outputs: int) -> None:
    why = island_problem(data, attrs, n_inputs, n_outputs)
    if why:
        raise EngineFormatError(f"The engine's ONNX Runtime island {name[:60]!r} {why}; the file is damaged or "
                                f"forged. Rebuild it with kiln build --fallback onnxruntime.")


def check_plan_islands(plan: dict[str, Any], weights: dict[str, Any]) -> None:
    """Validate every island of a plan (subgraph plans included) against its declaration, at load."""
    for layer, data in _plan_islands(plan, weights):
        check_island(data, layer.get("attrs") or {}, layer["name"], len(layer["inputs"]) - 1, len(layer["outputs"]))


def _plan_islands(plan: dict[str, Any], weights: dict[str, Any]) -> Iterator[tuple[dict, bytes]]:
    names = plan.get("weights", {})
    for layer in plan["layers"]:
        for v in (layer.get("attrs") or {}).values():
            if isinstance(v, dict) and "__graph__" in v:
                yield from _plan_islands(v["__graph__"], weights)
        if layer["kind"] != KIND:
            continue
        src = layer["inputs"][0] if layer["inputs"] else None
        arr = weights.get(names.get(src)) if src in names else None
        if arr is None or np.asarray(arr).dtype != np.uint8 or np.asarray(arr).ndim != 1:
            raise EngineFormatError(f"The engine's ONNX Runtime island {layer['name'][:60]!r} does not read its model "
                                    f"from a uint8 weight; the file is damaged or forged. Rebuild it with kiln build "
                                    f"--fallback onnxruntime.")
        yield layer, _as_bytes(arr)


def _as_bytes(arr: Any) -> bytes:
    if hasattr(arr, "detach"):          # a torch tensor (the weight as the runtime holds it)
        arr = arr.detach().cpu().numpy()
    return np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


# ---- the tactic ----------------------------------------------------------------------------------

@tactic(KIND, "onnxruntime", dynamic=True)
def make_island(attrs, ctx):
    import torch

    from kiln.ir.dtypes import from_numpy, to_numpy, torch_dtype
    state: dict[str, Any] = {}

    def setup(model: torch.Tensor) -> dict[str, Any]:
        data = _as_bytes(model)
        check_island(data, attrs, ctx.layer_name, len(ctx.input_dtypes) - 1, len(ctx.output_dtypes))
        try:
            sess = session(data)
        except Exception as exc:
            raise EngineFormatError(f"ONNX Runtime {onnxruntime().__version__} refuses the engine's island "
                                    f"{ctx.layer_name[:60]!r} ({_first_line(exc)}); the file is damaged, forged or "
                                    f"built with another ONNX Runtime. Rebuild it with kiln build --fallback "
                                    f"onnxruntime.") from None
        state.update(sess=sess, ins=[(i.name, ort_dtype(i.type)) for i in sess.get_inputs()],
                     outs=[o.name for o in sess.get_outputs()])
        return state

    def run(model, *xs):
        if model.is_meta:
            return _meta_outputs(attrs, xs)
        st = state or setup(model)
        feeds = {}
        for (name, dt), x in zip(st["ins"], xs):
            x = x.detach().to(torch_dtype(dt)) if dt is not None else x.detach()
            feeds[name] = to_numpy(x)
        outs = st["sess"].run(st["outs"], feeds)
        dev = next((x.device for x in xs if x is not None), model.device)
        low = _low_float(xs)
        res = []
        for o in outs:
            t = from_numpy(np.require(o, requirements="C"))      # 0-d outputs stay 0-d
            if low is not None and t.dtype == torch.float32:
                t = t.to(low)
            res.append(t.to(dev) if dev.type != "cpu" else t)
        return tuple(res)
    return run


def _low_float(xs) -> torch.dtype | None:
    """FP16/BF16 when the island is fed in it (a low-precision build): its FP32 outputs are handed on so."""
    import torch
    return next((x.dtype for x in xs if x is not None and x.dtype in (torch.float16, torch.bfloat16)), None)


def _meta_outputs(attrs: dict[str, Any], xs) -> tuple:
    import torch

    from kiln.ir.dtypes import torch_dtype
    arr = _LIVE.get(attrs.get("sha256", ""))
    if arr is None:
        raise RuntimeError("the island's model is not in memory here")
    types = output_types(arr.tobytes(), [tuple(x.shape) for x in xs])
    low = _low_float(xs)
    outs = []
    for shape, dt in types:
        if shape is None or not all(isinstance(d, int) for d in shape):
            raise RuntimeError("output shape depends on the data")
        t = torch_dtype(dt)
        outs.append(torch.empty(shape, dtype=low if low is not None and t == torch.float32 else t, device="meta"))
    return tuple(outs)


def require_fallback(net, fallback: str | None) -> None:
    """Refuse to build a network that holds islands unless the build allows ONNX Runtime fallback."""
    from kiln.ir.network import subgraphs
    found: list[str] = []

    def walk(n) -> None:
        for layer in n.layers:
            if layer.kind == KIND:
                found.append(layer.name)
            for g in subgraphs(layer):
                walk(g)
    walk(net)
    if found and fallback != "onnxruntime":
        raise BuildError(f"The network runs {len(found)} island(s) of ONNX nodes through ONNX Runtime "
                         f"({', '.join(repr(n) for n in found[:3])}{', ...' if len(found) > 3 else ''}); allow it "
                         f"with BuildConfig(fallback='onnxruntime') (kiln build --fallback onnxruntime).")
