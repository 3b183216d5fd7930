"""The builder: Network + BuildConfig → Engine, in four stages (parse is before us).

passes (shape inference, folding, fusion) → precision and placement → tactic
choice per layer → the plan, a JSON-able description plus a weight table, which
``kiln.engine`` serializes and ``kiln.runtime`` executes.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, NamedTuple

import numpy as np

from kiln.builder.autopad import resolve as resolve_auto_pads
from kiln.builder.buckets import timing_points
from kiln.builder.config import BuildConfig, Profile
from kiln.builder.memory import check_fits, check_inputs
from kiln.builder.placement import host_layers, is_host_constant
from kiln.builder.precision import absorb_input_casts, assign_precision
from kiln.builder.shapes import SYMBOL_RANGES, infer_shapes
from kiln.builder.tactics import TimingCache, select_tactics
from kiln.errors import BuildError
from kiln.ir.layers import LAYER_KINDS, VARIADIC
from kiln.ir.network import Network, gc_paused, outer_reads
from kiln.ir.verify import verify
from kiln.kernels import KernelContext, tactics_for
from kiln.kernels.ort_island import require_fallback
from kiln.passes import default_passes, fusion_passes, quantization_passes
from kiln.passes.base import PassManager
from kiln.passes.fold_qdq import RecordQuantizedConstants, label_quantized

Progress = Callable[[str, float], None]


class Prepared(NamedTuple):
    """A network made ready for tactic selection, and what the build learned on the way."""

    net: Network
    device: str
    profiles: list[Profile]
    biggest: dict[str, tuple[int, ...]]     # each input at its largest profile shape
    peak: int                               # bytes of live activations at those shapes


def prepare(network: Network, config: BuildConfig, progress: Progress | None = None) -> Prepared:
    """Every step of a build before tactics are timed, on a copy of ``network``: profiles applied and
    checked, shapes inferred, auto_pad resolved, the passes, precision assignment, and the memory the
    engine needs checked against the device. ``kiln check`` runs it to find what a build would refuse."""
    require_fallback(network, config.fallback)
    device = config.resolved_device()
    say = progress or (lambda stage, frac: None)
    say("passes", 0.0)
    net = copy.deepcopy(network)
    profiles = config.profile_list()
    _apply_profiles(net, profiles)
    biggest = {t.name: _profile_shape(t, profiles, 2) for t in net.inputs}
    check_inputs(net, biggest, device)
    verify(net)
    infer_shapes(net)
    resolve_auto_pads(net)
    fold = folds_quantization(device, config)
    if fold:
        RecordQuantizedConstants()(net)
    PassManager(default_passes(), on_pass=lambda name: say("passes", 0.3))(net)
    net.toposort()
    infer_shapes(net)
    if config.optimization_level > 0:
        PassManager(fusion_passes(device), on_pass=lambda name: say("passes", 0.7))(net)
        net.toposort()
        infer_shapes(net)
    if fold:
        PassManager(quantization_passes(), on_pass=lambda name: say("passes", 0.9))(net)
        net.toposort()
        infer_shapes(net)
    say("tactics", 0.0)
    assign_precision(net, config.precision, config.fp32_layers)
    if fold:
        label_quantized(net, config.precision)
    if device == "cuda" and config.precision in ("fp16", "bf16"):
        absorb_input_casts(net)
    net.toposort()
    infer_shapes(net)
    _keep_declared_dtypes(network, net)
    peak = check_fits(net, biggest, device, sum(t.value.nbytes for t in net.constants()))
    if config.workspace is not None and peak > config.workspace:
        raise BuildError(f"The network needs {peak / 2**20:.1f} MB of activations at the largest profile shapes "
                         f"({_fmt_shapes(biggest)}) but the workspace limit is {config.workspace / 2**20:.1f} MB; "
                         f"raise --workspace or lower --max-shapes.")
    return Prepared(net, device, profiles, biggest, peak)


def folds_quantization(device: str, config: BuildConfig) -> bool:
    """Whether the build folds Q/DQ patterns into 8-bit layers (passes/fold_qdq.py): on the GPU, where their
    8-bit kernels run, at optimization levels above 0. CPU engines run Q/DQ layers dequantized."""
    return device == "cuda" and config.optimization_level > 0


def build(network: Network, config: BuildConfig | None = None, progress: Progress | None = None):
    """Optimize ``network`` for the configured device and return a runnable Engine."""
    config = config or BuildConfig()
    t0 = time.perf_counter()
    say = progress or (lambda stage, frac: None)
    if config.quantize:
        from kiln.builder.quant import quantize
        network = quantize(network, config, say)
    with gc_paused():
        return _build(network, config, say, t0)


def _build(network: Network, config: BuildConfig, say: Progress, t0: float):
    from kiln.engine.device import fingerprint
    from kiln.runtime.engine import Engine

    net, device, profiles, biggest, peak = prepare(network, config, say)
    fp = fingerprint(device)
    opt = {t.name: _profile_shape(t, profiles, 1) for t in net.inputs}
    cache = TimingCache(config.timing_cache)
    points, default, buckets = timing_points(profiles, opt)
    sel = select_tactics(net, device, config.optimization_level, points, cache,
                         f"{fp['name']}/{fp.get('compute_capability')}", host_layers(net), default)
    cache.save()
    weights: dict[str, np.ndarray] = {}
    plan = _plan(net, device, config, weights, counter=[0], chosen=sel.chosen, by_point=sel.by_point,
                 threads=sel.threads)
    say("tactics", 1.0)
    header = {
        "name": network.name,
        "precision": config.precision,
        "device": fp,
        "memory": {"weights_bytes": int(sum(w.nbytes for w in weights.values())), "peak_activation_bytes": peak},
        "profiles": [p.to_json() for p in profiles],
        **({"buckets": buckets} if sel.by_point else {}),
        "build": {"seconds": round(time.perf_counter() - t0, 3), "optimization_level": config.optimization_level,
                  "source": network.metadata.get("source"), "cuda_graph": config.cuda_graph,
                  "timing_cache": {"hits": cache.hits, "misses": cache.misses},
                  "fp32_layers": list(config.fp32_layers),
                  **({"quantization": {"mode": config.quantize, "calibrator": config.calibrator,
                                       "fp16_layers": list(config.fp16_layers),
                                       **network.metadata.get("quantization", {})}} if config.quantize else {})},
        "plan": plan,
    }
    engine = Engine(header, weights)
    if device == "cpu":
        from kiln.builder.threads import choose_threads
        from kiln.kernels.cpu_threads import threads_overridden, usable_cores
        choice = None if threads_overridden() else choose_threads(engine, usable_cores())
        if choice is not None:
            engine.header["build"]["cpu_threads"] = choice
    return engine


def _apply_profiles(net: Network, profiles: list[Profile]) -> None:
    """Make dims static where every profile fixes them; check dynamic inputs are covered."""
    for t in net.inputs:
        dims = list(t.shape or ())
        ranges = [p.shapes[t.name] for p in profiles if t.name in p.shapes]
        dynamic = [i for i, d in enumerate(dims) if not isinstance(d, int)]
        if ranges:
            for r in ranges:
                if len(r[0]) != len(dims):
                    raise BuildError(f"Profile for input {t.name!r} has rank {len(r[0])} but the input has rank "
                                     f"{len(dims)} ({_fmt(dims)}).")
                for i, d in enumerate(dims):
                    if isinstance(d, int) and not (r[0][i] == r[2][i] == d):
                        raise BuildError(f"Profile for input {t.name!r} sets dim {i} to {r[0][i]}..{r[2][i]} but the "
                                         f"model fixes it at {d}.")
            for i in dynamic:
                lo = {r[0][i] for r in ranges} | {r[2][i] for r in ranges}
                if len(lo) == 1:
                    dims[i] = lo.pop()
                elif isinstance(dims[i], str):
                    net.metadata.setdefault(SYMBOL_RANGES, {}).setdefault(dims[i], [ranges[0][0][i], ranges[0][2][i]])
            t.shape = tuple(dims)
        elif dynamic:
            raise BuildError(
                f"Input {t.name!r} has dynamic dims {_fmt(dims)} and no optimization profile covers it; pass "
                f"profiles={{{t.name!r}: (min, opt, max)}} to BuildConfig or --shapes {t.name}:"
                f"{'x'.join(str(d) if isinstance(d, int) and d > 0 else '1' for d in dims)} to kiln build.")
    for p in profiles:
        for name in p.shapes:
            if not any(t.name == name for t in net.inputs):
                raise BuildError(f"Profile names input {name!r}, which the network does not have; inputs are "
                                 f"{[t.name for t in net.inputs]}.")


def _fmt(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _keep_declared_dtypes(orig: Network, net: Network) -> None:
    for t in net.inputs:
        o = orig.tensors.get(t.name)
        if o is not None:
            t.dtype = o.dtype


def _profile_shape(t, profiles: list[Profile], which: int) -> tuple[int, ...]:
    """The input's opt (1) or max (2) shape over the profiles; static dims as they are."""
    for p in profiles:
        if t.name in p.shapes:
            return tuple(p.shapes[t.name][which])
    return tuple(d if isinstance(d, int) else 1 for d in (t.shape or ()))


