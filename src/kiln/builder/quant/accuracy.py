"""Accuracy under control: an ``--accuracy`` target, each quantized layer's sensitivity, and the search for the
fewest layers to keep unquantized so that the target holds on the calibration data.

A target is one of ``rel_l2<=X`` (relative L2 error of every float output, the worst one counts),
``max_abs<=X`` (largest absolute error over every float output) and ``top1_agree>=X`` (the fraction of rows
whose argmax over the last axis of the first output agrees with FP32; X in [0, 1], or a percentage like 99%).
Errors are measured against the FP32 network, run by Kiln on the build's device, on the calibration batches.

Sensitivity is measured as NVIDIA's YOLOv7 QAT example (yolo_deepstream, ``cmd_sensitive_analysis``, on
pytorch-quantization) does: starting from the fully quantized network, one layer's quantization is removed at a
time; the layer whose removal lowers the error most is the most sensitive. (YOLOv6's partial quantization
measures each layer quantized alone; ``kiln compare --per-layer`` reports both.)

The search keeps layers in that order until the target holds, then quantizes again each kept layer but the
last whose quantization the target tolerates (least sensitive first). In the result no single kept layer can
be quantized with the target still met (given that quantizing more layers never lowers the error).
Kept layers run in the build's float precision (FP16 with ``--fp16``, else FP32).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np

from kiln.engine.quant_record import ACCURACY_METRICS as METRICS
from kiln.errors import BuildError
from kiln.ir.network import Network

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


class Meter:
    """``metric`` accumulated batch by batch: ``add`` one batch's outputs (in order) and FP32's, ``value`` at the
    end. A non-finite value where FP32 is finite makes an error metric infinite and its row disagree."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.agree = self.rows = 0
        self.diff2: dict[int, float] = {}
        self.norm2: dict[int, float] = {}
        self.big: dict[int, float] = {}

    def add(self, got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> None:
        if self.metric == "top1_agree":
            a, b = _f64(got[0]), _f64(ref[0])
            if a.ndim == 0 or a.shape[-1] < 2:
                raise BuildError(f"--accuracy top1_agree needs a first output with at least 2 classes along its last "
                                 f"axis; it has shape {list(a.shape)}. Use rel_l2 or max_abs.")
            a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            self.agree += int(np.sum(np.isfinite(a).all(axis=1) & (a.argmax(axis=1) == b.argmax(axis=1))))
            self.rows += len(a)
            return
        for k, (g, r) in enumerate(zip(got, ref)):
            if not np.issubdtype(np.asarray(r).dtype, np.floating):
                continue
            a, b = _f64(g).ravel(), _f64(r).ravel()
            fin = np.isfinite(b)
            d = np.abs(a[fin] - b[fin])
            lost = bool(np.any(fin & ~np.isfinite(a)))
            self.diff2[k] = math.inf if lost else self.diff2.get(k, 0.0) + float(np.dot(d, d))
            self.norm2[k] = self.norm2.get(k, 0.0) + float(np.dot(b[fin], b[fin]))
            self.big[k] = math.inf if lost else max(self.big.get(k, 0.0), float(d.max()) if d.size else 0.0)

    def value(self) -> float:
        if self.metric == "top1_agree":
            return self.agree / self.rows if self.rows else math.nan
        if self.metric == "max_abs":
            return max(self.big.values(), default=0.0)
        return max((math.sqrt(self.diff2[k]) / max(math.sqrt(self.norm2[k]), 1e-30) for k in self.diff2), default=0.0)


def measure(metric: str, got: Sequence[Sequence[np.ndarray]], ref: Sequence[Sequence[np.ndarray]]) -> float:
    """``metric`` of outputs ``got`` against ``ref`` (each: per batch, the network's outputs in order)."""
    meter = Meter(metric)
    for g, r in zip(got, ref):
        meter.add(g, r)
    return meter.value()


def _f64(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, np.float64)


class Evaluator:
    """Measures ``network`` with a chosen set of its quantizable layers quantized (``make(names)`` builds that
    network) on the calibration ``batches`` against the FP32 network, batch by batch; FP32's outputs are kept up
    to ``REFERENCE_BYTES`` (recomputed per batch beyond), and every measured value by metric and layer set."""

    REFERENCE_BYTES = 1 << 28

    def __init__(self, network: Network, make: Callable[[frozenset[str]], Network], batches: list[Batch],
                 device: str, precision: str = "fp32", fp32_layers: Sequence[str] = ()) -> None:
        self.network, self.make, self.batches, self.device = network, make, batches, device
        self.precision, self.fp32_layers = precision, tuple(fp32_layers)
        self._ref_ctx = _context(network, batches, device)
        self._ref: dict[int, list[np.ndarray]] = {}
        self._ref_bytes = 0
        self._seen: dict[tuple[str, frozenset[str]], float] = {}

    def _reference(self, i: int) -> list[np.ndarray]:
        if i in self._ref:
            return self._ref[i]
        out = _outputs(self._ref_ctx, self.network, self.batches[i])
        size = sum(a.nbytes for a in out)
        if self._ref_bytes + size <= self.REFERENCE_BYTES:
            self._ref[i], self._ref_bytes = out, self._ref_bytes + size
        return out

    def __call__(self, metric: str, quantized: Iterable[str]) -> float:
        """``metric`` with exactly the layers ``quantized`` quantized."""
        key = (metric, frozenset(quantized))
        if key not in self._seen:
            net = self.make(key[1]) if key[1] else self.network
            ctx = _context(net, self.batches, self.device, self.precision, self.fp32_layers)
            meter = Meter(metric)
            for i, b in enumerate(self.batches):
                meter.add(_outputs(ctx, net, b), self._reference(i))
            self._seen[key] = meter.value()
        return self._seen[key]


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


def sensitivity_errors(sens: Sequence[Sensitivity], metric: str, mode: str, model: str, samples: int) -> dict:
    """The per-layer sensitivity as a ``kiln view --errors`` report (kiln.viewer.accuracy's format): one record
    per quantized layer, by node name, valued by its error alone (``sensitivity``) under ``metric``; an
    agreement metric (higher is better) is shown as its shortfall, 1 - agreement, so red is always worse."""
    lower_better = METRICS[metric] == "<="

    def shown(v: float | None) -> float | None:
        if v is None or lower_better:
            return v
        return 1.0 - v
    return {"format": "kiln-compare-errors", "version": 1, "model": model, "metric": "sensitivity",
            "sensitivity_of": metric if lower_better else f"1 - {metric}", "quantize": mode, "samples": samples,
            "tensors": [{"node": s.layer, "op": f"{mode} layer", "sensitivity": shown(s.alone),
                         "others": shown(s.without)} for s in sens]}


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
                         f"the target, or build without quantization.")
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


def _context(net: Network, batches: list[Batch], device: str, precision: str = "fp32",
             fp32_layers: Sequence[str] = ()):
    from kiln.builder.quant.calibrate import engine_for
    return engine_for(net, batches, device, precision, fp32_layers).context()


def _outputs(ctx, net: Network, batch: Batch) -> list[np.ndarray]:
    """``net``'s outputs (in order) on one batch, copied out of the engine's buffers."""
    values = ctx.run(batch)
    return [np.array(values[t.name], copy=True) for t in net.outputs]
