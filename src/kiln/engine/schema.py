"""The engine header's schema: every field the runtime, ``kiln inspect``/``run``/``bench``, the viewer
and comparison read from a header, with its type.

A header that passes can run; one that does not is refused as damaged, in one line that names the
field. The descriptive sections (the top level, ``device``, ``memory``, ``build``) type the keys Kiln
reads and ignore others (a newer Kiln may record more facts; nothing acts on them). Everything the
runtime executes from (the plan, its inputs/outputs, tensors, weights, layers and their attributes,
the optimization profiles, the shape-bucket table and the weight table) is closed: an unknown key there is
refused. Layer attributes follow their kind's schema in ``kiln.ir.layers``, in subgraph plans too.

A range engine may carry a bucket table, ``buckets: [{"profile": i, "shapes": {input: dims}}]``: points of
its profiles (ints within the profile, every profile's max among them), and top-level layers whose tactic
differs between buckets name one per bucket in ``bucket_tactics``. Tactic names here are checked for form
(lower-case names); the runtime checks each against the tactic registry of the layer's kind when it loads
the engine (``kiln.runtime.engine``), before anything runs. A CPU layer may carry ``threads``, "one" or "all":
the thread count its build measured it faster on (kiln.builder.tactics.select_threads).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from kiln.ir.dtypes import ALL_TYPES, LAYER_PRECISIONS, PRECISIONS, is_type_name, np_dtype
from kiln.ir.layers import INT64, LAYER_KINDS, attrs_problem, outputs_problem, plugin_record_problem

MAX_DEPTH = 100     # JSON nesting levels: five per subgraph level, so ~19 levels of nested control flow
_PLAN_KEYS = {"inputs", "outputs", "layers", "tensors", "weights", "outer"}
_LAYER_KEYS = {"name", "kind", "inputs", "outputs", "attrs", "origin", "precision", "tactic", "host",
               "bucket_tactics", "threads"}
LAYER_THREADS = ("one", "all")      # a CPU layer's thread count measured at build (kiln.builder.tactics.select_threads)
MAX_BUCKETS = 16    # points per profile in a bucket table


class _Bad(Exception):
    """A schema violation; its message is a phrase naming the field."""


def header_problem(header: Any, weights: Mapping[str, Any] | None = None, w_len: int | None = None) -> str | None:
    """The first way ``header`` breaks the engine schema (a phrase), or None.

    A file's header carries its weight table, checked against the weights section of ``w_len``
    bytes; an in-memory engine's header has none and its plan is checked against ``weights``.
    """
    try:
        _header(header, weights, w_len)
    except _Bad as exc:
        return str(exc)
    return None


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether lists/dicts nest more than ``limit`` levels (checked level by level, without recursion)."""
    level, depth = [value] if isinstance(value, (dict, list, tuple)) else [], 1
    while level:
        if depth > limit:
            return True
        below = []
        for v in level:
            for c in (v.values() if isinstance(v, dict) else v):
                if isinstance(c, (dict, list, tuple)):
                    below.append(c)
        level, depth = below, depth + 1
    return False


# ---- small checkers ---------------------------------------------------------------------------------

def _need(ok: bool, why: str) -> None:
    if not ok:
        raise _Bad(why)


def _table(v: Any, what: str, keys: set[str] | None = None, required: Iterable[str] = ()) -> dict:
    _need(isinstance(v, dict), f"{what} is not a table")
    if keys is not None:
        extra = [k for k in v if k not in keys]
        if extra:
            raise _Bad(f"{what} has unknown key {str(extra[0])[:40]!r}")
    missing = [k for k in required if k not in v]
    if missing:
        raise _Bad(f"{what} lacks {missing[0]!r}")
    return v


def _opt(v: dict, key: str, types: tuple, what: str) -> None:
    """``v[key]``, when present, is one of ``types`` (bool is not an int here)."""
    x = v.get(key)
    if key in v and not (isinstance(x, types) and not (isinstance(x, bool) and bool not in types)):
        raise _Bad(f"{what} {key!r} must be {' or '.join('null' if t is type(None) else t.__name__ for t in types)}, "
                   f"got {type(x).__name__}")