def _fmt_shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{n}:{'x'.join(map(str, s))}" for n, s in shapes.items())


def _plan(net: Network, device: str, config: BuildConfig, weights: dict[str, np.ndarray], counter: list[int],
          outer: list[str] | None = None, chosen: dict[int, str] | None = None,
          by_point: dict[int, list[str]] | None = None, threads: dict[int, str] | None = None) -> dict[str, Any]:
    hosts = host_layers(net) if device != "cpu" else set()
    layers = []
    plan_weights: dict[str, str] = {}
    tensors: dict[str, Any] = {}

    def weight(t) -> None:
        if t.name in plan_weights:
            return
        key = f"w{counter[0]}"
        counter[0] += 1
        weights[key] = np.require(t.value, requirements="C")   # keeps 0-d weights 0-d
        plan_weights[t.name] = key

    for layer in net.layers:
        ins = [t.name if t is not None else None for t in layer.inputs]
        for t in layer.inputs:
            if t is not None and t.is_constant and t.network is net:
                weight(t)
        attrs = {}
        extra_ins: list[str] = []
        for k, v in layer.attrs.items():
            if isinstance(v, Network):
                reads = [r.name for r in outer_reads(v)]
                for r in outer_reads(v):
                    if r.is_constant and r.network is net:
                        weight(r)
                extra_ins += [r for r in reads if r not in extra_ins]
                attrs[k] = {"__graph__": _plan(v, device, config, weights, counter, outer=reads, chosen=chosen)}
            else:
                attrs[k] = encode_attr(v)
        if extra_ins:
            attrs["outer"] = extra_ins
            attrs["num_inputs"] = len(ins)
        elif _splits_outer(layer.kind):
            attrs["outer"] = []
            attrs["num_inputs"] = len(ins)
        on_host = id(layer) in hosts
        ctx = KernelContext(device="cpu" if on_host else device, precision=layer.precision or config.precision,
                            layer_name=layer.name,
                            input_dtypes=tuple(t.dtype if t is not None else None for t in layer.inputs))
        candidates = tactics_for(layer.kind, layer.attrs, ctx)
        if not candidates:
            raise BuildError(f"Layer {layer.name!r} ({layer.kind}) has no implementation on {device}; "
                             f"build for another device or replace the layer with a plugin.")
        layer.tactic = (chosen or {}).get(id(layer), candidates[0].name)
        layers.append({"name": layer.name, "kind": layer.kind, "inputs": ins + extra_ins,
                       "outputs": [t.name for t in layer.outputs], "attrs": attrs, "origin": layer.origin,
                       "precision": layer.precision, "tactic": layer.tactic, "host": on_host,
                       **({"bucket_tactics": by_point[id(layer)]} if id(layer) in (by_point or {}) else {}),
                       **({"threads": threads[id(layer)]} if id(layer) in (threads or {}) else {})})
        for t in layer.outputs:
            tensors[t.name] = {"shape": _jdims(t.shape), "dtype": t.dtype, "host": on_host}
    for t in net.outputs:
        if t.is_constant:
            weight(t)
    for t in net.tensors.values():
        if t.is_constant and t.name in plan_weights:
            tensors[t.name] = {"shape": list(t.value.shape), "dtype": t.dtype, "host": is_host_constant(t)}
    for t in net.inputs:
        tensors[t.name] = {"shape": _jdims(t.shape), "dtype": t.dtype, "host": False}
    return {
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": _jdims(t.shape)} for t in net.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": _jdims(t.shape)} for t in net.outputs],
        "layers": layers, "tensors": tensors, "weights": plan_weights, "outer": outer or [],
    }


