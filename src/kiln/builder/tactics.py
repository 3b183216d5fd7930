"""Tactic selection: time each candidate implementation on this device, keep the fastest.

Only layers with more than one valid tactic are timed, on their real shapes (the
profile's opt shapes), their real weights and random activations. Results go to a
timing cache keyed by device, layer signature, shapes and dtypes, so a rebuild
skips every layer it has already measured.
"""
from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from kiln.builder.shapes import UNKNOWN, evaluate
from kiln.builder.timing_cache import TimingCache
from kiln.ir.layers import LAYER_KINDS
from kiln.ir.network import Network
from kiln.kernels import KernelContext, tactics_for

def _sig(attrs: dict[str, Any]) -> str:
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in sorted(v.items())}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (int, float, str, bool)) or v is None:
            return v
        return type(v).__name__
    return json.dumps(clean(attrs), sort_keys=True)


def _time_cpu(fn, args, reps: int) -> float:
    """Median wall-clock milliseconds of one call of ``fn`` on the CPU, after two warm-up calls."""
    for _ in range(2):
        fn(*args)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _time(fn, args, reps: int) -> float:
    """Median GPU milliseconds of one call of ``fn``, as the engine will run it: replayed from a CUDA
    graph, so the host's launch overhead (which graph replay removes) does not pick the tactic.
    Calls that cannot be captured (host synchronization, allocation-free violations) are timed
    eagerly instead."""
    for _ in range(3):
        fn(*args)
    try:
        per_graph = 5
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(per_graph):
                fn(*args)
        run, scale = graph.replay, per_graph
        run()
    except Exception:               # not capturable: eager launches
        torch.cuda.synchronize()
        run, scale = (lambda: fn(*args)), 1
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / scale)
    return float(np.median(times))


# How far a candidate may stray from the reference tactic (relative L2), per layer precision.
# The reference accumulates in FP32; a low-precision candidate may differ by its output rounding
# (~3e-4 for FP16, ~2e-3 for BF16) but not by an FP16 accumulation over a long dot product,
# which the numerics contract rules out.
AGREE_TOL = {"fp32": 1e-5, "tf32": 2e-3, "fp16": 2e-3, "bf16": 1e-2}


def _agree(outs, ref, precision: str) -> bool:
    tol = AGREE_TOL.get(precision.split()[0], 1e-2)
    for a, b in zip(outs, ref):
        if a.shape != b.shape:
            return False
        den = float(b.norm()) or 1.0
        if not float((a - b).norm()) <= tol * den + 1e-6:
            return False
    return True


def _channels_last_at_runtime(t, a: torch.Tensor) -> bool:
    """Whether the engine will hand this input over in channels-last memory: 4-D FP16/BF16 outputs of
    the kinds flagged ``channels_last`` in kiln.ir.layers make on the GPU are, so tactics are timed on that layout."""
    return (a.is_cuda and a.dim() == 4 and a.dtype in (torch.float16, torch.bfloat16)
            and t.producer is not None and LAYER_KINDS[t.producer.kind].channels_last)


class _PluginTactic:
    """One of a plugin's implementations, shaped like a registry Tactic for timing."""

    def __init__(self, name: str) -> None:
        self.name = name

    def make(self, attrs, ctx):
        from kiln.kernels.plugin import make_plugin
        return make_plugin({**attrs, "plugin_tactic": self.name}, ctx)


def _plugin_candidates(layer, device: str) -> list:
    plugin = layer.attrs.get("plugin")
    if plugin is None or getattr(plugin, "data_dependent_shapes", False):
        return []
    return [_PluginTactic(n) for n in plugin.tactics.get(device, ())]


def at_level(cands: list, level: int) -> list:
    """The candidates an optimization level times (levels 4-5 add the alternative tile tables)."""
    return [c for c in cands if c.min_level <= level]


def select_tactics(net: Network, device: str, level: int, opt_shapes: dict[str, tuple[int, ...]],
                   cache: TimingCache, device_name: str, hosts: set[int]) -> dict[int, str]:
    """Choose a tactic per layer; returns id(layer) → tactic name for the timed layers."""
    chosen: dict[int, str] = {}
    if level == 0:
        return chosen
    timed = []
    for layer in net.layers:
        if id(layer) in hosts:
            continue
        ctx = KernelContext(device=device, precision=layer.precision or "fp32", layer_name=layer.name,
                            input_dtypes=tuple(t.dtype if t is not None else None for t in layer.inputs))
        cands = tactics_for(layer.kind, layer.attrs, ctx)
        if layer.kind == "Plugin":
            cands = _plugin_candidates(layer, device)
        else:
            cands = at_level(cands, level)
        if len(cands) > 1:
            timed.append((layer, cands))
    if not timed:
        return chosen
    vals = evaluate(net, opt_shapes)
    if device == "cpu":       # CPU tactics are timed, and their times cached, per thread count engines run on
        from kiln.kernels.cpu_threads import default_threads, use_threads
        use_threads(default_threads())
        device_name = f"{device_name}/{default_threads()} threads"
    reps = 10 if level <= 3 else 30
    for layer, cands in timed:
        ins = []
        ok = True
        for t in layer.inputs:
            if t is None:
                ins.append(None)
                continue
            if t.is_constant:
                arr = t.value
                tt = torch.from_numpy(np.require(arr, requirements="C").view(np.int16)).view(torch.bfloat16) \
                    if arr.dtype.name == "bfloat16" else torch.from_numpy(np.require(arr, requirements="C"))
                ins.append(tt.to(device))
                continue
            v = vals.get(t.name, UNKNOWN)
            if v is UNKNOWN or not v.dtype.is_floating_point:
                ok = False
                break
            a = torch.randn(tuple(v.shape), dtype=torch.float32, device=device).to(v.dtype)
            if _channels_last_at_runtime(t, a):
                a = a.contiguous(memory_format=torch.channels_last)
            ins.append(a)
        if not ok:
            continue
        key = "|".join([device_name, layer.kind, _sig(layer.attrs),
                        ",".join("-" if a is None else f"{tuple(a.shape)}:{a.dtype}" + (":cl" if a.dim() == 4 and
                                 not a.is_contiguous() else "") for a in ins)])
        times = cache.get(key)
        if times is None or not all(c.name in times for c in cands):
            times = dict(times or {})
            reference = None
            for cand in cands:
                if cand.name in times:
                    continue
                ctx = KernelContext(device=device, precision=layer.precision or "fp32", layer_name=layer.name,
                                    output_dtypes=tuple(o.dtype for o in layer.outputs))
                try:
                    with torch.inference_mode():
                        fn = cand.make(layer.attrs, ctx)
                        outs = [o.float() for o in fn(*[a.clone() if a is not None else None for a in ins])]
                        if reference is None:
                            reference = outs
                        elif not _agree(outs, reference, layer.precision or "fp32"):
                            times[cand.name] = float("inf")      # a fast wrong kernel is no tactic
                            continue
                        times[cand.name] = (_time if device == "cuda" else _time_cpu)(fn, ins, reps)
                except Exception:
                    times[cand.name] = float("inf")      # not valid on these shapes
            cache.put(key, times)
        best = min(cands, key=lambda c: times.get(c.name, float("inf")))
        if times.get(best.name, float("inf")) < float("inf"):
            if layer.kind == "Plugin":
                layer.attrs["plugin_tactic"] = best.name      # the plugin's own implementation choice
            else:
                chosen[id(layer)] = best.name
    return chosen
