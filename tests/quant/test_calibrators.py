"""Calibrators against numpy on known distributions: max exact, percentile against numpy.percentile,
entropy against an independent loop-by-loop KL search written here and against known properties, mse against a
brute-force search over the raw samples and the Gaussian's known optimal clipping; weight scales and rounding
against numpy."""
from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import numpy_helper

import kiln.onnx
from kiln.errors import BuildError
from kiln.builder.quant.calibrate import calibrate, load_batches
from kiln.builder.quant.calibrators import Histogram, check_calibrator, entropy_amax, mse_amax, percentile_amax
from kiln.builder.quant.insert import act_scale, quantize_weight, weight_scales

from _quant_models import blobs, trained_mlp

RNG = np.random.default_rng(0)
DISTRIBUTIONS = {"normal": lambda n: RNG.standard_normal(n), "uniform": lambda n: RNG.uniform(-3, 1, n),
                 "laplace": lambda n: RNG.laplace(0, 1, n), "relu": lambda n: np.maximum(RNG.standard_normal(n), 0)}


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("pct", [50.0, 99.0, 99.99])
def test_percentile_vs_numpy(dist, pct):
    x = DISTRIBUTIONS[dist](200_000)
    h = Histogram(np.abs(x).max())
    for part in np.array_split(x, 7):               # filled batch by batch, as calibration does
        h.add(part)
    got, want = percentile_amax(h, pct), np.percentile(np.abs(x), pct)
    width = h.amax / len(h.counts)
    assert -1e-12 <= got - want <= width * (1 + 1e-9), (got, want, width)