def _splits_outer(kind: str) -> bool:
    """A control-flow kind with any number of inputs: its kernel finds its own inputs among the outer
    ones by ``num_inputs``, so the plan states it even when the body reads nothing outside."""
    spec = LAYER_KINDS[kind]
    return spec.control_flow and spec.max_inputs >= VARIADIC


def _jdims(shape) -> list | None:
    return None if shape is None else [d if isinstance(d, (int, str)) or d is None else int(d) for d in shape]


def encode_attr(v: Any) -> Any:
    """Plan attrs are JSON: arrays become tagged dicts, plugins become their records."""
    if v is None or isinstance(v, (str, bool, int, float)) and not isinstance(v, np.generic):
        return v
    from kiln.plugins.base import Plugin
    if isinstance(v, Plugin):
        return {"__plugin__": v.record()}
    if isinstance(v, np.ndarray) or isinstance(v, np.generic):
        a = np.asarray(v)
        if a.dtype == object:
            return {"__array__": {"dtype": "object", "shape": list(a.shape), "data": [str(x) for x in a.reshape(-1)]}}
        data = a.astype(np.float64 if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a.dtype).reshape(-1)
        return {"__array__": {"dtype": a.dtype.name, "shape": list(a.shape), "data": data.tolist()}}
    if isinstance(v, (list, tuple)):
        return [encode_attr(x) for x in v]
    if isinstance(v, dict):
        return {k: encode_attr(x) for k, x in v.items()}
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


