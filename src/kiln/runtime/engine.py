"""Engine and ExecutionContext: run a built plan, safely, from many threads.

Shapes. An engine runs any input shapes within its optimization profiles. A range engine may
carry a tactic per shape bucket (kiln.builder.buckets): each run's bucket is picked from the
input shapes alone (host-side ints, no device sync; kiln.runtime.buckets) and its layers run
that bucket's tactics, all of which were made when the context was created. Triton kernels compile
at their first launch with a new set of compile-time constants (tile sizes some tactics choose by
size); the build's timing at every bucket point launched them, so on the build machine Triton's
on-disk cache holds them, and ``ExecutionContext.warm_up()`` runs each profile's corners and each
bucket once so that no later run compiles or loads one.

CUDA graphs. On a GPU a context runs the first run of an input-shape signature eagerly (the warm-up),
records that shape's graph at its second run and replays it after (kiln.runtime.graphs). It keeps at most ``graph_cache`` graphs
(the context option, else the ``KILN_GRAPH_CACHE`` environment variable, else 16): when a new
shape would exceed that, the least recently run shape's graph and its memory are released, and
that shape is recorded again if it comes back. Tensors computed from shapes alone (ShapeConstant layers)
are kept for as many input shapes (kiln.runtime.shape_cache).
"""
from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from kiln.errors import BuildError, KilnError, PluginError, ShapeError
from kiln.ir.dtypes import is_container
from kiln.ir.dtypes import from_numpy as _np_to_torch  # bfloat16, float8, sub-byte types
from kiln.ir.dtypes import to_numpy as _torch_to_np
from kiln.ir.dtypes import torch_dtype
from kiln.plugins.registry import plugin_records

# inference mode as the C++ guard that torch.inference_mode() enters (without its Python wrapper's per-run cost)
_inference_mode = torch._C._InferenceMode


