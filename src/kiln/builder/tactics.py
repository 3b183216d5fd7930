"""Tactic selection: time each candidate implementation on this device, keep the fastest.

Only layers with more than one valid tactic are timed, on their real shapes (each point of
each profile: kiln.builder.buckets), their real weights and random activations. A layer
whose fastest tactic differs between points keeps one per point (its bucket tactics).
On the CPU a layer's candidates are timed in interleaved rounds and judged by a low quantile of
their call times, so load from elsewhere on the machine does not pick the tactic; candidates within
CLOSE_MARGIN of the fastest get more rounds and a later one must win clearly more of them than an earlier one
(a sign test), a tie within CPU_TIE_MARGIN goes to the first registered, and a
small GEMM-like layer is timed on the one thread the runtime runs it on (``run_threads``). On more than one
thread, every layer's chosen tactic is then timed on one thread and on the engine's count, and the layer runs on
one thread unless that count is clearly faster (``select_threads``; a single-point build only).
Results go to a timing cache keyed by device, layer signature, shapes and dtypes, so a
rebuild skips every layer and shape it has already measured.
"""
from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from kiln.builder.shapes import UNKNOWN, evaluate
from kiln.builder.timing_cache import TimingCache
from kiln.ir.dtypes import from_numpy
from kiln.ir.layers import LAYER_KINDS
from kiln.ir.network import Network
from kiln.kernels import KernelContext, plain_first, tactics_for

log = logging.getLogger("kiln.tactics")     # DEBUG: why a candidate was not timed (its error, its disagreement)

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


# The quantile of a CPU candidate's per-call times that stands for its speed: a low one, because load from
# elsewhere on the machine only ever adds time to a call.
CPU_QUANTILE = 0.2


