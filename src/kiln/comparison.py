"""Accuracy debugging: run a model through Kiln and ONNX Runtime on the same inputs and find where
the numbers part (Polygraphy's ``run --trt --onnxrt``, ``--mark all`` and ``debug reduce`` in one).

    result = kiln.compare("model.onnx", precision="fp16", per_layer=True)
    print(result.report())            # per output: errors, pass/fail, histogram; the first bad layer
    result.save_errors("errors.json")  # the viewer's overlay: kiln view model.onnx --errors errors.json

ONNX Runtime on the CPU is the reference. Pass/fail per tensor, for the error statistic STAT
(max, mean or median over the elements)::

    STAT(|kiln − ref|) ≤ atol + rtol · STAT(|ref|)

and any value that is finite in the reference but not in Kiln's output fails. Relative errors
are measured against the reference, floored at atol where it is (near) zero::

    rel = |kiln − ref| / max(|ref|, atol)        rel L2 = ‖kiln − ref‖ / max(‖ref‖, atol·√n)

(Polygraphy divides by |ref| plus 2e-16 where ref is 0, and warns that the result may be huge.)

Per layer, every tensor that means the same on both sides is compared in topological order: an
engine tensor carries the name of the ONNX value it holds (a fused layer the name of the last
value it computes), and a name is skipped where the engine's record of which ONNX nodes each
layer runs says otherwise (see same_meaning: the writer does not run the producing node, or runs
past the value, or the node goes on in another layer). The first layer whose relative error
jumps by more than ``growth`` times its inputs' error, while failing the tolerance, is named as
the culprit, with its op, attributes, the ONNX nodes fused into the engine layer that computed it
and the value ranges around it.
"""
from __future__ import annotations

import json
import math
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.errors import KilnError

DEFAULT_TOL = {"fp32": (1e-5, 1e-4), "tf32": (1e-3, 1e-3), "fp16": (1e-2, 1e-2), "bf16": (5e-2, 5e-2)}
# relative error a healthy layer of this precision may add by rounding its output alone: the floor
# under the inputs' error when growth is measured
_ROUNDING = {"fp32": 1e-7, "tf32": 1e-3, "fp16": 1e-3, "bf16": 8e-3}
STATS = ("max", "mean", "median")
_HIST_EDGES = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]


# ---- records ------------------------------------------------------------------------------
@dataclass
class ErrorStats:
    """How far Kiln's tensor is from the reference's."""

    max_abs: float
    mean_abs: float
    median_abs: float
    max_rel: float
    mean_rel: float
    rel_l2: float
    nonfinite: int                  # elements finite in the reference but not in Kiln's output
    histogram: list[tuple[str, int]]
    passed: bool

    @property
    def metric(self) -> float:
        """The scale-free error the per-layer search follows (relative L2, ∞ on non-finite values)."""
        return math.inf if self.nonfinite else self.rel_l2


@dataclass
class OutputRecord:
    name: str
    shape: list[int]
    ref_shape: list[int]
    dtype: str
    stats: ErrorStats | None        # None when the shapes differ
    passed: bool
    ref_range: tuple[float, float] = (math.nan, math.nan)
    kiln_range: tuple[float, float] = (math.nan, math.nan)


@dataclass
class LayerRecord:
    index: int                      # position in the ONNX graph's topological order
    tensor: str
    node: str
    op: str
    attrs: dict[str, Any]
    inputs: list[str]
    input_ranges: list[tuple[str, float, float]]
    ref_range: tuple[float, float]
    kiln_range: tuple[float, float]
    stats: ErrorStats
    input_error: float              # the largest relative error among the node's inputs
    growth: float                   # this tensor's error over max(input_error, rounding floor)
    fused: list[str] = field(default_factory=list)   # ONNX nodes run by the engine layer that computed it

    @property
    def passed(self) -> bool:
        return self.stats.passed


