"""Accuracy under control: an ``--accuracy`` target, each quantized layer's sensitivity, and the search for the
fewest layers to keep unquantized so that the target holds on the calibration data.

A target is one of ``rel_l2<=X`` (relative L2 error of every float output, the worst one counts),
``max_abs<=X`` (largest absolute error over every float output) and ``top1_agree>=X`` (the fraction of rows
whose argmax over the last axis of the first output agrees with FP32; X in [0, 1], or a percentage like 99%).
Errors are measured against the FP32 network, run by Kiln on the build's device, on the calibration batches.

Sensitivity is measured as NVIDIA's pytorch-quantization and TensorRT's QAT tutorials do: starting from the
fully quantized network, one layer's quantization is removed at a time; the layer whose removal lowers the error
most is the most sensitive. The search keeps layers in that order until the target holds, then drops again any
kept layer the target does not need (least sensitive first), so no kept layer can be given back alone.
Kept layers run in the build's float precision (FP16 with ``--fp16``, else FP32).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np

from kiln.errors import BuildError
from kiln.ir.network import Network

METRICS = {"rel_l2": "<=", "max_abs": "<=", "top1_agree": ">="}
_GRAMMAR = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>|=)\s*([^\s%]+)\s*(%?)\s*$")
Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class AccuracyTarget:
    """``metric`` (a key of METRICS) compared with ``bound`` by METRICS[metric]."""

    metric: str
    bound: float
    text: str

    def met(self, value: float) -> bool:
        """Whether a measured ``value`` of the metric meets the target."""
        if math.isnan(value):
            return False
        return value <= self.bound if METRICS[self.metric] == "<=" else value >= self.bound

    def __str__(self) -> str:
        return f"{self.metric}{METRICS[self.metric]}{self.bound:g}"


def parse_target(text: str) -> AccuracyTarget:
    """``"rel_l2<=0.02"`` → AccuracyTarget; one line naming the grammar for anything else."""
    form = "give rel_l2<=X, max_abs<=X or top1_agree>=X (X a number; top1_agree in [0, 1] or a percentage)"
    if not isinstance(text, str):
        raise BuildError(f"--accuracy takes a string; {form}.")
    m = _GRAMMAR.match(text)
    if m is None:
        raise BuildError(f"--accuracy {text!r} is not a target; {form}.")
    metric, op, number, percent = m.groups()
    if metric not in METRICS:
        raise BuildError(f"--accuracy {text!r}: unknown metric {metric!r}; {form}.")
    if op != METRICS[metric]:
        raise BuildError(f"--accuracy {text!r}: {metric} takes {METRICS[metric]} (write {metric}{METRICS[metric]}X).")
    try:
        bound = float(number)
    except ValueError:
        bound = math.nan
    if percent:
        bound = bound / 100.0 if metric == "top1_agree" else math.nan
    if not math.isfinite(bound) or bound < 0 or (metric == "top1_agree" and bound > 1):
        limit = "between 0 and 1 (or 0% and 100%)" if metric == "top1_agree" else "a finite number >= 0"
        raise BuildError(f"--accuracy {text!r}: the bound must be {limit}; {form}.")
    return AccuracyTarget(metric, bound, text)


def measure(metric: str, got: Sequence[Sequence[np.ndarray]], ref: Sequence[Sequence[np.ndarray]]) -> float:
    """``metric`` of outputs ``got`` against ``ref`` (each: per batch, the network's outputs in order); a
    non-finite value where FP32 is finite makes an error metric infinite and the row disagree."""
    if metric == "top1_agree":
        agree = total = 0
        for g, r in zip(got, ref):
            a, b = _f64(g[0]), _f64(r[0])
            if a.ndim == 0 or a.shape[-1] < 2:
                raise BuildError(f"--accuracy top1_agree needs a first output with at least 2 classes along its last "
                                 f"axis; it has shape {list(a.shape)}. Use rel_l2 or max_abs.")
            a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            ok = np.isfinite(a).all(axis=1)
            agree += int(np.sum(ok & (a.argmax(axis=1) == b.argmax(axis=1))))
            total += len(a)
        return agree / total if total else math.nan
    worst = 0.0
    for k in range(len(ref[0]) if ref else 0):
        if not np.issubdtype(np.asarray(ref[0][k]).dtype, np.floating):
            continue
        diff2 = norm2 = 0.0
        big = 0.0
        for g, r in zip(got, ref):
            a, b = _f64(g[k]).ravel(), _f64(r[k]).ravel()
            fin = np.isfinite(b)
            if np.any(fin & ~np.isfinite(a)):
                return math.inf
            d = np.abs(a[fin] - b[fin])
            diff2 += float(np.dot(d, d))
            norm2 += float(np.dot(b[fin], b[fin]))
            big = max(big, float(d.max()) if d.size else 0.0)
        value = big if metric == "max_abs" else math.sqrt(diff2) / max(math.sqrt(norm2), 1e-30)
        worst = max(worst, value)
    return worst


def _f64(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, np.float64)


class Evaluator:
    """Runs ``network`` with a chosen set of its quantizable layers quantized (``make(names)`` builds that
    network) on the calibration ``batches`` and measures it against the FP32 outputs; results are kept by
    layer set."""

    def __init__(self, network: Network, make: Callable[[frozenset[str]], Network], batches: list[Batch],
                 device: str, precision: str = "fp32", fp32_layers: Sequence[str] = ()) -> None:
        self.network, self.make, self.batches, self.device = network, make, batches, device
        self.precision, self.fp32_layers = precision, tuple(fp32_layers)
        self.ref = run_outputs(network, batches, device)
        self._seen: dict[frozenset[str], list[list[np.ndarray]]] = {}

    def outputs(self, quantized: Iterable[str]) -> list[list[np.ndarray]]:
        """The outputs, per batch, with exactly the layers ``quantized`` quantized."""
        key = frozenset(quantized)
        if key not in self._seen:
            net = self.make(key) if key else self.network
            self._seen[key] = run_outputs(net, self.batches, self.device, self.precision, self.fp32_layers)
        return self._seen[key]

    def __call__(self, metric: str, quantized: Iterable[str]) -> float:
        return measure(metric, self.outputs(quantized), self.ref)


class Sensitivity(NamedTuple):
    """One quantized layer: the metric with every quantizable layer but this one quantized (``without``), and,
    when measured, with this one alone quantized (``alone``)."""

    layer: str
    without: float
    alone: float | None


def sensitivity(evaluate: Evaluator, layers: Sequence[str], metric: str, alone: bool = False,
                progress: Callable[[float], None] | None = None) -> list[Sensitivity]:
    """Each of ``layers`` with its error numbers, most sensitive first (the layer whose removal from the fully
    quantized network helps the metric most; ties in network order)."""
    out = []
    every = frozenset(layers)
    for i, name in enumerate(layers):
        out.append(Sensitivity(name, evaluate(metric, every - {name}),
                               evaluate(metric, {name}) if alone else None))
        if progress:
            progress((i + 1) / len(layers))
    sign = 1.0 if METRICS[metric] == "<=" else -1.0     # lower error (higher agreement) without it: sensitive
    order = {n: i for i, n in enumerate(layers)}
    return sorted(out, key=lambda s: (_key(sign * s.without), order[s.layer]))


def sensitivity_report(sens: Sequence[Sensitivity], metric: str, mode: str, samples: int) -> str:
    """The per-layer table of ``kiln compare --int8 --per-layer``: each quantized layer's error alone and the
    error of every other layer quantized, the worst layer (largest error alone) first."""
    sign = -1.0 if METRICS[metric] == "<=" else 1.0
    rows = sorted(sens, key=lambda s: _key(sign * (s.alone if s.alone is not None else math.nan)))
    width = max([len(s.layer) for s in rows] + [5])
    lines = [f"per quantized layer ({mode}, {metric} against FP32 on {samples} calibration samples; worst first): "
             f"'alone' = only this layer quantized, 'others' = every layer but this one quantized"]
    lines += [f"  {s.layer:<{width}}  alone {_num(s.alone)}  others {_num(s.without)}" for s in rows]
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "-" if v is None else "inf" if v == math.inf else f"{v:.3e}"


def _key(v: float) -> float:
    return math.inf if math.isnan(v) else v


class SearchResult(NamedTuple):
    kept: list[str]           # layers left unquantized by the search, most sensitive first
    achieved: float           # the metric with every other layer quantized
    quantized_metric: float   # the metric with every layer quantized


def search(evaluate: Evaluator, layers: Sequence[str], target: AccuracyTarget, float_name: str,
           progress: Callable[[float], None] | None = None) -> SearchResult:
    """The fewest of ``layers`` to keep unquantized for ``target`` (see the module docstring); one line when
    even the unquantized network (in ``float_name`` precision) misses it."""
    every = frozenset(layers)
    full = evaluate(target.metric, every)
    if target.met(full):
        return SearchResult([], full, full)
    none = evaluate(target.metric, ())
    if not target.met(none):
        raise BuildError(f"--accuracy {target} cannot be met on the calibration data: even with no layer quantized "
                         f"({float_name}) {target.metric} is {none:.4g} (every layer quantized: {full:.4g}); loosen "
                         f"the target, or build without --int8.")
    ranked = [s.layer for s in sensitivity(evaluate, layers, target.metric,
                                           progress=(lambda f: progress(0.8 * f)) if progress else None)]
    kept: list[str] = []
    for name in ranked:
        kept.append(name)
        if target.met(evaluate(target.metric, every - set(kept))):
            break
    for name in reversed(kept[:-1]):       # give back what the target does not need, least sensitive first
        trial = [n for n in kept if n != name]
        if target.met(evaluate(target.metric, every - set(trial))):
            kept = trial
    if progress:
        progress(1.0)
    return SearchResult(kept, evaluate(target.metric, every - set(kept)), full)


def samples(batches: Sequence[Batch]) -> int:
    """How many samples the calibration batches hold."""
    return int(sum(len(next(iter(b.values()))) for b in batches))


def run_outputs(net: Network, batches: list[Batch], device: str, precision: str = "fp32",
                fp32_layers: Sequence[str] = ()) -> list[list[np.ndarray]]:
    """``net``'s outputs (in order) on each batch, built with untimed tactics in ``precision``."""
    from kiln.builder.quant.calibrate import engine_for
    ctx = engine_for(net, batches, device, precision, fp32_layers).context()
    names = [t.name for t in net.outputs]
    out = []
    for b in batches:
        values = ctx.run(b)
        out.append([np.array(values[n], copy=True) for n in names])
    return out

