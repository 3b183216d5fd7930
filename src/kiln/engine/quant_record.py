"""What a quantized build records in the engine header (``build.quantization``) and how it reads back as text.

The record holds, per quantized layer, its 8-bit type, the per-tensor scale of each activation it reads and its
weight's per-channel scales (count, min, max); and, for an ``--accuracy`` build, the target, the layers kept
unquantized and the metric measured. It comes from a file, so ``record_problem`` checks it against a closed
schema before anything reads it. Reading it imports no torch (``kiln inspect``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

# the accuracy metrics (kiln.builder.quant.accuracy) and how each is compared with its bound
ACCURACY_METRICS = {"rel_l2": "<=", "max_abs": "<=", "top1_agree": ">="}

_TYPES = ("int8", "float8_e4m3fn")
_LAYER_KEYS = {"type", "inputs", "weight"}
_WEIGHT_KEYS = {"tensor", "axis", "count", "min", "max"}
_ACCURACY_KEYS = {"target", "metric", "achieved", "all_quantized", "kept", "quantized", "samples"}


def _num(v: Any, finite: bool = True) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (math.isfinite(v) or not finite)


def _count(v: Any) -> bool:
    return type(v) is int and 0 <= v < 2 ** 63


def record_problem(q: Any) -> str | None:
    """The first way ``q`` (a header's ``build.quantization``) breaks the record's schema, or None."""
    if not isinstance(q, dict):
        return "the quantization record is not a table"
    layers = q.get("layers", {})
    if not isinstance(layers, dict):
        return "the quantization record's 'layers' is not a table"
    for name, rec in layers.items():
        what = f"quantized layer {str(name)[:40]!r}"
        if not (isinstance(rec, dict) and set(rec) == _LAYER_KEYS and rec["type"] in _TYPES):
            return f"{what} has a malformed record"
        ins, w = rec["inputs"], rec["weight"]
        if not (isinstance(ins, dict) and all(isinstance(k, str) and _num(v) and v > 0 for k, v in ins.items())):
            return f"{what} has malformed input scales"
        if not (isinstance(w, dict) and set(w) == _WEIGHT_KEYS and isinstance(w["tensor"], str)
                and _count(w["axis"]) and _count(w["count"]) and w["count"] > 0
                and _num(w["min"]) and _num(w["max"]) and 0 < w["min"] <= w["max"]):
            return f"{what} has malformed weight scales"
    acc = q.get("accuracy")
    if acc is not None:
        if not (isinstance(acc, dict) and set(acc) == _ACCURACY_KEYS and isinstance(acc["target"], str)
                and acc["metric"] in ACCURACY_METRICS and all(acc[k] is None or _num(acc[k]) for k in ("achieved",
                                                                                            "all_quantized"))
                and isinstance(acc["kept"], list) and all(isinstance(n, str) for n in acc["kept"])
                and _count(acc["quantized"]) and _count(acc["samples"])):
            return "the quantization record's 'accuracy' is malformed"
    return None


def layer_record(q: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any] | None:
    """The record of engine ``layer`` (by its name or an ONNX node it runs) in a checked record ``q``."""
    layers = q.get("layers", {})
    for name in (layer["name"], *(layer.get("origin") or ())):
        if name in layers:
            return layers[name]
    return None


def _type_name(dtype: str) -> str:
    return {"int8": "int8", "float8_e4m3fn": "fp8"}.get(dtype, dtype)


def layer_text(rec: dict[str, Any]) -> str:
    """A quantized layer's scales in one line."""
    ins = "; ".join(f"input {n!r} scale {s:.6g}" for n, s in rec["inputs"].items())
    w = rec["weight"]
    return (f"{_type_name(rec['type'])}: {ins}; weight {w['tensor']!r} {w['count']} per-channel scales (axis "
            f"{w['axis']}) min {w['min']:.6g} max {w['max']:.6g}")


def accuracy_text(acc: dict[str, Any], float_name: str) -> str:
    """What an --accuracy search found, in one line."""
    kept = acc["kept"]
    left = (f"kept {len(kept)} layer{'s' if len(kept) != 1 else ''} unquantized ({float_name}): {', '.join(kept)}"
            if kept else "every layer quantized")
    return (f"--accuracy {acc['target']}: {left}; {acc['metric']} {_value(acc['achieved'])} on {acc['samples']} "
            f"calibration samples ({acc['quantized']} layers quantized; all quantized: "
            f"{_value(acc['all_quantized'])})")


def _value(v: float | None) -> str:
    return "inf" if v is None else f"{v:.4g}"


def finite_or_none(v: float) -> float | None:
    """``v`` as a JSON-safe number (None for inf/nan)."""
    return float(v) if math.isfinite(v) else None


def scale_text(scale: np.ndarray) -> str:
    """A Q/DQ scale tensor: its value when per-tensor, else count and range."""
    s = np.asarray(scale, np.float64).reshape(-1)
    if s.size == 1:
        return f"scale {s[0]:.6g}"
    return f"{s.size} per-channel scales min {s.min():.6g} max {s.max():.6g}"


_QDQ = ("QuantizeLinear", "DequantizeLinear")
_FOLDED_SCALES = (("x_scale", "input"), ("w_scale", "weight"), ("out_scale", "output"))


def engine_notes(header: dict[str, Any], weights: dict[str, np.ndarray]) -> tuple[list[str | None], str | None]:
    """For each layer of a checked engine header (``kiln.engine.read_header``'s form; ``weights`` by weight key):
    its scales in one line, or None; and the build's accuracy line (or why its quantization record is ignored).
    Q/DQ layers show the scale they read from the engine's weights; 8-bit layers folded from them their scale
    attributes; the layers a quantized build quantized, the scales it recorded."""
    q = header.get("build", {}).get("quantization")
    problem = record_problem(q) if q is not None else None
    summary = None
    if problem is not None:
        summary, q = f"quantization record ignored: {problem}", None
    elif q is not None and q.get("accuracy"):
        summary = accuracy_text(q["accuracy"], header["precision"])
    keys = header.get("plan", {}).get("weights", {})
    notes: list[str | None] = []
    for layer in header["layers"]:
        attrs = layer.get("attrs") or {}
        rec = layer_record(q, layer) if q else None
        if rec is not None:
            notes.append(layer_text(rec))
        elif layer["kind"] in _QDQ and len(layer["inputs"]) > 1 and keys.get(layer["inputs"][1]) in weights:
            scale = weights[keys[layer["inputs"][1]]]
            ok = scale.dtype.kind == "f" and scale.size > 0
            notes.append(f"{scale_text(scale)} (axis {attrs.get('axis', 1)})" if ok and scale.size > 1
                         else scale_text(scale) if ok else None)
        elif any(k in attrs for k, _ in _FOLDED_SCALES):
            parts = []
            for k, what in _FOLDED_SCALES:
                v = attrs.get(k)
                if isinstance(v, dict) and "__array__" in v:      # a schema-checked array record: numbers only
                    v = np.asarray(v["__array__"]["data"], np.float64)
                if v is not None:
                    parts.append(f"{what} {scale_text(np.asarray(v, np.float64))}")
            codes = header.get("tensors", {}).get(layer["inputs"][0] or "", {}).get("dtype", "8-bit")
            notes.append(f"{_type_name(str(codes))}: " + "; ".join(parts) if parts else None)
        else:
            notes.append(None)
    return notes, summary
