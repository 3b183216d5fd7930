"""Calibrators: from the values a tensor took on the calibration data to the range (amax) its scale covers.

``max`` takes the largest magnitude seen. ``percentile``, ``entropy`` and ``mse`` read a histogram of magnitudes
over [0, amax] (``Histogram``, filled in a second pass once amax is known): ``percentile`` takes the magnitude below
which that percent of the values lie; ``entropy`` is TensorRT's entropy calibrator 2: the threshold whose
clipped-and-quantized histogram is closest, by KL divergence, to the clipped original; ``mse`` is the threshold whose
quantization (rounding and clipping) has the least mean squared error over the histogram, as NVIDIA
pytorch-quantization's and ModelOpt's "mse" calibrators choose it.
"""
from __future__ import annotations

import numpy as np

from kiln.errors import BuildError

CALIBRATORS = ("max", "percentile", "entropy", "mse")
HIST_BINS = 2048           # TensorRT's entropy calibrator histogram size


class Histogram:
    """Counts of |x| in ``bins`` equal bins over [0, amax]; values above amax (none, when amax is the max) land
    in the last bin."""

    def __init__(self, amax: float, bins: int = HIST_BINS) -> None:
        self.amax = float(amax)
        self.counts = np.zeros(bins, np.int64)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0.0, self.amax, len(self.counts) + 1)

    def add(self, x: np.ndarray) -> None:
        """Count the magnitudes of ``x`` (non-finite values are left out)."""
        a = np.abs(np.asarray(x, np.float64).reshape(-1))
        a = a[np.isfinite(a)]
        if not a.size:
            return
        if self.amax <= 0:
            self.counts[0] += a.size
            return
        idx = np.minimum((a * (len(self.counts) / self.amax)).astype(np.int64), len(self.counts) - 1)
        self.counts += np.bincount(idx, minlength=len(self.counts))


def percentile_amax(hist: Histogram, percentile: float) -> float:
    """The upper edge of the bin where the cumulative count first reaches ``percentile`` percent."""
    total = int(hist.counts.sum())
    if total == 0 or hist.amax <= 0:
        return 0.0
    cdf = np.cumsum(hist.counts)
    i = int(np.searchsorted(cdf, total * percentile / 100.0, side="left"))
    return float(hist.edges[min(i, len(hist.counts) - 1) + 1])


def entropy_amax(hist: Histogram, levels: int = 128) -> float:
    """TensorRT's entropy calibration: for each candidate threshold i (in bins, from ``levels`` up), P is the
    histogram cut at i with the cut-off counts added to its last bin, Q is P's first i bins merged into
    ``levels`` groups and spread back evenly over each group's nonzero bins; the threshold is the upper edge of
    the first i that minimizes KL(P || Q) (infinite where P has mass and Q none). Bin 0 is given bin 1's count
    first, as NVIDIA's pytorch-quantization does: the exact zeros of a ReLU's output (often most of its values)
    would otherwise rule the search and clip the nonzero values to a sliver of their range.

    Every candidate at once, from prefix sums: Q's total is P's first i bins' count, so KL(P || Q) =
    (sum p log p - sum p log q) / |P| + log(|Q| / |P|), where sum p log q is each group's count times the log of
    its average, plus the cut-off counts times the log of the last bin's q."""
    counts = hist.counts.astype(np.float64)
    n = len(counts)
    if n > 1:
        counts[0] = counts[1]
    total = counts.sum()
    if total == 0 or hist.amax <= 0:
        return 0.0
    nonzero = np.flatnonzero(counts)
    if nonzero[-1] < levels:                   # every value fits the finest grid; nothing to clip
        return float(hist.edges[nonzero[-1] + 1])
    used = counts > 0
    first = np.concatenate([[0.0], np.cumsum(counts)])                     # first[k] = counts[:k].sum()
    spread_first = np.concatenate([[0.0], np.cumsum(used)])                 # nonzero bins among the first k
    plogp_first = np.concatenate([[0.0], np.cumsum(counts * _log(counts))])
    i = np.arange(levels, n + 1)                                            # the candidates
    starts = (np.arange(levels + 1)[None, :] * i[:, None] + levels - 1) // levels   # group g: bins starts[g]..
    sums = first[starts[:, 1:]] - first[starts[:, :-1]]
    avg = sums / np.maximum(spread_first[starts[:, 1:]] - spread_first[starts[:, :-1]], 1.0)
    last, cut = counts[i - 1], total - first[i]
    plogp = plogp_first[i - 1] + (last + cut) * _log(last + cut)
    plogq = np.sum(sums * _log(avg), axis=1) + cut * _log(np.where(last > 0, avg[:, -1], 0.0))
    with np.errstate(divide="ignore"):
        kl = (plogp - plogq) / total + np.log(first[i] / total)
    kl[((last == 0) & (cut > 0)) | (first[i] <= 0)] = np.inf
    return float(hist.edges[i[int(np.argmin(kl))]])