def _time_cpu(fn, args, reps: int) -> float:
    """Wall-clock milliseconds of the fastest of ``reps`` back-to-back calls of ``fn`` on the CPU."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def _time_cpu_interleaved(fns: list, args, reps: int) -> list[float]:
    """Milliseconds per call of each of ``fns`` (a layer's candidate tactics) on the CPU: ``interleaved_ms``."""
    return interleaved_ms(fns, args, reps)


def interleaved_ms(fns: list, args, reps: int) -> list[float]:
    """Milliseconds per call of each of ``fns`` on the CPU: two warm-up calls each, then ``reps`` rounds that
    time one call of every candidate, the order rotating, so that a load spike falls on all candidates alike;
    each gets the CPU_QUANTILE of its round times. Where several come within CLOSE_MARGIN of the fastest, those
    are timed again (``close_call_rounds``), judged on all their rounds, and a faster one that is not faster in
    clearly more of their shared rounds than an earlier one is reported no faster than it (``within_noise``). A
    candidate that raises gets infinity."""
    samples: list[list[float] | None] = []
    for fn in fns:
        try:
            fn(*args)
            fn(*args)
            samples.append([])
        except Exception:
            samples.append(None)
    start = time.perf_counter()
    _rounds(fns, args, samples, [i for i, s in enumerate(samples) if s is not None], reps)
    quantiles = [_quantile(s) for s in samples]
    close = _close_call(quantiles)
    if close:
        _rounds(fns, args, samples, close, *close_call_rounds(reps, time.perf_counter() - start))
        return within_noise(samples, [i for i in close if samples[i] is not None])
    return quantiles


def _quantile(s: list[float] | None) -> float:
    return float(np.quantile(s, CPU_QUANTILE)) if s else float("inf")


def _rounds(fns: list, args, samples: list, live: list[int], reps: int, budget_s: float = float("inf")) -> None:
    """``reps`` rounds (fewer once ``budget_s`` seconds have gone) that time one call of each of ``live`` in
    rotating order into ``samples``; a candidate that raises drops out (its samples become None)."""
    start = time.perf_counter()
    for r in range(reps if live else 0):
        if r and time.perf_counter() - start > budget_s:
            break
        for i in live[r % len(live):] + live[:r % len(live)]:
            if samples[i] is None:
                continue
            try:
                samples[i].append(_time_cpu(fns[i], args, 1))
            except Exception:
                samples[i] = None


# After the first rounds, candidates within CLOSE_MARGIN of the fastest (by CPU_QUANTILE) are a close call: they
# get CLOSE_ROUNDS times as many rounds again, for at most the first rounds' own time or CLOSE_MIN_S, whichever is
# longer (a tiny layer's extra rounds cost microseconds; a large one's at most doubles its timing).
CLOSE_MARGIN = 1.25
CLOSE_ROUNDS = 3
CLOSE_MIN_S = 0.02


def _close_call(quantiles: list[float]) -> list[int]:
    """The candidates (indices) within CLOSE_MARGIN of the fastest, where there are at least two; else none."""
    best = min(quantiles, default=float("inf"))
    if best == float("inf"):
        return []
    close = [i for i, q in enumerate(quantiles) if q <= CLOSE_MARGIN * best]
    return close if len(close) > 1 else []


# A later candidate less than NOISE_MARGIN faster (by CPU_QUANTILE) than an earlier one beats it only where it was
# also faster in at least half their shared rounds plus SIGN_Z standard deviations of a fair coin's count (a sign
# test; 2.0: about 2% one-sided): rounds time the candidates next to each other, so each round compares them under
# the same load. A larger lead stands on the quantiles alone, so noise costs a layer at most that margin.
SIGN_Z = 2.0
NOISE_MARGIN = 1.10


def clearly_faster(fast: list[float], slow: list[float]) -> bool:
    """Whether ``fast`` beats ``slow`` in clearly more than half of their rounds (the two lists' i-th entries are
    one round's times)."""
    n = min(len(fast), len(slow))
    wins = sum(f < s for f, s in zip(fast, slow))
    return n > 0 and wins >= n / 2 + SIGN_Z * math.sqrt(n) / 2


def within_noise(samples: list, close: list[int]) -> list[float]:
    """Each candidate's CPU_QUANTILE time; a close candidate (``close``: indices in registration order) whose time
    is below an earlier close one's, by less than NOISE_MARGIN, without being ``clearly_faster`` than it gets the
    first such one's time, so the tie rule keeps the earlier (preferred) tactic where load hides the difference."""
    times = [_quantile(s) for s in samples]
    for j, b in enumerate(close):
        for a in close[:j]:
            if times[b] < times[a] <= NOISE_MARGIN * times[b] and not clearly_faster(samples[b], samples[a]):
                times[b] = times[a]
                break
    return times


def close_call_rounds(reps: int, first_s: float) -> tuple[int, float]:
    """(extra rounds, their time budget in seconds) for a close call whose first ``reps`` rounds took ``first_s``."""
    return CLOSE_ROUNDS * reps, max(first_s, CLOSE_MIN_S)


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
# 8-bit codes (an 8-bit layer's, or a norm's codes output: passes/fold_qdq.py) at the 8-bit layers' tolerance
# whatever the layer's float precision: a value within float rounding of a rounding boundary may take the next code
CODES_TOL = 1e-2
_CODE_OUTPUTS = (torch.int8, torch.uint8, torch.float8_e4m3fn)


def _agree(outs, ref, precision: str, codes: list[bool] | None = None, who: str = "") -> bool:
    """Whether outputs ``outs`` (float) are within the precision's relative L2 of ``ref``; ``codes`` marks the
    outputs that are 8-bit codes. A disagreement is logged (``kiln.tactics``, DEBUG) with ``who``."""
    tol = AGREE_TOL.get((precision.split() or ["fp32"])[0], 1e-2)
    for i, (a, b) in enumerate(zip(outs, ref)):
        if a.shape != b.shape:
            log.debug("%s: output %d has shape %s, the reference %s", who, i, tuple(a.shape), tuple(b.shape))
            return False
        den = float(b.norm()) or 1.0
        bound = max(tol, CODES_TOL) if codes and codes[i] else tol
        err = float((a - b).norm())
        if not err <= bound * den + 1e-6:
            log.debug("%s: output %d relative L2 %.3g from the reference, over %.3g", who, i, err / den, bound)
            return False
    return True


def _channels_last_at_runtime(t, a: torch.Tensor) -> bool:
    """Whether the engine will hand this input over in channels-last memory: 4-D outputs of the kinds flagged
    ``channels_last`` in kiln.ir.layers are, FP16/BF16 on the GPU and FP32 on the CPU (oneDNN and the GEMM
    convolution write NHWC, and torch's convolution keeps an NHWC input's layout), so tactics are timed on that
    layout. On the CPU a Concatenation of such outputs is too (torch.cat keeps its inputs' common layout), and
    so is a Resize's integer nearest upsampling of one; a channel Split's outputs are channel slices of one
    (``_nhwc_slice``)."""
    if a.dim() != 4 or t.producer is None:
        return False
    if a.is_cuda:
        return LAYER_KINDS[t.producer.kind].channels_last and a.dtype in (torch.float16, torch.bfloat16)
    return a.device.type == "cpu" and a.dtype == torch.float32 and _nhwc_on_cpu(t, 8)


def _nhwc_on_cpu(t, depth: int) -> bool:
    """Whether an FP32 CPU tensor comes out of a channels-last kind, or (``depth`` levels deep) a Concatenation of
    such tensors only, or an element-wise layer (ElementWise, Activation, Pointwise) one of whose inputs has the
    output's full shape and is such a tensor (torch's element-wise ops give their output the layout of a full-shape
    input: the squeeze-excitation Mul of an NHWC map by a [N, C, 1, 1] gate is NHWC)."""
    p = t.producer
    if p is None:
        return False
    if LAYER_KINDS[p.kind].channels_last:
        return True
    ins = [i for i in p.inputs if i is not None]
    if depth <= 0 or not ins:
        return False
    if p.kind == "Concatenation":       # of NHWC maps or channel slices of them: NHWC
        return all(i.shape is not None and len(i.shape) == 4
                   and (_nhwc_on_cpu(i, depth - 1) or _nhwc_slice(i, depth - 1) is not None) for i in ins)
    if p.kind == "Resize":              # its integer nearest upsampling is torch's, which keeps an NHWC layout
        return _integer_nearest(p, ins[0], t) and _nhwc_on_cpu(ins[0], depth - 1)
    if p.kind in ("ElementWise", "Activation", "Pointwise") and t.shape is not None:
        full = [i for i in ins if i.shape is not None and tuple(i.shape) == tuple(t.shape)]
        return bool(full) and _nhwc_on_cpu(full[0], depth - 1)
    return False


def _integer_nearest(p, x, y) -> bool:
    """Whether Resize layer ``p`` takes the Resize tactic's F.interpolate path from 4-D ``x`` to ``y``: nearest,
    asymmetric, floor, N and C kept, H and W whole multiples (kernels/resize.py)."""
    a = p.attrs
    if (a.get("mode", "nearest") != "nearest" or a.get("coordinate_transformation_mode", "half_pixel") != "asymmetric"
            or a.get("nearest_mode", "round_prefer_floor") != "floor" or x.shape is None or y.shape is None
            or len(x.shape) != 4 or len(y.shape) != 4 or not all(isinstance(d, int) for d in (*x.shape, *y.shape))):
        return False
    return tuple(x.shape[:2]) == tuple(y.shape[:2]) and all(
        x.shape[i] > 0 and y.shape[i] % x.shape[i] == 0 for i in (2, 3))


def as_at_runtime(t, a: torch.Tensor) -> torch.Tensor:
    """``a`` (values for tensor ``t``, contiguous) in the memory layout the engine hands ``t`` over in at run time:
    channels-last (``_channels_last_at_runtime``), a channel slice of an NHWC map (``_nhwc_slice``), or as it is."""
    cut = _nhwc_slice(t) if a.device.type == "cpu" and a.dtype == torch.float32 and a.dim() == 4 else None
    if cut is not None:
        n, c, h, w = a.shape
        whole = torch.empty(n, h, w, cut[0], dtype=a.dtype, device=a.device).permute(0, 3, 1, 2)
        view = whole[:, cut[1]:cut[1] + c]
        view.copy_(a)
        return view
    return a.contiguous(memory_format=torch.channels_last) if _channels_last_at_runtime(t, a) else a


def _layout_key(a: torch.Tensor) -> str:
    """The timing cache key's part for a tensor's layout: none for contiguous, ":cl" for channels-last memory,
    its strides for anything else (a channel slice)."""
    if a.dim() != 4 or a.is_contiguous():
        return ""
    return ":cl" if a.is_contiguous(memory_format=torch.channels_last) else f":s{tuple(a.stride())}"


def _nhwc_slice(t, depth: int = 8) -> tuple[int, int] | None:
    """(channels of the whole map, first channel) where the FP32 CPU tensor ``t`` is an output of a channel Split
    of an NHWC map (a slice of its memory, as torch.split leaves it); None otherwise."""
    p = t.producer
    if p is None or p.kind != "Split" or not p.inputs or p.inputs[0] is None or t.shape is None or len(t.shape) != 4:
        return None
    src = p.inputs[0]
    if src.shape is None or len(src.shape) != 4 or p.attrs.get("axis") not in (1, -3) or not _nhwc_on_cpu(src, depth):
        return None
    first = 0
    for o in p.outputs:
        if o is t:
            break
        if o is None or o.shape is None or len(o.shape) != 4 or not isinstance(o.shape[1], int):
            return None
        first += o.shape[1]
    total = src.shape[1]
    if not isinstance(total, int) or not isinstance(t.shape[1], int) or first + t.shape[1] > total:
        return None
    return total, first


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


# 8-bit layers time their alternative tile tables and the TMA kernel (the tactics of min_level 4) from the
# default level, where the default table takes at least EIGHT_BIT_EXTRA_MS: the tile choice moves an 8-bit
# layer's time by up to 2x, and each alternative costs a compile per layer shape, which small layers skip.
EIGHT_BIT_KINDS = ("QConvolution", "QFullyConnected")
EIGHT_BIT_LEVEL = 3
EIGHT_BIT_EXTRA_MS = 0.02


def candidates(kind: str, cands: list, level: int) -> tuple[list, list]:
    """(the candidates timed at ``level``, the extras timed after them where the layer is slow enough)."""
    timed = at_level(cands, level)
    if kind not in EIGHT_BIT_KINDS or level < EIGHT_BIT_LEVEL:
        return timed, []
    return timed, [c for c in at_level(cands, 5) if c not in timed]


# A point of a range profile runs another tactic than the layer's own (the default point's) only when
# that one is at least this much faster there.
SWITCH_MARGIN = 1.05
# Candidates within this factor of the fastest count as tied; the first registered of them wins. On the CPU,
# where other processes' load moves a low quantile by a few percent, CPU_TIE_MARGIN.
TIE_MARGIN = 1.02
CPU_TIE_MARGIN = 1.05


class Selection(NamedTuple):
    """The timed choices: a tactic per layer at the default point, and per point where they differ; on the CPU
    at more than one thread, the thread choice (ONE or ALL) of each layer it timed on both (``select_threads``)."""

    chosen: dict[int, str]                  # id(layer) -> tactic at the default point
    by_point: dict[int, list[str]]          # id(layer) -> tactic per point, for layers whose choice differs
    threads: dict[int, str] = {}            # id(layer) -> kiln.kernels.cpu_threads ONE or ALL


def select_tactics(net: Network, device: str, level: int, points: list[dict[str, tuple[int, ...]]],
                   cache: TimingCache, device_name: str, hosts: set[int], default: int = 0) -> Selection:
    """Choose a tactic per layer by timing its candidates at each of ``points`` (input shapes; see
    kiln.builder.buckets); ``points[default]`` gives the layer's own tactic. A plugin's implementation
    is chosen at the default point only. Over several points (a range engine), tactics that set themselves
    up per input shape (``shape_setup``) are not candidates: a first run at a new shape would pay that. On the
    CPU at more than one thread and one point, each layer's thread choice too (``select_threads``)."""
    chosen: dict[int, str] = {}
    by_point: dict[int, list[str]] = {}
    if level == 0:
        return Selection(chosen, by_point)
    threads = 0
    if device == "cpu":       # CPU tactics are timed, and their times cached, per thread count the layer runs on
        from kiln.kernels.cpu_threads import default_threads, use_threads
        threads = default_threads()
    per_layer = threads > 1 and len(points) == 1        # each layer's thread count, measured (select_threads)
    timed = []
    for layer in net.layers:
        if id(layer) in hosts:
            continue
        ctx = KernelContext(device=device, precision=layer.precision or "fp32", layer_name=layer.name,
                            input_dtypes=tuple(t.dtype if t is not None else None for t in layer.inputs))
        cands = tactics_for(layer.kind, layer.attrs, ctx)
        if len(points) > 1:
            cands = [c for c in cands if not c.shape_setup] or cands
        extras: list = []
        if layer.kind == "Plugin":
            cands = _plugin_candidates(layer, device)
        else:
            cands, extras = candidates(layer.kind, cands, level)
        if len(cands) + len(extras) > 1:
            timed.append((layer, cands, extras))
    if not timed and not per_layer:
        return Selection(chosen, by_point)
    reps = 10 if level <= 3 else 30
    measured: dict[int, list[dict[str, float]]] = {id(layer): [] for layer, _, _ in timed}
    at_default: dict = {}
    try:
        for i, shapes in enumerate(points):
            vals = evaluate(net, shapes)
            if i == default and per_layer:
                at_default = vals
            for layer, cands, extras in timed:
                skip = layer.kind == "Plugin" and i != default
                where = device_name
                if threads and not skip:
                    n = run_threads(layer, vals, threads)
                    use_threads(n)
                    where = f"{device_name}/{n} threads"
                measured[id(layer)].append({} if skip else _layer_times(layer, cands, vals, device, where,
                                                                         cache, reps, extras) or {})
        _choose(timed, measured, default, CPU_TIE_MARGIN if device == "cpu" else TIE_MARGIN, chosen, by_point)
        on = select_threads(net, chosen, hosts, at_default, device_name, cache, threads, reps) if per_layer else {}
    finally:
        if threads:
            use_threads(threads)
    return Selection(chosen, by_point, on)


def _choose(timed: list, measured: dict[int, list[dict[str, float]]], default: int, margin: float,
            chosen: dict[int, str], by_point: dict[int, list[str]]) -> None:
    """Fill ``chosen`` and ``by_point`` from each timed layer's times per point (see ``select_tactics``)."""
    inf = float("inf")
    for layer, cands, extras in timed:
        cands = cands + extras
        per_point = measured[id(layer)]
        names = [_fastest(cands, t, margin) for t in per_point]
        if layer.kind == "Plugin":
            if names[default] is not None:
                layer.attrs["plugin_tactic"] = names[default]      # the plugin's own implementation choice
            continue
        own = names[default] or cands[0].name
        if names[default] is not None:
            chosen[id(layer)] = own
        # a point keeps the layer's own tactic unless another is clearly faster there (noise splits nothing)
        names = [own if n is None or t.get(own, inf) <= SWITCH_MARGIN * t[n] else n for n, t in zip(names, per_point)]
        if len(set(names)) > 1:
            chosen[id(layer)] = own
            by_point[id(layer)] = names


def run_threads(layer, vals: dict, threads: int) -> int:
    """The thread count a CPU layer runs on at the shapes in ``vals`` in an engine run on ``threads``: one where
    kiln.kernels.cpu_threads.layer_threads says so (a small GEMM-like layer; the runtime runs it on one thread
    whatever the engine's count), else ``threads``. Its tactics are timed on that count."""
    if threads <= 1:
        return threads
    from kiln.kernels.cpu_threads import ONE, layer_threads
    shapes = _static_shapes(layer, vals)
    return 1 if shapes is not None and layer_threads(layer.kind, *shapes) == ONE else threads


def _static_shapes(layer, vals: dict) -> tuple[list, list] | None:
    """(input shapes, None for an absent input; output shapes) of ``layer`` at the values in ``vals``; None where
    one is not known or not a tensor (a sequence)."""
    def shape(t) -> tuple[int, ...] | None:
        if t.is_constant:
            return tuple(np.shape(t.value))
        v = vals.get(t.name, UNKNOWN)
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None
    ins = [None if t is None else shape(t) for t in layer.inputs]
    outs = [shape(t) for t in layer.outputs]
    if any(s is None for s in outs) or any(s is None for s, t in zip(ins, layer.inputs) if t is not None):
        return None
    return ins, outs


# On more than one thread, a CPU layer runs on the engine's count only where that count is faster than one thread
# by more than this factor: each parallel region wakes the sleeping OpenMP workers (OMP_WAIT_POLICY=PASSIVE), tens
# of microseconds on a VM (docs/cpu.md), which a short layer does not earn back.
THREADS_MARGIN = 1.05
# A layer whose call on the engine's count takes at least this long keeps that count without a one-thread timing:
# a region's wake-ups (0.1-0.2 ms on a VM) are a small part of it; timing large layers on one thread too would add
# seconds to a big build, and under load from other processes their N-thread time reads slow, which would put
# layers that scale on one thread for good. Not so for kinds that run step by step (STEPWISE_KINDS): a call is a
# chain of short regions, each woken anew.
LONG_LAYER_MS = 0.5
STEPWISE_KINDS = frozenset(("RNN",))


def select_threads(net: Network, chosen: dict[int, str], hosts: set[int], vals: dict, device_name: str,
                   cache: TimingCache, threads: int, reps: int) -> dict[int, str]:
    """kiln.kernels.cpu_threads ONE or ALL per top-level CPU layer of ``net``: its chosen tactic (``chosen``, else
    its first candidate) timed at the shapes in ``vals`` on one thread and on ``threads`` (``thread_times``, cached
    under ``device_name``, the thread count and the tactic), ALL where ``threads`` beat one thread by more than
    THREADS_MARGIN, else ONE. Left out (the runtime's rule, ``layer_threads``, decides them): control flow (its
    bodies' layers), plugins, host layers, layers that rule runs on either count (ANY: no parallel region), and
    layers that cannot be timed (unknown shapes, inputs neither floating point nor codes, a tactic that fails)."""
    from kiln.kernels.cpu_threads import ANY, layer_threads
    out: dict[int, str] = {}
    for layer in net.layers:
        spec = LAYER_KINDS.get(layer.kind)
        if id(layer) in hosts or layer.kind == "Plugin" or spec is None or spec.control_flow:
            continue
        shapes = _static_shapes(layer, vals)
        if shapes is None or layer_threads(layer.kind, *shapes) == ANY:
            continue
        ins = _timing_inputs(layer, vals, "cpu")
        if ins is None:
            continue
        ctx = KernelContext(device="cpu", precision=layer.precision or "fp32", layer_name=layer.name,
                            input_dtypes=tuple(t.dtype if t is not None else None for t in layer.inputs),
                            output_dtypes=tuple(o.dtype for o in layer.outputs))
        cands = tactics_for(layer.kind, layer.attrs, ctx)
        name = chosen.get(id(layer)) or (cands[0].name if cands else None)
        tactic = next((c for c in cands if c.name == name), None)
        if tactic is None:
            continue
        key = _timing_key(f"{device_name}/{threads} threads|threads:{name}", layer, ins)
        times = cache.get(key)
        if times is None:
            try:
                times = thread_times(lambda: tactic.make(layer.attrs, ctx), ins, threads, reps,
                                     layer.kind not in STEPWISE_KINDS)
            except Exception as exc:       # noqa: BLE001 - a tactic that fails here keeps the runtime's rule
                log.debug("%s %s: %s not timed on 1 and %d threads: %s: %s", layer.kind, layer.name, name, threads,
                          type(exc).__name__, exc)
                continue
            cache.put(key, times)
        choice = thread_choice(times, threads)
        if choice is not None:
            out[id(layer)] = choice
    return out


def thread_times(make: Callable[[], Callable], ins: list, threads: int, reps: int,
                 long_alone: bool = True) -> dict[str, float]:
    """Milliseconds per call of a layer's tactic on one thread (key "1") and on ``threads`` (its number as a
    string), in interleaved rounds (``interleaved_ms``, one thread first: ``threads`` must be clearly faster), so
    that each call on ``threads`` follows one on one thread, whose workers have slept meanwhile, as after a
    one-thread stretch at run time. Each count gets a function of its own from ``make``, made and first called on
    that count (a oneDNN primitive keeps the thread count it was made at). With ``long_alone``, a first call on
    ``threads`` of at least LONG_LAYER_MS stands alone. Leaves torch on ``threads``."""
    fns = []
    for n in (1, threads):
        torch.set_num_threads(n)
        fn = make()
        fns.append(lambda *a, fn=fn, n=n: (torch.set_num_threads(n), fn(*a))[1])
    with torch.inference_mode():
        fns[1](*ins)
        first = _time_cpu(fns[1], ins, 1)
        if long_alone and first >= LONG_LAYER_MS:
            return {str(threads): first}
        one, many = interleaved_ms(fns, ins, reps)
    return {"1": one, str(threads): many}


def thread_choice(times: dict[str, float], threads: int) -> str | None:
    """ONE or ALL from ``thread_times``' times (ALL where ``threads`` beat one thread by more than THREADS_MARGIN,
    or there is no one-thread time: a long layer); None where the ``threads`` time is missing or infinite."""
    from kiln.kernels.cpu_threads import ALL, ONE
    one, many = times.get("1", math.inf), times.get(str(threads), math.inf)
    if not math.isfinite(many):
        return None
    return ALL if many * THREADS_MARGIN < one else ONE


def _fastest(cands: list, times: dict[str, float], margin: float = TIE_MARGIN) -> str | None:
    """The first candidate (in registration order) within ``margin`` of the fastest time, so that two tactics
    of equal speed do not trade places from build to build on timing noise; None when none was timed."""
    best = min((times.get(c.name, float("inf")) for c in cands), default=float("inf"))
    if best == float("inf"):
        return None
    return next(c.name for c in cands if times.get(c.name, float("inf")) <= margin * best)


_CODES = {torch.int8: (-128, 128), torch.uint8: (0, 256)}      # integer activations tactics are timed on


def _timing_inputs(layer, vals: dict, device: str) -> list | None:
    """The layer's inputs to time it on: its constants, and random values of the shapes and dtypes in ``vals`` in
    the layout the engine hands them over in (``as_at_runtime``); None where a shape is not known or an input is
    neither floating point nor 8-bit codes."""
    ins = []
    for t in layer.inputs:
        if t is None:
            ins.append(None)
            continue
        if t.is_constant:
            ins.append(from_numpy(np.require(t.value, requirements="C")).to(device))      # bfloat16, float8 too
            continue
        v = vals.get(t.name, UNKNOWN)
        if v is UNKNOWN or not (v.dtype.is_floating_point or v.dtype in _CODES):
            return None
        if v.dtype in _CODES:       # 8-bit activation codes (kiln/passes/fold_qdq.py)
            a = torch.randint(*_CODES[v.dtype], tuple(v.shape), dtype=v.dtype, device=device)
        else:
            a = torch.randn(tuple(v.shape), dtype=torch.float32, device=device).to(v.dtype)
        ins.append(as_at_runtime(t, a))
    return ins


def _timing_key(where: str, layer, ins: list) -> str:
    """The timing cache key of ``layer`` on inputs ``ins`` timed at ``where`` (device, thread count)."""
    return "|".join([where, layer.kind, _sig(layer.attrs),
                     ",".join("-" if a is None else f"{tuple(a.shape)}:{a.dtype}" + _layout_key(a) for a in ins)])


def _layer_times(layer, cands: list, vals: dict, device: str, device_name: str, cache: TimingCache,
                 reps: int, extras: list = ()) -> dict[str, float] | None:
    """Milliseconds per candidate on the layer's input shapes in ``vals`` (from the cache where it has
    them), and per extra (``candidates``) where the fastest candidate takes at least EIGHT_BIT_EXTRA_MS; None
    where the shapes are not known. Every candidate is checked against the first one's outputs."""
    ins = _timing_inputs(layer, vals, device)
    if ins is None:
        return None
    key = _timing_key(device_name, layer, ins)
    times = dict(cache.get(key) or {})
    ctx = KernelContext(device=device, precision=layer.precision or "fp32", layer_name=layer.name,
                        output_dtypes=tuple(o.dtype for o in layer.outputs))
    ref: list = []

    def run(cand) -> tuple | None:
        """(the candidate, its run function, its outputs as float tensors, which of them are codes); None where
        it cannot run on these shapes."""
        try:
            with torch.inference_mode():
                fn = cand.make(layer.attrs, ctx)
                got = fn(*[a.clone() if a is not None else None for a in ins])
                return cand, fn, [o.float() for o in got], [o.dtype in _CODE_OUTPUTS for o in got]
        except Exception as exc:
            log.debug("%s %s: %s cannot run: %s: %s", layer.kind, layer.name, cand.name, type(exc).__name__, exc,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            return None

    def reference() -> tuple | None:
        """The ``torch`` tactic where it is a candidate and runs (the plain implementation, wherever it stands in
        preference order), else the first candidate that runs: its outputs judge the others (it runs even where
        its time is cached)."""
        if not ref:
            ref.append(next((r for r in map(run, plain_first(cands)) if r is not None), None))
        return ref[0]

    def measure(todo: list) -> None:
        valid = []                                   # (candidate, run function) of those that agree
        for cand in todo:
            if cand.name in times:
                continue
            judge = reference()
            mine = judge if judge is not None and judge[0] is cand else run(cand)
            if mine is None or judge is None or (mine is not judge and not _agree(
                    mine[2], judge[2], layer.precision or "fp32", mine[3],
                    f"{layer.kind} {layer.name}: {cand.name} against {judge[0].name}")):
                times[cand.name] = float("inf")      # not valid on these shapes, or a fast wrong kernel
                continue
            valid.append(mine[:2])
        with torch.inference_mode():
            if device != "cuda":
                times.update(zip([c.name for c, _ in valid], _time_cpu_interleaved([f for _, f in valid], ins, reps)))
                return
            for cand, fn in valid:
                try:
                    times[cand.name] = _time(fn, ins, reps)
                except Exception:
                    times[cand.name] = float("inf")

    before = dict(times)
    measure(cands)
    if extras and min((times[c.name] for c in cands), default=0.0) >= EIGHT_BIT_EXTRA_MS:
        measure(extras)
    if times != before:
        cache.put(key, times)
    return times