def _is_int(v: Any, lo: int = INT64[0]) -> bool:
    return type(v) is int and lo <= v <= INT64[1]


def _strs(v: Any, what: str) -> list:
    _need(isinstance(v, list) and all(isinstance(x, str) for x in v), f"{what} is not a list of names")
    return v


def _dims(v: Any, what: str) -> None:
    """A shape: None (unknown rank) or dims that are ints ≥ 0, names (dynamic) or None (unknown)."""
    if v is None:
        return
    if not (isinstance(v, list) and all(d is None or isinstance(d, str) or _is_int(d, 0) for d in v)):
        raise _Bad(f"{what} shape must be a list of dims (ints >= 0, names or null), got {str(v)[:60]}")
    if math.prod(d for d in v if type(d) is int) > INT64[1]:
        raise _Bad(f"{what} shape {str(v)[:60]} holds more than 2**63 elements")


# ---- the header ---------------------------------------------------------------------------------------

def _header(h: Any, weights: Mapping[str, Any] | None, w_len: int | None) -> None:
    _table(h, "header", required=("plan", "device", "precision"))
    _need(not too_deep(h), f"header nests deeper than {MAX_DEPTH} levels")
    _opt(h, "name", (str, type(None)), "header")
    _need(h["precision"] in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got "
                                        f"{str(h['precision'])[:20]!r}")
    _device(h["device"])
    if "memory" in h:
        mem = _table(h["memory"], "memory section")
        for key in ("weights_bytes", "peak_activation_bytes"):
            _need(key not in mem or _is_int(mem[key], 0), f"memory {key!r} must be an int >= 0")
    if "build" in h:
        _build(h["build"])
    if "plugins" in h:
        _need(isinstance(h["plugins"], list) and not any(plugin_record_problem(r) for r in h["plugins"]),
              "plugin list is malformed")
    if w_len is not None:
        keys = set(_weight_table(h.get("weights", {}), w_len))
    else:
        keys = set(weights or {})
    table = h.get("buckets")
    inputs = _plan(h["plan"], set(), keys, "plan", buckets=len(table) if isinstance(table, list) else 0)
    _profiles(h.get("profiles", []), inputs)
    if "buckets" in h:
        _buckets(table, h.get("profiles", []))


def _device(dev: Any) -> None:
    _table(dev, "device fingerprint", required=("kind", "name", "arch"))
    for key in ("kind", "name", "arch"):
        _need(isinstance(dev[key], str) and dev[key], f"device fingerprint {key!r} must be a non-empty string")
    for key in ("kiln", "torch", "cuda", "cudnn", "compute_capability"):
        _opt(dev, key, (str, type(None)), "device fingerprint")


def _build(b: Any) -> None:
    _table(b, "build section")
    _opt(b, "seconds", (int, float), "build section")
    _opt(b, "optimization_level", (int,), "build section")
    _opt(b, "cuda_graph", (bool,), "build section")
    _need("cpu_threads" not in b or (_is_int(b["cpu_threads"], 1) and b["cpu_threads"] <= 4096),
          "build section 'cpu_threads' must be an int from 1 to 4096")
    for key in ("source", "command"):
        _opt(b, key, (str, type(None)), "build section")
    if "fp32_layers" in b:
        _strs(b["fp32_layers"], "build section 'fp32_layers'")
    if "timing_cache" in b:
        tc = _table(b["timing_cache"], "build section 'timing_cache'")
        _need(all(_is_int(v, 0) for v in tc.values()), "build section 'timing_cache' counts must be ints >= 0")