class Engine:
    """A built engine: the plan, its weights, the device it is for. Make contexts to run it."""

    def __init__(self, header: dict[str, Any], weights: dict[str, np.ndarray], path: str | None = None) -> None:
        """``path``: the file a loaded header came from (already validated there); a header built in
        memory is checked against the same engine schema here."""
        if path is None:
            from kiln.engine.schema import header_problem
            why = header_problem(header, weights)
            if why:
                raise BuildError(f"The built engine does not fit the engine schema ({why}); this is a Kiln bug, "
                                 f"please report it with the model.")
        from kiln.kernels.ort_island import check_plan_islands
        check_plan_islands(header["plan"], weights)      # ONNX Runtime islands are data: checked before any use
        self.header = header
        self.plan = header["plan"]
        self.path = path
        self._host_weights = weights
        self._device_weights: dict[str, torch.Tensor] | None = None
        self._lock = threading.Lock()
        self.header["plugins"] = plugin_records(self.plan)
        if "buckets" in header:
            from kiln.runtime.program import check_tactic
            self.check_plugins()            # a missing plugin is named first, as for any engine
            for layer in self.plan["layers"]:
                for name in dict.fromkeys(layer.get("bucket_tactics") or ()):
                    check_tactic(layer, name, self.device)     # a closed table: the tactic registry

    # ---- facts -------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return self.header["device"]["kind"]

    @property
    def precision(self) -> str:
        return self.header["precision"]

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self.plan["inputs"]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return self.plan["outputs"]

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.plan["layers"]

    @property
    def profiles(self) -> list[dict[str, Any]]:
        return self.header.get("profiles", [])

    def __repr__(self) -> str:
        return (f"Engine({self.header.get('name')!r}, {self.device}, {self.precision}, {len(self.layers)} layers, "
                f"inputs={[t['name'] for t in self.inputs]})")

    # ---- persistence --------------------------------------------------------------------
    def save(self, path: str) -> None:
        from kiln.engine.format import write_engine
        header = {k: v for k, v in self.header.items() if k != "weights"}
        write_engine(str(path), header, self._host_weights)

    def serialize(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return self.header, self._host_weights

    # ---- execution ----------------------------------------------------------------------
    def _weights_on_device(self) -> dict[str, torch.Tensor]:
        with self._lock:
            if self._device_weights is None:
                dev = self.device
                out = {}
                for key, arr in self._host_weights.items():
                    t = _np_to_torch(arr)
                    out[key] = t.to(dev) if dev != "cpu" else t
                self._device_weights = out
            return self._device_weights

    def context(self, cuda_graph: bool | None = None, threads: int | None = None,
                graph_cache: int | None = None) -> "ExecutionContext":
        """A new execution context (its own activations). Contexts are thread-safe; one per thread
        runs in parallel. ``cuda_graph=False`` runs eagerly, layer by layer (for debugging).
        ``threads``: CPU threads its runs use (default: ``ExecutionContext.run_threads``).
        ``graph_cache``: how many input shapes keep a recorded CUDA graph (see the module docstring)."""
        return ExecutionContext(self, cuda_graph=cuda_graph, threads=threads, graph_cache=graph_cache)

    def check_plugins(self) -> None:
        from kiln.plugins import load_builtins, registry
        load_builtins()
        for rec in self.header["plugins"]:
            if registry.find(rec["name"], rec.get("namespace", ""), str(rec.get("version", "1"))) is None:
                ns = f"{rec.get('namespace')}::" if rec.get("namespace") else ""
                raise PluginError(
                    f"This engine needs plugin {ns}{rec['name']} v{rec.get('version', '1')}, which is not registered; "
                    f"import the module that defines it (or kiln.plugins.load('file.py'), --plugins file.py) "
                    f"before loading the engine.")


def _typed_array(v: Any, dtype: str) -> np.ndarray:
    """Python lists and scalars carry no dtype: take the input's (numpy would pick float64/int64)."""
    from kiln.ir.dtypes import np_dtype
    arr = np.asarray(v)
    try:
        want = np_dtype(dtype)
    except KilnError:
        return arr
    if arr.dtype.kind in "biuf" and np.can_cast(arr.dtype, want, casting="same_kind"):
        return arr.astype(want)
    return arr        # strings, or floats for an integer input: the checks below name the problem


class ExecutionContext:
    """Runs the engine: ``ctx.run({"input": array})`` → ``{"output": array}``.

    numpy in → numpy out; torch in → torch out (on the inputs' device); anything
    with ``__dlpack__`` is taken through DLPack. Input shapes may change between
    runs within the engine's optimization profiles.
    """

    def __init__(self, engine: Engine, cuda_graph: bool | None = None, threads: int | None = None,
                 graph_cache: int | None = None) -> None:
        from kiln.kernels.cpu_threads import check_threads, default_threads, use_threads
        from kiln.plugins import registry
        from kiln.runtime.buckets import BucketTable
        from kiln.runtime.graphs import graph_cache_size
        from kiln.runtime.program import Program
        from kiln.runtime.shape_cache import set_up_shape_caches
        self.threads = None if threads is None else check_threads(threads)
        self.graph_cache = graph_cache_size(graph_cache)
        engine.check_plugins()
        self.engine = engine
        self._lock = threading.Lock()
        weights = engine._weights_on_device()
        self.program = Program(engine.plan, weights, engine.device, plugin_factory=registry.create)
        set_up_shape_caches(self.program, self.graph_cache)
        self._inputs = {t["name"]: t for t in engine.inputs}
        self._input_names = list(self._inputs)
        self._out_names = [t["name"] for t in engine.outputs]
        self._dtypes: dict[str, torch.dtype] = {}         # each input's torch dtype, found at its first check
        self._containers = {n: is_container(t["dtype"]) for n, t in self._inputs.items()}
        self._accepted: dict[str, set] = {n: set() for n in self._inputs}    # (dtype, shape) that passed _check
        self._ranges = {n: [(p[n]["min"], p[n]["max"]) for p in engine.profiles if n in p] for n in self._inputs}
        self._sets_threads = engine.device == "cpu" or self.threads is not None
        self._default_threads, self._apply_threads = default_threads, use_threads
        self._engine_threads = engine.header.get("build", {}).get("cpu_threads")     # chosen at build
        self._device = torch.device(engine.device)
        self._on_cpu = self._device.type == "cpu"
        self._is_cuda = engine.device == "cuda"
        self._one_profile = len(engine.profiles) < 2
        # a CPU engine without container inputs: plain numpy feeds of an input signature that passed every
        # check once take _host_feeds (no per-input check, conversion or device logic)
        self._host_plain = self._on_cpu and not any(self._containers.values())
        self._host_signatures: set[tuple] = set()
        self.buckets = BucketTable(engine.header, list(self._inputs)) if "buckets" in engine.header else None
        self._weight_ptrs = {t.untyped_storage().data_ptr() for t in self.program.constants.values()}
        if cuda_graph is None:
            cuda_graph = engine.header.get("build", {}).get("cuda_graph", True)
        self.graphs = None
        self.graph_error: str | None = None
        if cuda_graph and engine.device == "cuda":
            from kiln.runtime.graphs import GraphRunner
            runner = GraphRunner(self.program, self.graph_cache)
            self.graphs = runner if runner.capturable else None

    def warm_up(self) -> int:
        """Run once, eagerly, on seeded random data at each profile's min, opt and max shapes and at each
        bucket's point, so that the kernels later runs use are compiled, or loaded from Triton's cache, and
        the CUDA modules of the library kernels (cuBLAS, torch's) that small and large shapes pick are loaded
        now and not at a first run. Returns how many runs it made (0 for an engine with sequence inputs, which
        it leaves alone)."""
        from kiln.runtime.inputs import default_shape, random_input
        if any(is_container(s["dtype"]) for s in self.engine.inputs):
            return 0
        points = [{n: r[k] for n, r in p.items()} for p in self.engine.profiles for k in ("min", "opt", "max")]
        if self.buckets is not None:
            points += [b["shapes"] for b in self.engine.header["buckets"]]
        points = [p for i, p in enumerate(points) if p not in points[:i]] or [{}]
        rng = np.random.default_rng(0)
        for shapes in points:
            tensors = [_np_to_torch(random_input(rng, s["dtype"], tuple(shapes[s["name"]]) if s["name"] in shapes
                                                 else default_shape(self.engine, s))).to(self.engine.device)
                       for s in self.engine.inputs]
            with self._lock, torch.inference_mode():
                self._prepare(tensors)
                self.program.run_env({}, tensors)
        return len(points)

    def _prepare(self, tensors: Sequence[Any]) -> None:
        """Before a run: the shape bucket's tactics, and the thread count (``run_threads``) for CPU engines and any
        context given ``threads``."""
        if self.buckets is not None:
            self.program.select(self.buckets.pick([tuple(t.shape) if isinstance(t, torch.Tensor) else None
                                                   for t in tensors]))
        if self._sets_threads:
            self._apply_threads(self.threads or self._default_threads(self._engine_threads))

    @property
    def run_threads(self) -> int:
        """The CPU thread count this context's runs use: its ``threads``, else ``--threads``'s process default,
        else the count the engine's build chose, else the usable cores."""
        return self.threads or self._default_threads(self._engine_threads)

    def _check(self, name: str, t: torch.Tensor) -> None:
        spec = self._inputs[name]
        want = self._dtypes.get(name)
        if want is None:
            want = self._dtypes[name] = torch_dtype(spec["dtype"])
        if t.dtype != want:
            raise ShapeError(f"Input {name!r} must be {spec['dtype']}, got {str(t.dtype).replace('torch.', '')}; "
                             f"convert it first (e.g. x.astype(np.{spec['dtype']})).")
        dims = spec["shape"]
        if dims is not None and len(dims) != t.dim():
            raise ShapeError(f"Input {name!r} must have rank {len(dims)} ({dims}), got shape {tuple(t.shape)}.")
        if dims is not None:
            for i, d in enumerate(dims):
                if isinstance(d, int) and t.shape[i] != d:
                    raise ShapeError(f"Input {name!r} must have {d} at dim {i} (shape {dims}), got {tuple(t.shape)}.")
        ranges = self._ranges[name]
        if ranges and not any(all(lo <= s <= hi for lo, s, hi in zip(low, t.shape, high)) for low, high in ranges):
            profiles = [p for p in self.engine.profiles if name in p]
            text = "; ".join(f"profile {i}: min {tuple(p[name]['min'])} max {tuple(p[name]['max'])}"
                             for i, p in enumerate(profiles))
            raise ShapeError(f"Input {name!r} shape {tuple(t.shape)} is outside every optimization profile ({text}); "
                             f"rebuild with a wider range (--min-shapes/--max-shapes).")

    def execute(self, tensors: list[torch.Tensor], copy: bool = False) -> list[torch.Tensor]:
        """Run on tensors already on the engine's device, in input order; outputs stay on the device
        (and, under CUDA-graph replay, are the context's static buffers: copy them before the next run).
        Passing the same input tensors again (refilled in place) binds them: the graph then reads them
        where they are instead of copying them in (runtime/graphs.py)."""
        with self._lock, _inference_mode(True):
            self._prepare(tensors)
            if self._is_cuda:
                prec = self.engine.precision
                torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
                torch.backends.cudnn.allow_tf32 = prec == "tf32"
                # FP16/BF16 GEMMs accumulate in FP32 (the engine's numerics contract)
                torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
                torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
            if self.graphs is not None:
                from kiln.runtime.graphs import CaptureError
                try:
                    outs = self.graphs.run(tensors)
                    return [o.clone() for o in outs] if copy else outs
                except CaptureError as exc:
                    self.graphs = None
                    self.graph_error = str(exc).splitlines()[0] if str(exc) else "capture failed"
                    torch.cuda.synchronize()
            return self.program.run_env({}, tensors)

    def run_all(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Every layer's outputs by tensor name (eager), as numpy: Polygraphy's "mark all" for debugging."""
        seen: dict[str, np.ndarray] = {}
        tensors = []
        for spec in self.engine.inputs:
            v = feeds[spec["name"]]
            t = v if isinstance(v, torch.Tensor) else _host_tensor(np.asarray(v))
            tensors.append(t.to(self.engine.device))

        def timer(step, thunk):
            outs = thunk()
            for n, o in zip(step.outs, outs):
                if isinstance(o, torch.Tensor):
                    seen[n] = _torch_to_np(o.float() if o.dtype == torch.bfloat16 else o).copy()
            return outs
        with self._lock, torch.inference_mode():
            self._prepare(tensors)
            self.program.run_env({}, tensors, timer=timer)
        return seen

    def profile(self, tensors: Sequence[torch.Tensor] | Mapping[str, Any], runs: int = 10) -> list[dict[str, Any]]:
        """Per-layer times (median over ``runs`` eager passes): name, kind, tactic, precision, ms, percent.
        ``tensors``: the inputs in order as tensors on the engine's device, or a mapping {input name: array or
        tensor} as ``run`` takes."""
        import time as _time
        if isinstance(tensors, Mapping):
            missing = [n for n in self._input_names if n not in tensors]
            if missing or len(tensors) != len(self._input_names):
                raise KilnError(f"profile needs exactly this engine's inputs {self._input_names}; got "
                                f"{list(tensors)}.")
            tensors = [torch.as_tensor(tensors[n]).to(self._device) for n in self._input_names]
        cuda = self.engine.device == "cuda"
        samples: dict[str, list[float]] = {}
        meta = {}

        def timer(step, thunk):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                out = thunk()
                b.record()
                pending.append((step.name, a, b))
            else:
                t0 = _time.perf_counter()
                out = thunk()
                samples.setdefault(step.name, []).append((_time.perf_counter() - t0) * 1e3)
            meta[step.name] = step
            return out
        with self._lock, torch.inference_mode():
            self._prepare(tensors)
            for _ in range(runs + 1):
                pending: list = []
                self.program.run_env({}, tensors, timer=timer)
                if cuda:
                    torch.cuda.synchronize()
                    for name, a, b in pending:
                        samples.setdefault(name, []).append(a.elapsed_time(b))
        rows = []
        for name, ts in samples.items():
            step = meta[name]
            rows.append({"name": name, "kind": step.kind, "tactic": step.tactic, "precision": step.precision,
                         "ms": float(np.median(ts[1:] if len(ts) > 1 else ts))})
        total = sum(r["ms"] for r in rows) or 1.0
        for r in rows:
            r["percent"] = 100.0 * r["ms"] / total
        return rows

    def _check_one_profile(self, tensors: dict[str, Any]) -> None:
        """Each input fits some profile (checked above); together they must fit the same one, as in TensorRT."""
        profiles = self.engine.profiles
        if len(profiles) < 2:
            return
        shapes = {n: tuple(t.shape) for n, t in tensors.items() if isinstance(t, torch.Tensor)}

        def fits(p: dict) -> bool:
            return all(len(p[n]["min"]) == len(s) and all(lo <= d <= hi for lo, d, hi in zip(p[n]["min"], s, p[n]["max"]))
                       for n, s in shapes.items() if n in p)
        if not any(fits(p) for p in profiles):
            given = ", ".join(f"{n} {s}" for n, s in shapes.items())
            raise ShapeError(f"The input shapes ({given}) each fit an optimization profile, but no single profile "
                             f"holds them all; give shapes from one profile (profiles: "
                             f"{[{n: (tuple(r['min']), tuple(r['max'])) for n, r in p.items()} for p in profiles]}).")

    def _host_feeds(self, feeds: Mapping[str, Any]) -> tuple[list[torch.Tensor] | None, tuple]:
        """The inputs shared with torch where every feed is a C-ordered, writeable numpy array, and their
        signature (dtype and shape of each); the tensors are None unless that signature passed every check
        of ``run`` before."""
        arrays = []
        sig: list = []
        for n in self._input_names:
            v = feeds[n]
            if type(v) is not np.ndarray:
                return None, ()
            flags = v.flags
            if not (flags.c_contiguous and flags.writeable):
                return None, ()
            sig += (v.dtype, v.shape)
            arrays.append(v)
        key = tuple(sig)
        if key not in self._host_signatures:
            return None, key
        return [torch.from_numpy(a) for a in arrays], key

    def run(self, feeds: Mapping[str, Any] | Sequence[Any], outputs: Sequence[str] | None = None) -> dict[str, Any]:
        names = self._input_names
        if type(feeds) is not dict and not isinstance(feeds, Mapping):
            feeds = dict(zip(names, feeds))
        if feeds.keys() != self._inputs.keys():
            unknown = [k for k in feeds if k not in self._inputs]
            if unknown:
                raise KilnError(f"{unknown[0]!r} is not an input of this engine; its inputs are {names}.")
            missing = [n for n in names if n not in feeds]
            if missing:
                raise KilnError(f"Input {missing[0]!r} is missing; this engine needs {names}.")
        want = self._wanted(outputs)
        if self._host_plain:
            tensors, sig = self._host_feeds(feeds)
            if tensors is not None:
                return self._outputs(self.execute(tensors, copy=True), tensors, want, True, None)
        else:
            sig = ()
        as_numpy = True
        device = self._device
        out_device = None
        tensors = []
        for n in names:
            v = feeds[n]
            if self._containers[n]:
                tensors.append(_container_in(n, v, self._inputs[n]["dtype"], device))
                as_numpy = as_numpy and not _holds_torch(v)
                continue
            on_host = False
            if type(v) is np.ndarray and v.dtype in _PLAIN_NP:
                t, on_host = _host_tensor(v), True
            elif isinstance(v, torch.Tensor):
                as_numpy = False
                out_device = out_device or v.device
                t = v
            elif isinstance(v, np.ndarray) or np.isscalar(v) or isinstance(v, (list, tuple)):
                arr = np.asarray(v) if isinstance(v, np.ndarray) else _typed_array(v, self._inputs[n]["dtype"])
                if arr.dtype == object or arr.dtype.kind in "US":
                    raise ShapeError(f"Input {n!r} holds strings; Kiln engines take numeric tensors only.")
                t = _host_tensor(arr)   # keeps 0-d arrays 0-d
            elif hasattr(v, "__dlpack__"):
                as_numpy = False
                t = torch.from_dlpack(v)
                out_device = out_device or t.device
            else:
                raise KilnError(f"Input {n!r} is a {type(v).__name__}; pass a numpy array, a torch tensor or a "
                                f"DLPack-capable array.")
            accepted = self._accepted[n]
            if (t.dtype, t.shape) not in accepted:      # _check depends on the dtype and shape alone
                self._check(n, t)
                if len(accepted) >= MAX_ACCEPTED_SHAPES:
                    accepted.clear()
                accepted.add((t.dtype, t.shape))
            if not (on_host and self._on_cpu) and t.device != device and \
                    not (device.type == "cuda" and t.device.type == "cuda"):
                t = t.to(device, non_blocking=False)
            tensors.append(t)
        if not self._one_profile:
            self._check_one_profile(dict(zip(names, tensors)))
        if sig and all(d in _PLAIN_NP for d in sig[::2]):   # every feed shared as it is: its signature passed
            if len(self._host_signatures) >= MAX_ACCEPTED_SHAPES:
                self._host_signatures.clear()
            self._host_signatures.add(sig)
        return self._outputs(self.execute(tensors, copy=True), tensors, want, as_numpy, out_device)

    def _wanted(self, outputs: Sequence[str] | None) -> list[str] | None:
        """``outputs`` as a list of this engine's output names (None: all of them)."""
        if outputs is None:
            return None
        want = list(outputs)
        wrong = [n for n in want if n not in self._out_names]
        if wrong:
            raise KilnError(f"{wrong[0]!r} is not an output of this engine; its outputs are {self._out_names}.")
        return want

    def _outputs(self, results: list[Any], tensors: list[Any], want: list[str] | None, as_numpy: bool,
                 out_device: torch.device | None) -> dict[str, Any]:
        """``run``'s result: the outputs in ``want`` (None: all), as numpy or on the inputs' device."""
        # an output that is an input or a weight (pass-through, view, folded constant) is returned as a copy:
        # writing to it must not change the caller's input or the engine's later results
        given = [t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)]
        weights, on_cpu = self._weight_ptrs, self._on_cpu
        res = {}
        for n, v in zip(self._out_names, results):
            if want is not None and n not in want:
                continue
            if not isinstance(v, torch.Tensor):      # a sequence (list) or an empty optional (None)
                res[n] = _container_out(v, as_numpy, out_device)
                continue
            ptr = v.untyped_storage().data_ptr()
            if ptr in weights or ptr in given:
                v = v.detach().clone()      # no autograd graph back to an input that requires grad
            if as_numpy:
                res[n] = _host_array(v, on_cpu)
            else:
                res[n] = v.to(out_device) if out_device is not None and v.device != out_device else v
        return res

    __call__ = run