@dataclass
class CompareResult:
    """What ``kiln.compare`` found; ``passed`` is True when every output is within tolerance."""

    model: str
    precision: str
    device: str
    atol: float
    rtol: float
    check_error_stat: str
    growth: float
    outputs: list[OutputRecord]
    layers: list[LayerRecord] = field(default_factory=list)
    first_bad: LayerRecord | None = None
    first_jump: LayerRecord | None = None     # the first jump even when every output passes
    reduced: Any = None             # kiln.reduce.ReduceResult when reduce=True
    reduced_path: str | None = None

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    # ---- the viewer's overlay ----
    def errors_json(self) -> dict[str, Any]:
        def rng(r):
            return [float(r[0]), float(r[1])]
        return {
            "format": "kiln-compare-errors", "version": 1, "model": self.model, "metric": "rel_l2",
            "atol": self.atol, "rtol": self.rtol, "check_error_stat": self.check_error_stat,
            "precision": self.precision, "device": self.device,
            "first_bad": {"tensor": self.first_bad.tensor, "node": self.first_bad.node} if self.first_bad else None,
            "tensors": [{"tensor": r.tensor, "node": r.node, "op": r.op, "index": r.index,
                         "max_abs": r.stats.max_abs, "mean_abs": r.stats.mean_abs, "max_rel": r.stats.max_rel,
                         "rel_l2": r.stats.metric, "growth": r.growth, "passed": r.passed,
                         "ref_range": rng(r.ref_range), "kiln_range": rng(r.kiln_range)} for r in self.layers],
        }

    def save_errors(self, path: str) -> str:
        if not self.layers:
            raise KilnError("This comparison has no per-layer records; run it with per_layer=True (--per-layer).")
        with open(path, "w") as f:
            json.dump(self.errors_json(), f, indent=1)
        return path

    # ---- text ----
    def report(self, histogram: bool = True) -> str:
        lines = [f"kiln compare {self.model}: Kiln {self.precision} on {self.device} vs ONNX Runtime (CPU); "
                 f"pass when {self.check_error_stat}|diff| <= {self.atol:g} + {self.rtol:g}·"
                 f"{self.check_error_stat}|ref|; rel = |diff| / max(|ref|, {self.atol:g})"]
        for o in self.outputs:
            if o.stats is None:
                lines.append(f"  {o.name}: shape {o.shape} but ONNX Runtime gives {o.ref_shape}  FAIL")
                continue
            s = o.stats
            lines.append(f"  {o.name}: {o.dtype} {o.shape}  max abs {s.max_abs:.3e}  mean abs {s.mean_abs:.3e}  "
                         f"max rel {s.max_rel:.3e}  rel L2 {_fmt(s.metric)}"
                         + (f"  {s.nonfinite} non-finite" if s.nonfinite else "")
                         + f"  {'PASS' if o.passed else 'FAIL'}")
            if histogram:
                lines.extend("    " + h for h in _histogram_lines(s.histogram))
        if self.layers:
            bad = sum(not r.passed for r in self.layers)
            lines.append(f"  per layer: {len(self.layers)} tensors compared, {bad} outside tolerance")
            if self.first_bad is not None:
                r = self.first_bad
                attrs = ", ".join(f"{k}={_short(v)}" for k, v in r.attrs.items())
                lines.append(f"  first bad layer: node {r.node!r} ({r.op}{', ' + attrs if attrs else ''}) "
                             f"output {r.tensor!r}")
                if len(r.fused) > 1:
                    lines.append(f"    computed by one engine layer fusing {', '.join(map(repr, r.fused))}")
                lines.append(f"    rel L2 {_fmt(r.stats.metric)} (inputs {_fmt(r.input_error)}, "
                             f"growth {_fmt(r.growth)}×)  max abs {r.stats.max_abs:.3e}")
                for name, lo, hi in r.input_ranges:
                    lines.append(f"    input  {name}: range [{lo:.4g}, {hi:.4g}]")
                lines.append(f"    output reference range [{r.ref_range[0]:.4g}, {r.ref_range[1]:.4g}], "
                             f"Kiln range [{r.kiln_range[0]:.4g}, {r.kiln_range[1]:.4g}]")
                if r.stats.nonfinite:
                    lines.append(f"    {r.stats.nonfinite} values are finite in the reference but not in Kiln "
                                 f"(overflow: {self.precision} holds at most "
                                 f"{_MAX_FINITE.get(self.precision, math.inf):.6g})")
            elif bad and self.passed and self.first_jump is not None:
                r = self.first_jump
                lines.append(f"  every output passes; the first intermediate jump is at node {r.node!r} ({r.op}), "
                             f"Kiln range [{r.kiln_range[0]:.4g}, {r.kiln_range[1]:.4g}] vs reference "
                             f"[{r.ref_range[0]:.4g}, {r.ref_range[1]:.4g}]")
            elif bad and not self.passed:
                lines.append("  no single layer jumps: the error grows gradually (accumulated rounding)")
        if self.reduced is not None:
            lines.append(f"  reduced to {self.reduced.nodes} of {self.reduced.original_nodes} nodes "
                         f"({self.reduced.calls} comparisons): {self.reduced_path}")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