def _weight_table(table: Any, w_len: int) -> dict:
    _need(isinstance(table, dict), "weight table is malformed")
    for key, info in table.items():
        try:
            _table(info, "weight entry", {"dtype", "shape", "offset", "nbytes"}, ("dtype", "shape", "offset", "nbytes"))
            dt = np_dtype(info["dtype"]) if info["dtype"] in ALL_TYPES else None
            shape = info["shape"]
            ok = dt is not None and not dt.hasobject and isinstance(shape, list) and all(_is_int(d, 0) for d in shape)
            off, nb = info["offset"], info["nbytes"]
            ok = ok and _is_int(off) and _is_int(nb)
        except Exception:
            ok = False
        _need(ok, f"weight {key!r} has a malformed entry")
        n = math.prod(shape) * dt.itemsize      # Python ints: no int64 wrap-around to a "valid" size
        _need(n == nb and off >= 0 and off + nb <= w_len, f"weight {key!r} lies outside the weights section")
    return table


def _profiles(profiles: Any, inputs: dict[str, Any]) -> None:
    _need(isinstance(profiles, list), "optimization profiles are malformed")
    for i, p in enumerate(profiles):
        _table(p, f"optimization profile {i}")
        for name, r in p.items():
            what = f"optimization profile {i} for {str(name)[:40]!r}"
            _need(name in inputs, f"{what} names no input of the plan")
            _table(r, what, {"min", "opt", "max"}, ("min", "opt", "max"))
            lo, opt, hi = r["min"], r["opt"], r["max"]
            _need(all(isinstance(s, list) and all(_is_int(d, 0) for d in s) for s in (lo, opt, hi)),
                  f"{what} needs min/opt/max lists of ints >= 0")
            _need(len(lo) == len(opt) == len(hi), f"{what} has min/opt/max of different ranks")
            _need(all(a <= b <= c for a, b, c in zip(lo, opt, hi)), f"{what} needs min <= opt <= max in every dim")
            _need(math.prod(hi) <= INT64[1], f"{what} max shape holds more than 2**63 elements")
            shape = inputs[name]
            if shape is not None:
                _need(len(shape) == len(lo), f"{what} has rank {len(lo)} but the input has rank {len(shape)}")
                _need(all(not isinstance(d, int) or a <= d <= c for d, a, c in zip(shape, lo, hi)),
                      f"{what} does not hold the input's static dims {shape}")


def _buckets(table: Any, profiles: list) -> None:
    """Check the bucket table against the (checked) profiles."""
    _need(isinstance(table, list) and 0 < len(table) <= MAX_BUCKETS * len(profiles),
          f"bucket table must be a list of 1 to {MAX_BUCKETS} points per optimization profile")
    maxed = set()
    for j, b in enumerate(table):
        what = f"bucket {j}"
        _table(b, what, {"profile", "shapes"}, ("profile", "shapes"))
        i = b["profile"]
        _need(_is_int(i, 0) and i < len(profiles), f"{what} names no optimization profile")
        prof, shapes = profiles[i], b["shapes"]
        _need(isinstance(shapes, dict) and set(shapes) == set(prof),
              f"{what} must give a shape for each input of profile {i}, and only those")
        for name, dims in shapes.items():
            lo, hi = prof[name]["min"], prof[name]["max"]
            _need(isinstance(dims, list) and len(dims) == len(lo) and all(_is_int(d, 0) for d in dims),
                  f"{what} shape for {str(name)[:40]!r} must be a list of ints >= 0 of the profile's rank")
            _need(all(a <= d <= c for a, d, c in zip(lo, dims, hi)),
                  f"{what} shape {dims} for {str(name)[:40]!r} lies outside profile {i}")
        if all(dims == prof[name]["max"] for name, dims in shapes.items()):
            maxed.add(i)
    _need(maxed == set(range(len(profiles))), "bucket table lacks some profile's max shapes")


def _tactic_names(v: Any, n: int, what: str) -> None:
    _need(n > 0, f"{what} has bucket tactics, but the engine has no bucket table for them")
    _need(isinstance(v, list) and len(v) == n and all(isinstance(t, str) and 0 < len(t) <= 64 and t.isascii()
                                                     and (t.replace("_", "").isalnum() and t == t.lower()) for t in v),
          f"{what} bucket tactics must be {n} tactic names, one per bucket")


