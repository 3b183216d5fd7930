"""The calibration cache: a JSON file holding the model's fingerprint, the calibrator and the amax of each
calibrated tensor (with bias correction, also the float and quantized mean inputs of each corrected layer; with
smoothing, the factors of each smoothed activation), so a rebuild skips calibration. A cache is data: it is
validated before use, and one made for another model, another calibrator or another set of tensors is refused in
one line, never overwritten."""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import numpy as np

from kiln.errors import BuildError
from kiln.ir.network import Network

FORMAT = "kiln-calibration-cache"
VERSION = 1
SETTINGS = ("calibrator", "percentile", "quantize", "bias_correction", "smoothing")    # what settings() may record


def fingerprint(net: Network) -> str:
    """SHA-256 over the network's inputs, its layers (name, kind, tensors read and written) and its constants'
    bytes: two networks with one fingerprint compute the same function."""
    h = hashlib.sha256()
    head = {"inputs": [[t.name, t.dtype, [str(d) for d in (t.shape or [])]] for t in net.inputs],
            "outputs": [t.name for t in net.outputs],
            "layers": [[layer.name, layer.kind, [t.name if t is not None else None for t in layer.inputs],
                        [t.name for t in layer.outputs]] for layer in net.layers]}
    h.update(json.dumps(head, sort_keys=True).encode())
    for t in sorted(net.constants(), key=lambda t: t.name):
        v = np.ascontiguousarray(t.value)
        h.update(f"{t.name}\0{v.dtype.str}\0{v.shape}\0".encode())
        if v.dtype != object:
            h.update(v.view(np.uint8).reshape(-1).data if v.size else b"")
    return h.hexdigest()


def settings(calibrator: str, percentile: float, mode: str = "int8", bias_correction: bool = False,
             smoothing: float | None = None) -> dict[str, Any]:
    """What a cache records about how its ranges were found: the calibrator (and percentile), the 8-bit type
    where the values depend on it (mse, bias correction), whether it holds bias correction's means, and the
    smoothing strength when activations were smoothed (their ranges are the smoothed network's)."""
    how: dict[str, Any] = {"calibrator": calibrator}
    if calibrator == "percentile":
        how["percentile"] = float(percentile)
    if calibrator == "mse" or bias_correction:
        how["quantize"] = mode
    if bias_correction:
        how["bias_correction"] = True
    if smoothing is not None:
        how["smoothing"] = float(smoothing)
    return how


def load(path: str, model: str, how: dict[str, Any], names: list[str], mean_names: list[str] = (),
         smooth_channels: dict[str, int] | None = None
         ) -> tuple[dict[str, float], dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]] | None:
    """The amax table cached in ``path`` for this model (``model``: its fingerprint) and calibration ``how``, the
    mean inputs of layers ``mean_names`` (bias correction) and the smoothing factors of the activations in
    ``smooth_channels`` (by name: their channel counts); None when the file does not exist yet."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(1 << 26).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BuildError(f"Calibration cache {path!r} is not a readable JSON file ({type(exc).__name__}); give "
                         f"another --calib-cache path (this one is left as it is).") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise BuildError(f"{path!r} is not a Kiln calibration cache (version {VERSION}); give another --calib-cache "
                         f"path (this file is left as it is).")
    if doc.get("model") != model:
        raise BuildError(f"Calibration cache {path!r} was made for another model (fingerprint "
                         f"{str(doc.get('model'))[:12]}..., this model {model[:12]}...); give a new --calib-cache "
                         f"path or delete that file to calibrate again.")
    if {k: doc.get(k) for k in how} != how or doc.get("smoothing") != how.get("smoothing"):
        made = {k: doc[k] for k in SETTINGS if k in doc}
        raise BuildError(f"Calibration cache {path!r} was made with {_fmt(made)}, not {_fmt(how)}; pass those "
                         f"settings, or a new --calib-cache path to calibrate again.")
    amax = doc.get("amax")
    if not isinstance(amax, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            for v in amax.values()):
        raise BuildError(f"Calibration cache {path!r} is damaged: 'amax' must map tensor names to finite numbers "
                         f">= 0; delete it to calibrate again.")
    _require(path, amax, names, "range for tensor")
    return ({n: float(amax[n]) for n in names}, _means(path, doc.get("means", {}), mean_names),
            _factors(path, doc.get("smooth", {}), smooth_channels or {}))


def _factors(path: str, table: Any, channels: dict[str, int]) -> dict[str, np.ndarray]:
    """The cache's smoothing factors of the activations ``channels`` names, checked: one finite positive number
    per channel."""
    if not isinstance(table, dict) or not all(
            isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                        and x > 0 for x in v) for v in table.values()):
        raise BuildError(f"Calibration cache {path!r} is damaged: 'smooth' must map tensor names to lists of finite "
                         f"numbers > 0; delete it to calibrate again.")
    _require(path, table, list(channels), "smoothing factors for tensor")
    bad = [n for n, c in channels.items() if len(table[n]) != c]
    if bad:
        raise BuildError(f"Calibration cache {path!r} has {len(table[bad[0]])} smoothing factors for tensor "
                         f"{bad[0]!r}, which has {channels[bad[0]]} channels; give a new --calib-cache path to "
                         f"calibrate again.")
    return {n: np.array(table[n], np.float64) for n in channels}


def _means(path: str, means: Any, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The cache's mean inputs of layers ``names``, checked: two equally long lists of finite numbers per layer."""
    def ok(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                           and math.isfinite(x) for x in v)
    if not isinstance(means, dict) or not all(
            isinstance(m, dict) and ok(m.get("float")) and ok(m.get("quantized"))
            and len(m["float"]) == len(m["quantized"]) for m in means.values()):
        raise BuildError(f"Calibration cache {path!r} is damaged: 'means' must map layer names to equally long "
                         f"'float' and 'quantized' lists of finite numbers; delete it to calibrate again.")
    _require(path, means, names, "mean inputs for layer")
    return {n: (np.array(means[n]["float"], np.float64), np.array(means[n]["quantized"], np.float64)) for n in names}


def save(path: str, model: str, how: dict[str, Any], amax: dict[str, float],
         means: dict[str, tuple[np.ndarray, np.ndarray]] | None = None, factors: dict[str, np.ndarray] | None = None
         ) -> None:
    """Write the cache (to a temporary file first, so a failed write leaves no half file)."""
    doc = {"format": FORMAT, "version": VERSION, "model": model, **how, "amax": dict(sorted(amax.items()))}
    if means:
        doc["means"] = {n: {"float": [float(v) for v in a.ravel()], "quantized": [float(v) for v in b.ravel()]}
                        for n, (a, b) in sorted(means.items())}
    if factors:
        doc["smooth"] = {n: [float(v) for v in np.ravel(f)] for n, f in sorted(factors.items())}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise BuildError(f"Cannot write the calibration cache {path!r} ({exc.strerror or exc}); check the path.") \
            from None


def _fmt(how: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in how.items())


def _require(path: str, table: dict, names: list[str], what: str) -> None:
    """Refuse a cache whose ``table`` lacks one of ``names`` (it was made with other layers quantized)."""
    missing = [n for n in names if n not in table]
    if missing:
        raise BuildError(f"Calibration cache {path!r} has no {what} {missing[0]!r} (it was made with other "
                         f"layers quantized); give a new --calib-cache path to calibrate again.")