def mse_amax(hist: Histogram, mode: str = "int8", start: int = 128) -> float:
    """The candidate threshold (the upper edge of bin i, for every i from ``start``) whose symmetric quantization
    to ``mode`` (int8: 127 steps each side; fp8: E4M3 values, saturating at 448) has the least mean squared error
    over the histogram, each bin's values taken at its centre: values past the threshold saturate, values below it
    round to the nearest code. Ties go to the smallest threshold."""
    counts = hist.counts.astype(np.float64)
    n = len(counts)
    if counts.sum() == 0 or hist.amax <= 0:
        return 0.0
    nonzero = np.flatnonzero(counts)
    start = min(start, n)
    if nonzero[-1] < start:                    # every value below the smallest candidate: keep the whole range
        return float(hist.edges[nonzero[-1] + 1])
    edges = hist.edges
    centres = (edges[nonzero] + edges[nonzero + 1]) / 2
    weights = counts[nonzero]
    best, best_err = n, np.inf
    for chunk in np.array_split(np.arange(start, n + 1), max(1, (n + 1 - start) // 128)):
        amax = edges[chunk][:, None]
        err = ((fake_quantize(centres[None, :] / amax, mode) * amax - centres[None, :]) ** 2) @ weights
        i = int(np.argmin(err))
        if err[i] < best_err:
            best, best_err = int(chunk[i]), float(err[i])
    return float(edges[best])


def fake_quantize(x: np.ndarray, mode: str) -> np.ndarray:
    """``x`` (a fraction of the range, so amax is 1) quantized to ``mode``'s symmetric grid and back: int8 rounds
    half to even over 127 steps each side; fp8 rounds to the nearest E4M3 value of ``x * 448``; both saturate."""
    if mode == "int8":
        return np.clip(np.rint(x * 127.0), -127.0, 127.0) / 127.0
    import torch
    t = torch.from_numpy(np.clip(np.asarray(x, np.float64) * 448.0, -448.0, 448.0).astype(np.float32))
    return t.to(torch.float8_e4m3fn).to(torch.float64).numpy() / 448.0


def _log(x: np.ndarray) -> np.ndarray:
    """log x where x > 0, else 0 (so that 0 log 0 is 0)."""
    return np.log(np.where(x > 0, x, 1.0))


def default_calibrator(mode: str) -> str:
    """The calibrator a quantization mode uses unless told: mse for int8 (on the real trained models and held-out
    inputs of docs/quantization.md it kept task agreement with FP32 at or above max's on every model, entropy and
    percentile below it on some), max for fp8, whose E4M3 steps grow with magnitude, so outliers cost it little
    precision."""
    return "mse" if mode == "int8" else "max"


def check_calibrator(name: str, percentile: float) -> None:
    """Refuse an unknown calibrator or a percentile outside (0, 100]."""
    if name not in CALIBRATORS:
        raise BuildError(f"Calibrator {name!r} is not one of {', '.join(CALIBRATORS)}; pick one with --calibrator.")
    if not (isinstance(percentile, (int, float)) and 0 < percentile <= 100):
        raise BuildError(f"--percentile {percentile!r} is outside (0, 100]; give e.g. 99.99.")
