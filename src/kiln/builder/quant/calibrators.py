"""Calibrators: from the values a tensor took on the calibration data to the range (amax) its scale covers.

``max`` takes the largest magnitude seen. ``percentile`` and ``entropy`` read a histogram of magnitudes over
[0, amax] (``Histogram``, filled in a second pass once amax is known): ``percentile`` takes the magnitude below
which that percent of the values lie; ``entropy`` is TensorRT's entropy calibrator 2: the threshold whose
clipped-and-quantized histogram is closest, by KL divergence, to the clipped original.
"""
from __future__ import annotations

import numpy as np

from kiln.errors import BuildError

CALIBRATORS = ("max", "percentile", "entropy")
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
    the i that minimizes KL(P || Q). Bin 0 is given bin 1's count first, as NVIDIA's pytorch-quantization does:
    the exact zeros of a ReLU's output (often most of its values) would otherwise rule the search and clip the
    nonzero values to a sliver of their range."""
    counts = hist.counts.astype(np.float64)
    n = len(counts)
    if n > 1:
        counts[0] = counts[1]
    if counts.sum() == 0 or hist.amax <= 0:
        return 0.0
    nonzero = np.flatnonzero(counts)
    if nonzero[-1] < levels:                   # every value fits the finest grid; nothing to clip
        return float(hist.edges[nonzero[-1] + 1])
    best_i, best_kl = n, np.inf
    tail = np.cumsum(counts[::-1])[::-1]       # tail[i] = counts[i:].sum()
    for i in range(levels, n + 1):
        p = counts[:i].copy()
        if i < n:
            p[i - 1] += tail[i]
        group = (np.arange(i) * levels) // i   # which of the ``levels`` groups each bin merges into
        used = counts[:i] > 0
        sums = np.bincount(group, weights=counts[:i], minlength=levels)
        spread = np.bincount(group, weights=used.astype(np.float64), minlength=levels)
        q = np.where(used, sums[group] / np.maximum(spread[group], 1), 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return float(hist.edges[best_i])


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(P || Q) of two unnormalized histograms; a bin where P has mass and Q none costs infinity."""
    if q.sum() <= 0:
        return float("inf")
    p = p / p.sum()
    q = q / q.sum()
    mask = p > 0
    if np.any(q[mask] == 0):
        return float("inf")
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def default_calibrator(mode: str) -> str:
    """The calibrator a quantization mode uses unless told: entropy for int8, whose 255 uniform steps gain from
    clipping outliers; max for fp8, whose E4M3 steps grow with magnitude so outliers cost little precision."""
    return "max" if mode == "fp8" else "entropy"


def check_calibrator(name: str, percentile: float) -> None:
    """Refuse an unknown calibrator or a percentile outside (0, 100]."""
    if name not in CALIBRATORS:
        raise BuildError(f"Calibrator {name!r} is not one of {', '.join(CALIBRATORS)}; pick one with --calibrator.")
    if not (isinstance(percentile, (int, float)) and 0 < percentile <= 100):
        raise BuildError(f"--percentile {percentile!r} is outside (0, 100]; give e.g. 99.99.")