_MAX_FINITE = {"fp16": 65504.0, "bf16": 3.39e38, "fp32": 3.40e38, "tf32": 3.40e38}


def _fmt(v: float) -> str:
    return "inf" if v == math.inf else ("nan" if v != v else f"{v:.3e}")


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _histogram_lines(hist: list[tuple[str, int]]) -> list[str]:
    total = sum(n for _, n in hist) or 1
    shown = [(label, n) for label, n in hist if n]
    width = max((len(label) for label, _ in shown), default=0)
    out = []
    for label, n in shown:
        bar = "█" * max(1, round(24 * n / total))
        out.append(f"|diff| {label:<{width}} {bar} {n}")
    return out


# ---- statistics ---------------------------------------------------------------------------
def error_stats(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float, stat: str = "max") -> ErrorStats:
    """Compare one tensor (same shape) and decide pass/fail (see the module docstring)."""
    a = _as_f64(got).ravel()
    b = _as_f64(ref).ravel()
    if a.size == 0:
        return ErrorStats(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, [], True)
    ref_ok = np.isfinite(b)
    same_special = (~ref_ok) & ((a == b) | (np.isnan(a) & np.isnan(b)))   # inf == inf, nan vs nan
    bad_nonfinite = ref_ok & ~np.isfinite(a)
    nonfinite = int(bad_nonfinite.sum()) + int((~ref_ok & ~same_special).sum())
    keep = ref_ok & np.isfinite(a)
    d = np.abs(a[keep] - b[keep])
    r = np.abs(b[keep])
    if d.size:
        max_abs, mean_abs, median_abs = float(d.max()), float(d.mean()), float(np.median(d))
        max_rel, mean_rel = _rel(d, np.maximum(r, atol))
        rel_l2 = _rel(np.linalg.norm(d), max(float(np.linalg.norm(r)), atol * math.sqrt(d.size)))[0]
        agg = {"max": np.max, "mean": np.mean, "median": np.median}[stat]
        passed = bool(agg(d) <= atol + rtol * agg(r)) and nonfinite == 0
    else:
        max_abs = mean_abs = median_abs = max_rel = mean_rel = rel_l2 = 0.0
        passed = nonfinite == 0
    if nonfinite:
        max_abs = max_rel = math.inf
    counts = np.histogram(d, bins=[0.0, *_HIST_EDGES, np.inf])[0] if d.size else np.zeros(len(_HIST_EDGES) + 1)
    labels = [f"< {_HIST_EDGES[0]:.0e}"] + [f"{lo:.0e}–{hi:.0e}" for lo, hi in zip(_HIST_EDGES, _HIST_EDGES[1:])] \
        + [f">= {_HIST_EDGES[-1]:.0e}"]
    hist = [(lab, int(c)) for lab, c in zip(labels, counts)]
    if nonfinite:
        hist.append(("non-finite", nonfinite))
    return ErrorStats(max_abs, mean_abs, median_abs, max_rel, mean_rel, rel_l2, nonfinite, hist, passed)