# ---- plans, layers ------------------------------------------------------------------------------------

def _io(entries: Any, what: str) -> dict[str, Any]:
    _need(isinstance(entries, list), f"plan {what} are malformed")
    out = {}
    for t in entries:
        _table(t, f"plan {what[:-1]} entry", {"name", "dtype", "shape"}, ("name", "dtype", "shape"))
        _need(isinstance(t["name"], str), f"plan {what} are malformed")
        _need(is_type_name(t["dtype"], strings=False),
              f"plan {what[:-1]} {t['name'][:40]!r} has unknown data type {str(t['dtype'])[:40]!r}")
        _dims(t["shape"], f"plan {what[:-1]} {t['name'][:40]!r}")
        out[t["name"]] = t["shape"]
    return out


def _body_arity(kind: str, attrs: dict, layer: dict) -> str | None:
    """How a layer's bodies (control flow, ShapeConstant) disagree with its own inputs and outputs (a phrase), or None."""
    def io(name: str) -> tuple[int, int]:
        plan = attrs[name]["__graph__"]
        return len(plan["inputs"]), len(plan["outputs"])
    n_out = len(layer["outputs"])
    if kind == "If":
        for branch in ("then_branch", "else_branch"):
            if branch in attrs and io(branch) != (0, n_out):
                return f"{branch} takes {io(branch)[0]} inputs and gives {io(branch)[1]} outputs; the layer needs 0 and {n_out}"
    elif kind == "Loop" and "body" in attrs:
        n_in = attrs.get("num_inputs", len(layer["inputs"]))
        carried = n_in - 2
        b_in, b_out = io("body")
        if carried < 0 or b_in != 2 + carried or b_out != 1 + n_out or n_out < carried:
            return (f"body takes {b_in} inputs and gives {b_out} outputs, which does not match {carried} carried values "
                    f"and {n_out} layer outputs")
    elif kind == "Scan" and "body" in attrs and io("body")[1] != n_out:
        return f"body gives {io('body')[1]} outputs; the layer has {n_out}"
    elif kind == "ShapeConstant" and "body" in attrs \
            and io("body") != (attrs.get("num_inputs", len(layer["inputs"])), n_out):
        return (f"body takes {io('body')[0]} inputs and gives {io('body')[1]} outputs; the layer has "
                f"{attrs.get('num_inputs', len(layer['inputs']))} and {n_out}")
    return None


def _plan(plan: Any, outer: set[str], weight_keys: set[str], where: str, body: bool = False,
          buckets: int = 0) -> dict[str, Any]:
    """Check a plan (the top level or a subgraph body, which sees only ``outer``); returns its inputs' shapes.
    ``buckets``: the length of the engine's bucket table (a body's layers have no bucket tactics)."""
    _need(isinstance(plan, dict), f"{where} is not a table")
    _table(plan, where, _PLAN_KEYS, ("inputs", "outputs", "layers"))
    inputs, outputs = _io(plan["inputs"], "inputs"), _io(plan["outputs"], "outputs")
    plan_weights = plan.get("weights", {})
    _need(isinstance(plan_weights, dict) and all(isinstance(v, str) for v in plan_weights.values()),
          "plan weight or tensor table is malformed")
    missing = [k for k in plan_weights.values() if k not in weight_keys]
    if missing:
        raise _Bad(f"plan names weight {missing[0][:40]!r}, which the file does not hold")
    tensors = plan.get("tensors", {})
    _need(isinstance(tensors, dict), "plan weight or tensor table is malformed")
    for name, t in tensors.items():
        what = f"tensor {name[:40]!r}"
        _table(t, what, {"shape", "dtype", "host"})
        _dims(t.get("shape"), what)
        if "dtype" in t and not is_type_name(t["dtype"]):
            raise _Bad(f"{what} has unknown data type {str(t['dtype'])[:40]!r}")
        _opt(t, "host", (bool,), what)
    names = set(_strs(plan.get("outer", []), "plan outer names"))
    defined = outer | set(plan_weights) | set(inputs) | (names & outer if body else names)
    _need(isinstance(plan["layers"], list), "plan has no layer list")
    for layer in plan["layers"]:
        _layer(layer, defined, weight_keys, buckets)
    ghost = [n for n in outputs if n not in defined]
    if ghost:
        raise _Bad(f"plan output {ghost[0][:40]!r} is produced by no layer")
    return inputs


