"""Weight values on request: statistics, a printed preview and ``.npy`` bytes."""
from __future__ import annotations

import io

import numpy as np

from kiln.errors import ViewerError
from kiln.viewer.graph import ViewWeight

MAX_STATS_ELEMENTS = 200_000_000      # beyond this the page shows shape and type only


def load(w: ViewWeight) -> np.ndarray:
    if w.load is None:
        raise ViewerError(f"weight {w.name!r} has no stored values in this file.")
    try:
        return np.asarray(w.load())
    except ViewerError:
        raise
    except Exception as exc:
        raise ViewerError(f"weight {w.name!r} could not be read: {exc}") from None


def stats(w: ViewWeight) -> dict:
    """min/max/mean/std, zero fraction, NaN/Inf counts and a printed preview of the values."""
    a = load(w)
    if a.size > MAX_STATS_ELEMENTS:
        return {"error": f"{a.size:,} elements: too many to summarise here; download the .npy instead."}
    if a.dtype.kind not in "biufc":
        try:
            a = a.astype(np.float32)       # bfloat16, float8 and friends from ml_dtypes
        except Exception:
            return {"preview": _preview(a)}
    out: dict = {"preview": _preview(a)}
    if a.size == 0:
        return out
    if a.dtype.kind == "c":
        a = np.abs(a)
    if a.dtype.kind == "f":
        nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        finite = a[np.isfinite(a)] if nan or inf else a
    else:
        nan = inf = 0
        finite = a
    out.update(nan=nan, inf=inf, zeros=float(np.count_nonzero(a == 0)) / a.size)
    if finite.size:
        out.update(min=_num(finite.min()), max=_num(finite.max()), mean=_num(finite.mean(dtype=np.float64)),
                   std=_num(finite.std(dtype=np.float64)))
    return out


def _num(v) -> float | int:
    v = v.item() if hasattr(v, "item") else v
    return v if isinstance(v, int) else float(v)


def _preview(a: np.ndarray) -> str:
    return np.array2string(a, threshold=120, edgeitems=3, precision=5, max_line_width=58, separator=", ")


def npy_bytes(w: ViewWeight) -> bytes:
    a = load(w)
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()