def _rel(diff: Any, scale: Any) -> tuple[float, float]:
    """max and mean of diff/scale: 0 where diff is 0, ∞ where only the scale is 0 (atol 0, ref 0)."""
    diff, scale = np.atleast_1d(np.asarray(diff, np.float64)), np.atleast_1d(np.asarray(scale, np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / scale)
    return float(rel.max()), float(rel.mean())


def _as_f64(v: Any) -> np.ndarray:
    a = np.asarray(v)
    if a.dtype == bool:
        return a.astype(np.float64)
    if a.dtype.kind in "fiu" or a.dtype.name == "bfloat16":
        return a.astype(np.float64)
    raise KilnError(f"Cannot compare values of type {a.dtype}.")


def _pair(got: Any, want: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Kiln's and the reference's value as two same-shaped arrays; a sequence output pairs element by
    element (flattened and joined); None when lengths or element shapes differ."""
    if isinstance(got, (list, tuple)) or isinstance(want, (list, tuple)):
        g = [np.asarray(x) for x in (got if isinstance(got, (list, tuple)) else [got])]
        w = [np.asarray(x) for x in (want if isinstance(want, (list, tuple)) else [want])]
        if len(g) != len(w) or any(a.shape != b.shape for a, b in zip(g, w)):
            return None
        if not g:
            return np.zeros(0), np.zeros(0)
        return np.concatenate([a.ravel() for a in g]), np.concatenate([b.ravel() for b in w])
    return np.asarray(got), np.asarray(want)


def _range(v: Any) -> tuple[float, float]:
    a = np.asarray(v)
    if a.size == 0 or a.dtype.kind not in "fiub" and a.dtype.name != "bfloat16":
        return (math.nan, math.nan)
    a = a.astype(np.float64)
    return (float(a.min()), float(a.max()))


def _numeric(v: Any) -> bool:
    a = np.asarray(v) if not isinstance(v, np.ndarray) else v
    return isinstance(a, np.ndarray) and a.dtype != object and (a.dtype.kind in "fiub" or a.dtype.name == "bfloat16")


# ---- inputs -------------------------------------------------------------------------------
def _input_specs(model) -> list[tuple[str, np.dtype, list]]:
    """(name, numpy dtype, dims with None/str for dynamic) of the graph inputs that are not initializers."""
    from onnx import helper
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise KilnError(f"Input {vi.name!r} is not a tensor; kiln compare feeds tensors only.")
        dt = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim] \
            if tt.HasField("shape") else None
        specs.append((vi.name, dt, dims))
    return specs


def _read_tensor_file(path: str) -> np.ndarray:
    if path.endswith(".pb"):
        import onnx
        from onnx import numpy_helper
        t = onnx.TensorProto()
        with open(path, "rb") as f:
            t.ParseFromString(f.read())
        return numpy_helper.to_array(t)
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise KilnError(f"Input file {path!r} does not exist; give an existing .npy file.") from None
    except (ValueError, OSError) as exc:
        raise KilnError(f"Input file {path!r} is not a readable .npy array ({exc}); save it with numpy.save.") \
            from None


def data_file_name(name: str) -> str:
    """The file that holds tensor ``name`` in a data folder (names may contain '/' and ':')."""
    return urllib.parse.quote(name, safe="") + ".npy"


def _read_data_dir(path: str, names: list[str]) -> dict[str, np.ndarray]:
    if os.path.isfile(path) and path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if not os.path.isdir(path):
        raise KilnError(f"Data folder {path!r} does not exist; give a folder of NAME.npy files (or ONNX test-data "
                        f"input_N.pb files), or an .npz file.")
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate(names):
        for cand in (data_file_name(name), f"input_{i}.pb", f"{name}.npy"):
            p = os.path.join(path, cand)
            if os.path.isfile(p):
                out[name] = _read_tensor_file(p)
                break
    if not out:
        raise KilnError(f"Data folder {path!r} holds no input of this model; expected files named "
                        f"{', '.join(data_file_name(n) for n in names)} (or input_0.pb, ...).")
    return out


def make_feeds(model, inputs: Mapping[str, Any] | None = None, data: str | None = None,
               shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for both runtimes: from arrays/.npy paths, a data folder, or random (seeded)."""
    specs = _input_specs(model)
    names = [n for n, _, _ in specs]
    given: dict[str, Any] = {}
    if data:
        given.update(_read_data_dir(data, names))
    for k, v in (inputs or {}).items():
        given[k] = _read_tensor_file(v) if isinstance(v, (str, os.PathLike)) else np.asarray(v)
    for k in list(given) + list(shapes or {}):
        if k not in names:
            raise KilnError(f"The model has no input named {k!r}; its inputs are {', '.join(names) or 'none'}.")
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, dt, dims in specs:
        if name in given:
            a = np.asarray(given[name])
            if a.dtype != dt:
                raise KilnError(f"Input {name!r} is {a.dtype} but the model expects {dt}; convert it "
                                f"(numpy: a.astype({dt.name!r})) and save it again.")
            if dims is not None and (len(a.shape) != len(dims) or any(
                    isinstance(d, int) and d > 0 and d != s for d, s in zip(dims, a.shape))):
                want = "x".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in dims)
                raise KilnError(f"Input {name!r} has shape {list(a.shape)} but the model expects {want}; give an "
                                f"array of that shape.")
            feeds[name] = np.require(a, requirements="C")     # ascontiguousarray makes a 0-d array 1-d
            continue
        shape = tuple((shapes or {}).get(name) or ())
        if not shape:
            if dims is None or any(not (isinstance(d, int) and d > 0) for d in dims):
                raise KilnError(f"Input {name!r} has dynamic shape {dims}; give --shapes {name}:DIMS or its data.")
            shape = tuple(dims)
        if dt == np.bool_:
            feeds[name] = rng.random(shape) > 0.5
        elif dt.kind in "iu":
            feeds[name] = rng.integers(0, 16, size=shape).astype(dt)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dt)
    return feeds