def _layer(layer: Any, defined: set[str], weight_keys: set[str], buckets: int) -> None:
    if not (isinstance(layer, dict) and isinstance(layer.get("name"), str) and isinstance(layer.get("kind"), str)
            and isinstance(layer.get("inputs"), list) and isinstance(layer.get("outputs"), list)
            and all(n is None or isinstance(n, str) for n in layer["inputs"])
            and all(isinstance(n, str) for n in layer["outputs"])):
        raise _Bad(f"layer entry {str(layer)[:60]!r} is malformed")
    name, kind = layer["name"][:60], layer["kind"]
    what = f"layer {name!r} ({kind[:40]})"
    _table(layer, what, _LAYER_KEYS)
    spec = LAYER_KINDS.get(kind)
    if spec is None:
        raise _Bad(f"layer {name!r} has unknown kind {kind[:40]!r}")
    if layer.get("precision") is not None and layer["precision"] not in LAYER_PRECISIONS:
        raise _Bad(f"{what} precision must be one of {', '.join(LAYER_PRECISIONS)}")
    _opt(layer, "tactic", (str, type(None)), what)
    _opt(layer, "host", (bool,), what)
    if "bucket_tactics" in layer:
        _tactic_names(layer["bucket_tactics"], buckets, what)
    if "threads" in layer and layer["threads"] not in LAYER_THREADS:
        raise _Bad(f"{what} 'threads' must be one of {', '.join(map(repr, LAYER_THREADS))}, got "
                   f"{str(layer['threads'])[:20]!r}")
    if "origin" in layer:
        _strs(layer["origin"], f"{what} origin")
    attrs = layer.get("attrs", {})

    # a body sees only the outer values its layer passes in (attrs "outer"), as the runtime runs it
    passed = attrs.get("outer", []) if isinstance(attrs, dict) else []
    if not (isinstance(passed, list) and all(isinstance(n, str) for n in passed)):
        raise _Bad(f"{what} attribute 'outer' must be a list of tensor names, got {str(passed)[:40]}")
    visible = set(passed)

    def subplan(sub: Any) -> str | None:
        try:
            _plan(sub, visible, weight_keys, "subgraph plan", body=True)
        except _Bad as exc:
            return f"holds a subgraph whose {exc}"
        return None
    why = attrs_problem(kind, attrs, encoded=True, subplan=subplan)
    if why is not None:
        raise _Bad(f"{what} {why}")
    why = _body_arity(kind, attrs, layer) or outputs_problem(kind, attrs, len(layer["outputs"]))
    if why is not None:
        raise _Bad(f"{what} {why}")
    ins = layer["inputs"]
    own = attrs.get("num_inputs")
    own = len(ins) if own is None else own
    if not spec.min_inputs <= own <= min(spec.max_inputs, len(ins)):
        raise _Bad(f"{what} has {own} inputs of {len(ins)}; its kind takes {spec.min_inputs} to {spec.max_inputs}")
    if ("outer" in attrs or "num_inputs" in attrs) and ins[own:] != list(attrs.get("outer") or []):
        raise _Bad(f"{what} inputs do not end with its outer names")
    empty = [i for i in range(spec.min_inputs) if ins[i] is None and i not in spec.optional_inputs]
    if empty:
        raise _Bad(f"{what} input {empty[0]} is empty, but its kind needs it")
    missing = [n for n in ins if n is not None and n not in defined]
    if missing:
        raise _Bad(f"layer {name!r} reads {missing[0][:40]!r}, which nothing before it produces")
    defined.update(layer["outputs"])