def _entropy_reference(counts: np.ndarray, edges: np.ndarray, levels: int) -> float:
    """TensorRT's entropy calibration, written as plainly as possible: loops over candidates and bins (bin 0 counted
    as bin 1, as pytorch-quantization's _compute_amax_entropy does)."""
    counts = np.concatenate([counts[1:2], counts[1:]])
    n = len(counts)
    best, best_kl = None, None
    for i in range(levels, n + 1):
        p = [float(c) for c in counts[:i]]
        p[i - 1] += float(counts[i:].sum())
        q = [0.0] * i
        for g in range(levels):
            members = [j for j in range(i) if j * levels // i == g]
            nonzero = [j for j in members if counts[j] > 0]
            for j in nonzero:
                q[j] = sum(float(counts[m]) for m in members) / len(nonzero)
        sp, sq = sum(p), sum(q)
        kl = 0.0
        for pj, qj in zip(p, q):
            if pj > 0:
                kl = kl + (pj / sp) * np.log((pj / sp) / (qj / sq)) if qj > 0 else float("inf")
        if best_kl is None or kl < best_kl:
            best, best_kl = i, kl
    return float(edges[best])


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
def test_entropy_vs_independent_search(dist):
    x = DISTRIBUTIONS[dist](100_000)
    h = Histogram(np.abs(x).max(), bins=400)
    h.add(x)
    got = entropy_amax(h, levels=64)
    assert got == pytest.approx(_entropy_reference(h.counts, h.edges, 64), rel=1e-12)
    assert 0 < got <= h.amax


def test_entropy_properties():
    """Rare far outliers are clipped away; a uniform range is kept nearly whole; data that fits the finest
    grid is not clipped at all."""
    x = np.concatenate([RNG.standard_normal(200_000), [60.0, -55.0, 58.0]])
    h = Histogram(np.abs(x).max())
    h.add(x)
    assert entropy_amax(h) < 10.0 < h.amax
    u = RNG.uniform(-2, 2, 200_000)
    h = Histogram(np.abs(u).max())
    h.add(u)
    assert entropy_amax(h) >= 0.9 * h.amax
    h = Histogram(100.0)
    h.add(RNG.uniform(0, 3, 1000))                   # every value in the first 62 of 2048 bins
    assert entropy_amax(h) == pytest.approx(h.edges[np.flatnonzero(h.counts)[-1] + 1])


def test_entropy_keeps_the_range_of_relu_outputs():
    """A ReLU's output, mostly exact zeros: the zeros do not pull the threshold down into the nonzero values (it
    fell to 0.27 of a range of 4.3 when the zero bin counted in full)."""
    for zeros in (0.5, 0.9):
        x = np.where(RNG.random(200_000) < zeros, 0.0, np.abs(RNG.standard_normal(200_000)))
        h = Histogram(x.max())
        h.add(x)
        assert entropy_amax(h) > np.percentile(x[x > 0], 99), zeros


def _sample_mse(x: np.ndarray, amax: np.ndarray, mode: str) -> np.ndarray:
    """Mean squared error of quantizing the samples ``x`` with each threshold of ``amax``, computed on the samples
    themselves: int8 by numpy rounding, fp8 by torch's E4M3 cast."""
    out = []
    for a in amax:
        if mode == "int8":
            q = np.clip(np.rint(x / a * 127), -127, 127) * a / 127
        else:
            import torch
            t = torch.from_numpy(np.clip(x / a * 448, -448, 448).astype(np.float32))
            q = t.to(torch.float8_e4m3fn).to(torch.float64).numpy() * a / 448
        out.append(np.mean((q - x) ** 2))
    return np.array(out)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
def test_mse_vs_brute_force_on_the_samples(dist, mode):
    """The histogram's threshold (bin centres stand for their values) is within 1% of the best error a search over
    the raw samples finds among the same candidates."""
    x = DISTRIBUTIONS[dist](20_000)
    h = Histogram(np.abs(x).max())
    for part in np.array_split(x, 3):
        h.add(part)
    got = mse_amax(h, mode)
    candidates = h.edges[128:]
    errors = _sample_mse(x, candidates, mode)
    assert got in candidates
    assert _sample_mse(x, [got], mode)[0] <= errors.min() * 1.01, (got, candidates[errors.argmin()])
    if dist == "uniform" and mode == "int8":
        assert got >= 0.97 * h.amax                     # nothing to gain from clipping a flat distribution


@pytest.mark.parametrize("dist", ["normal", "laplace"])
def test_mse_matches_the_known_optimum(dist):
    """For N(0, 1) and Laplace(0, 1) with 127 steps a side the error is the clipped tails' plus the rounding
    noise's, step**2 / 12 over the kept range (Banner et al., ACIQ), in closed form: its minimum (near 3.9 and 9.9)
    is the histogram's threshold to a few percent."""
    a = np.linspace(2.0, 14.0, 12001)
    if dist == "normal":
        tail = np.array([math.erfc(v / math.sqrt(2)) for v in a])            # P(|x| > a)
        clipped = (1 + a ** 2) * tail - 2 * a * np.exp(-a ** 2 / 2) / math.sqrt(2 * math.pi)
    else:
        tail = np.exp(-a)
        clipped = 2 * np.exp(-a)
    best = a[int(np.argmin(clipped + (a / 127) ** 2 / 12 * (1 - tail)))]
    assert (3.8 < best < 4.0) if dist == "normal" else (9.6 < best < 10.2)
    rng = np.random.default_rng(4)
    x = rng.standard_normal(2_000_000) if dist == "normal" else rng.laplace(0, 1, 2_000_000)
    h = Histogram(np.abs(x).max())
    h.add(x)
    assert mse_amax(h) == pytest.approx(best, rel=0.03)
    assert mse_amax(h) < 0.8 * h.amax or dist == "normal"


def test_mse_edge_cases():
    """An all-zero tensor has range 0; values below the smallest candidate keep their whole range."""
    h = Histogram(0.0)
    h.add(np.zeros(10))
    assert mse_amax(h) == 0.0
    h = Histogram(100.0)
    h.add(RNG.uniform(0, 3, 1000))                   # every value in the first 62 of 2048 bins
    assert mse_amax(h) == pytest.approx(h.edges[np.flatnonzero(h.counts)[-1] + 1])


def test_mse_calibration_on_a_network():
    """The mse calibrator through Kiln's FP32 engine: the hidden activation's threshold is the one the same
    histogram of numpy's values (float64) gives, to a bin."""
    model = trained_mlp(steps=5)
    net = kiln.onnx.parse(model)
    x, _ = blobs(70, seed=3)
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    h = np.maximum(x.astype(np.float64) @ inits["w1"] + inits["b1"], 0)
    hist = Histogram(h.max())
    hist.add(h)
    amax = calibrate(net, ["h"], load_batches([{"x": x}], net), "cpu", "mse", 99.99)
    assert amax["h"] == pytest.approx(mse_amax(hist), abs=2 * hist.amax / len(hist.counts))


def test_max_calibration_on_a_network():
    """The max calibrator over batches, through Kiln's FP32 engine: the network input's max is exact, the
    hidden activation's matches numpy (float64) to float32 rounding."""
    model = trained_mlp(steps=5)
    net = kiln.onnx.parse(model)
    x, _ = blobs(70, seed=3)
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    h = np.maximum(x.astype(np.float64) @ inits["w1"] + inits["b1"], 0)
    batches = load_batches([{"x": x[:32]}, {"x": x[32:]}], net)
    amax = calibrate(net, ["x", "h"], batches, "cpu", "max", 99.99)
    assert amax["x"] == float(np.abs(x).max())
    assert amax["h"] == pytest.approx(h.max(), rel=1e-5)


def test_weight_scales_and_rounding():
    w = RNG.standard_normal((6, 4, 3, 3)).astype(np.float32)
    w[2] = 0.0                                       # an all-zero channel
    s = weight_scales(w, 0, 127.0)
    want = np.abs(w.astype(np.float64)).reshape(6, -1).max(1) / 127
    np.testing.assert_allclose(s[[0, 1, 3, 4, 5]], want[[0, 1, 3, 4, 5]].astype(np.float32), rtol=0)
    assert s[2] == 1.0 and s.dtype == np.float32
    q = quantize_weight(w, s, 0, 127.0)
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() == 127
    np.testing.assert_array_equal(q, np.rint(w / s[:, None, None, None]).astype(np.int8))
    err = np.abs(q * s[:, None, None, None] - w)
    assert np.all(err <= s[:, None, None, None] / 2 * (1 + 1e-6))
    m = RNG.standard_normal((5, 7)).astype(np.float32)     # a MatMul weight [K, N]: channels along axis 1
    np.testing.assert_allclose(weight_scales(m, 1, 127.0), np.abs(m).max(0) / 127, rtol=1e-7)
    assert act_scale(0.0, 127.0) == 1.0 and act_scale(254.0, 127.0) == 2.0


def test_bad_calibrator_settings():
    with pytest.raises(BuildError, match="not one of max, percentile, entropy"):
        check_calibrator("kl", 99.9)
    with pytest.raises(BuildError, match="outside"):
        check_calibrator("percentile", 0.0)