# ---- the two runtimes ---------------------------------------------------------------------
def _ort_session(model):
    try:
        import onnxruntime as ort
    except ImportError:
        raise KilnError("kiln compare needs ONNX Runtime as its reference; install it: pip install onnxruntime.") \
            from None
    import re
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    exact = ort.SessionOptions()
    exact.log_severity_level = 3
    # exact integer GEMMs: on x86 CPUs without VNNI the default u8s8 kernel saturates full-range int8 weights.
    # ORT's optimizer refuses some Q/DQ graphs with every tensor marked as an output under this setting; those
    # run with the default kernels.
    exact.add_session_config_entry("session.x64quantprecision", "1")
    try:
        try:
            return ort.InferenceSession(model.SerializeToString(), exact, providers=["CPUExecutionProvider"])
        except Exception:
            return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:     # ORT's own errors: the reference cannot load the model
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        older = re.search(r"max supported IR version: (\d+)", msg)
        if older and model.ir_version > int(older.group(1)):
            # a newer onnx package stamps a newer IR version than this ONNX Runtime reads; the graph
            # itself usually needs nothing new, so the reference runs a copy stamped with the older one
            import onnx
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            copy.ir_version = int(older.group(1))
            try:
                return ort.InferenceSession(copy.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            except Exception:
                pass
            msg += f"; upgrade onnxruntime, or save the model with ir_version={older.group(1)}"
        raise KilnError(f"ONNX Runtime (the reference) cannot load this model: {msg}") from None


def _mark_all(model):
    """A copy of ``model`` that also returns every intermediate tensor of the main graph."""
    import onnx
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for o in node.output:
            if o and o not in have:
                m.graph.output.append(onnx.ValueInfoProto(name=o))
                have.add(o)
    return m


def _run_reference(model, feeds: dict[str, np.ndarray], all_tensors: bool) -> dict[str, Any]:
    m = _mark_all(model) if all_tensors else model
    sess = _ort_session(m)
    names = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(None, feeds)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KilnError(f"ONNX Runtime (the reference) failed to run this model on these inputs: {msg}") from None
    return dict(zip(names, values))


def _load_model(model):
    import onnx
    if isinstance(model, onnx.ModelProto):
        return model, "<model>"
    path = os.fspath(model)
    if not os.path.exists(path):
        raise KilnError(f"Model file {path!r} does not exist.")
    try:
        return onnx.load(path), path
    except Exception as exc:
        raise KilnError(f"{path!r} is not a readable ONNX model ({type(exc).__name__}); export it again.") from None


def _build(model, feeds, precision: str, device: str | None, fp32_layers=()):
    import kiln
    profiles = {n: tuple(np.shape(v)) for n, v in feeds.items()}
    return kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(precision=precision, device=device,
                                                               profiles=profiles or None, fp32_layers=fp32_layers))