# (dtype, shape) signatures per input that a context remembers as checked (then it starts afresh)
MAX_ACCEPTED_SHAPES = 64

# numpy and torch dtypes that torch.from_numpy / Tensor.numpy map one to one
_PLAIN_NP = frozenset(np.dtype(t) for t in (np.float32, np.float64, np.float16, np.int64, np.int32, np.int16,
                                            np.int8, np.uint8, np.bool_))
_PLAIN_TORCH = frozenset((torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16,
                          torch.int8, torch.uint8, torch.bool))


def _host_tensor(arr: np.ndarray) -> torch.Tensor:
    """A numpy input as a C-ordered tensor: the array itself where torch can share it (a plain dtype, C-ordered,
    writeable), else through kiln.ir.dtypes.from_numpy (in native byte order, which torch requires)."""
    if arr.dtype in _PLAIN_NP and arr.flags.c_contiguous and arr.flags.writeable:
        return torch.from_numpy(arr)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return _np_to_torch(np.require(arr, requirements="C"))


def _host_array(t: torch.Tensor, on_cpu: bool = False) -> np.ndarray:
    """An output as numpy: shared where it is a contiguous host tensor of a plain dtype, else through
    kiln.ir.dtypes.to_numpy. ``on_cpu``: the caller knows ``t`` is a host tensor."""
    if t.dtype in _PLAIN_TORCH and (on_cpu or t.device.type == "cpu") and t.is_contiguous() and not t.requires_grad:
        return t.numpy()
    return _torch_to_np(t)


def _holds_torch(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return any(_holds_torch(x) for x in v)
    return isinstance(v, torch.Tensor)


def _container_in(name: str, v: Any, kind: str, device: torch.device) -> Any:
    """A sequence input becomes a list of tensors on ``device``; an empty optional is None."""
    from kiln.ir.dtypes import element_type
    if v is None:
        if not kind.startswith("optional("):
            raise KilnError(f"Input {name!r} is a {kind} and cannot be None; pass a list of arrays.")
        return None
    inner = element_type(kind) if kind.startswith("optional(") else kind
    if inner.startswith("sequence("):
        if not isinstance(v, (list, tuple)):
            raise KilnError(f"Input {name!r} is a {inner}; pass a list of arrays, got {type(v).__name__}.")
        return [_container_in(f"{name}[{i}]", x, element_type(inner), device) for i, x in enumerate(v)]
    t = v if isinstance(v, torch.Tensor) else _host_tensor(np.asarray(v))
    return t.to(device) if t.device != device else t


def _container_out(v: Any, as_numpy: bool, out_device) -> Any:
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return [_container_out(x, as_numpy, out_device) for x in v]
    if as_numpy:
        return _torch_to_np(v)
    return v.to(out_device) if out_device is not None and v.device != out_device else v