# ---- per layer ----------------------------------------------------------------------------
def _parsed_node_name(node, index: int) -> str:
    """The name kiln.onnx.parse gives a main-graph node (engine layers' origin lists these)."""
    return node.name or f"{node.op_type}_{index + 1}"


def same_meaning(producer: str, single_output: bool, onnx_readers: set[str], origin: Sequence[str],
                 n_outputs: int, engine_readers: Sequence[Sequence[str]] = ()) -> bool:
    """Whether an engine tensor holds the ONNX value of its name, as far as the engine's record of the
    ONNX nodes each layer runs (``origin``, of the layer writing the tensor) tells. Not when
    - the writer does not run ``producer``, the node computing the value (a name taken by another value);
    - the writer has one output and runs one of the value's ``onnx_readers`` (it computes past the
      value; a layer with several outputs may hand out an inner value as well);
    - ``producer`` has one output and another engine layer reading the tensor runs it too (the tensor is
      an intermediate of a node converted to several layers).
    A layer running no ONNX node (a cast the builder adds) passes values on unchanged."""
    if not origin:
        return True
    if producer not in origin:
        return False
    if n_outputs == 1 and onnx_readers.intersection(origin):
        return False
    return not (single_output and any(producer in o for o in engine_readers))


def comparable(model, layers: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """The main-graph ONNX values that an engine (its plan's ``layers``) holds under their names with
    their meaning (see same_meaning), each with the ONNX nodes run by the layer that writes it."""
    written: dict[str, tuple[list[str], int]] = {}
    read_by: dict[str, list[list[str]]] = {}
    for layer in layers:
        origin = list(layer.get("origin") or ())
        outs = [o for o in layer.get("outputs") or () if o]
        for o in outs:
            written[o] = (origin, len(outs))
        for i in layer.get("inputs") or ():
            if i:
                read_by.setdefault(i, []).append(origin)
    names = [_parsed_node_name(n, k) for k, n in enumerate(model.graph.node)]
    onnx_readers: dict[str, set[str]] = {}
    for node, name in zip(model.graph.node, names):
        for i in node.input:
            onnx_readers.setdefault(i, set()).add(name)
    keep: dict[str, list[str]] = {}
    for node, name in zip(model.graph.node, names):
        outs = [o for o in node.output if o]
        for o in outs:
            if o in written and same_meaning(name, len(outs) == 1, onnx_readers.get(o, set()), *written[o],
                                             read_by.get(o, [])):
                keep[o] = written[o][0]
    return keep


def _per_layer(model, ours: dict[str, np.ndarray], ref: dict[str, Any], feeds, atol, rtol, stat, precision,
               growth_factor, same: Mapping[str, list[str]]) -> tuple[list[LayerRecord], LayerRecord | None]:
    """Records for the values in ``same`` (comparable's result) and the first culprit."""
    from onnx import helper
    err: dict[str, float] = {}           # tensor → relative error (compared, or inferred through fused ones)
    for name in feeds:
        err[name] = 0.0
    for init in model.graph.initializer:
        err[init.name] = 0.0
    floor = _ROUNDING.get(precision, 1e-7)
    records: list[LayerRecord] = []

    def input_error(node) -> float:
        worst = 0.0
        for i in node.input:
            if not i:
                continue
            worst = max(worst, err.get(i, 0.0))
        return worst

    for idx, node in enumerate(model.graph.node):
        e_in = input_error(node)
        for o in node.output:
            if not o:
                continue
            err[o] = e_in                 # not compared (fused away): carries its inputs' error
            if o not in same or o not in ours or o not in ref or not _numeric(ref[o]) or not _numeric(ours[o]):
                continue
            a, b = np.asarray(ours[o]), np.asarray(ref[o])
            if a.shape != b.shape:        # only unit axes may differ (a squeeze); a layout change is no match
                if [d for d in a.shape if d != 1] != [d for d in b.shape if d != 1]:
                    continue
                a = a.reshape(b.shape)
            s = error_stats(a, b, atol, rtol, stat)
            m = s.metric
            err[o] = m
            growth = m / max(e_in, floor) if m != math.inf else math.inf
            attrs = {a_.name: helper.get_attribute_value(a_) for a_ in node.attribute
                     if a_.type not in (a_.GRAPH, a_.GRAPHS, a_.TENSOR)}
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
            in_ranges = [(i, *_range(ref[i])) for i in node.input if i and i in ref and _numeric(ref[i])]
            in_ranges += [(i, *_range(feeds[i])) for i in node.input if i in feeds and i not in ref]
            records.append(LayerRecord(idx, o, node.name or f"{node.op_type}_{idx}", node.op_type, attrs,
                                       [i for i in node.input if i], in_ranges, _range(b), _range(a), s, e_in,
                                       growth, same[o]))
    first = next((r for r in records if not r.passed and r.growth >= growth_factor), None)
    return records, first


# ---- the entry point ----------------------------------------------------------------------
def compare(model, *, precision: str = "fp32", device: str | None = None, engine=None,
            inputs: Mapping[str, Any] | None = None, data: str | None = None,
            shapes: Mapping[str, Sequence[int]] | None = None, atol: float | None = None, rtol: float | None = None,
            check_error_stat: str = "max", per_layer: bool = False, growth: float = 10.0,
            reduce: bool = False, reduce_output: str | None = None, seed: int = 0, log=None,
            fp32_layers=()) -> CompareResult:
    """Build (or take ``engine``) and run ``model`` with Kiln and ONNX Runtime on the same inputs.

    ``model``: an .onnx path or ModelProto. ``inputs``: name → array or .npy path; ``data``: a
    folder of NAME.npy / input_N.pb files or an .npz; the rest are random (``seed``), with
    ``shapes`` for dynamic dims. ``per_layer`` compares every intermediate tensor and names the
    first layer whose error jumps ``growth``-fold; ``reduce`` shrinks a failing model to the
    smallest failing subgraph and saves it (``reduce_output``, default MODEL.reduced.onnx).
    ``fp32_layers``: layer-name patterns kept in FP32 in an FP16/BF16 build (BuildConfig.fp32_layers).
    """
    if check_error_stat not in STATS:
        raise KilnError(f"--check-error-stat takes {', '.join(STATS)}; got {check_error_stat!r}.")
    if precision not in DEFAULT_TOL:
        raise KilnError(f"Unknown precision {precision!r}; use one of {', '.join(DEFAULT_TOL)}.")
    proto, path = _load_model(model)
    feeds = make_feeds(proto, inputs, data, shapes, seed)
    if engine is not None and not hasattr(engine, "context"):
        import kiln
        engine = kiln.load(engine)
    ref_all = _run_reference(proto, feeds, all_tensors=per_layer or reduce)
    if engine is None:
        engine = _build(proto, feeds, precision, device, fp32_layers)
    precision = engine.precision
    d_atol, d_rtol = DEFAULT_TOL.get(precision, DEFAULT_TOL["fp32"])
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    ctx = engine.context()
    ours = ctx.run(feeds)
    outputs = []
    for o in proto.graph.output:
        name = o.name
        if name not in ours:
            raise KilnError(f"The engine has no output {name!r}; was it built from another model?")
        pair = _pair(ours[name], ref_all[name])
        if pair is None:                         # sequences of different lengths or element shapes
            n_got = len(ours[name]) if isinstance(ours[name], (list, tuple)) else 1
            n_want = len(ref_all[name]) if isinstance(ref_all[name], (list, tuple)) else 1
            outputs.append(OutputRecord(name, [n_got], [n_want], "sequence", None, False))
            continue
        got, want = pair
        if got.shape != want.shape:
            outputs.append(OutputRecord(name, list(got.shape), list(want.shape), str(got.dtype), None, False))
            continue
        if not _numeric(want):
            same = bool(np.array_equal(got, want))
            outputs.append(OutputRecord(name, list(got.shape), list(want.shape), str(got.dtype),
                                        None if not same else error_stats(np.zeros(1), np.zeros(1), atol, rtol),
                                        same))
            continue
        s = error_stats(got, want, atol, rtol, check_error_stat)
        outputs.append(OutputRecord(name, list(got.shape), list(want.shape), str(got.dtype), s, s.passed,
                                    _range(want), _range(got)))
    result = CompareResult(path, precision, engine.device, atol, rtol, check_error_stat, growth, outputs)
    if per_layer:
        every = ctx.run_all(feeds)
        result.layers, first = _per_layer(proto, every, ref_all, feeds, atol, rtol, check_error_stat, precision,
                                          growth, comparable(proto, engine.layers))
        # a culprit is named only when an output fails; otherwise a jump is a remark (e.g. an attention
        # mask's -3.4e38 that FP16 holds as -inf, harmless after the softmax)
        result.first_bad = None if result.passed else first
        result.first_jump = first
    if reduce:
        if result.passed:
            raise KilnError("Every output passes the comparison; there is nothing to reduce.")
        result.reduced, result.reduced_path = _reduce(proto, path, ref_all, feeds, engine.precision, engine.device,
                                                      atol, rtol, check_error_stat, reduce_output, log)
    return result


def _reduce(proto, path, ref_all, feeds, precision, device, atol, rtol, stat, out_path, log):
    from onnx import helper

    from kiln.reduce import reduce_model
    values = {**ref_all, **feeds}
    types = {}
    for k, v in values.items():
        a = np.asarray(v)
        if a.dtype == object:
            continue
        try:
            types[k] = (helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
        except (KeyError, TypeError, ValueError):
            continue

    def fails(sub) -> bool:
        sub_feeds = {}
        for spec_name, _, _ in _input_specs(sub):
            if spec_name not in values:
                return False
            sub_feeds[spec_name] = np.asarray(values[spec_name])
        ref = _run_reference(sub, sub_feeds, all_tensors=False)
        eng = _build(sub, sub_feeds, precision, device)
        got = eng.context().run(sub_feeds)
        for o in sub.graph.output:
            if o.name not in got or not _numeric(ref[o.name]):
                continue
            g, w = np.asarray(got[o.name]), np.asarray(ref[o.name])
            if g.shape != w.shape or not error_stats(g, w, atol, rtol, stat).passed:
                return True
        return False
    res = reduce_model(proto, fails, tensor_types=types, log=log)
    if out_path is None:
        stem = os.path.splitext(os.path.basename(path))[0] if path != "<model>" else "model"
        out_path = f"{stem}.reduced.onnx"
    res.save(out_path)
    data_dir = os.path.splitext(out_path)[0] + "-data"
    os.makedirs(data_dir, exist_ok=True)
    for name in res.inputs:
        if name in values:
            np.save(os.path.join(data_dir, data_file_name(name)), np.asarray(values[name]))
    return res, out_path
