"""benchmarks/cpu_bench.py's FP64 judgement (judge_fp64), used where a zoo row's outputs are further from ONNX
Runtime's than the FP32 bound: the contender against the model in FP64, beside ONNX Runtime and FP32 eager
PyTorch as yardsticks; and the row line that reports it."""
from __future__ import annotations

import numpy as np
import pytest

from test_cpu_bench import _bench_module


@pytest.fixture(scope="module")
def bench():
    return _bench_module()


def _off(ref: np.ndarray, at: int, by: float) -> list[np.ndarray]:
    """``ref`` with one element moved by ``by`` (the max abs error is then exactly |by|)."""
    out = ref.copy()
    out.flat[at] += by
    return [out]


REF = np.linspace(-1000.0, 1500.0, 4001).reshape(1, -1)     # max|ref| 1500: the FP32 bound is 0.15001


def test_within_factor_of_the_larger_yardstick(bench):
    fp64, ort, eager = [REF], _off(REF, 10, 1.0), _off(REF, 20, -0.5)
    ok = bench.judge_fp64(_off(REF, 30, 1.99), ort, eager, fp64)
    assert ok["within_fp64_judgement"] and ok["fp64_agrees_with_ort"]
    assert ok["max_abs_vs_fp64"] == [pytest.approx(1.99)]
    assert ok["ort_max_abs_vs_fp64"] == [pytest.approx(1.0)] and ok["eager_fp32_max_abs_vs_fp64"] == [
        pytest.approx(0.5)]
    assert not bench.judge_fp64(_off(REF, 30, 2.01), ort, eager, fp64)["within_fp64_judgement"]
    # the larger yardstick counts, whichever it is
    assert bench.judge_fp64(_off(REF, 30, -3.9), _off(REF, 10, 0.01), _off(REF, 20, 2.0), fp64)[
        "within_fp64_judgement"]
    assert not bench.judge_fp64(_off(REF, 30, -4.1), _off(REF, 10, 0.01), _off(REF, 20, 2.0), fp64)[
        "within_fp64_judgement"]


def test_fp32_bound_of_the_truth_passes_even_when_the_yardsticks_are_exact(bench):
    fp64 = [REF]
    assert bench.judge_fp64(_off(REF, 5, 0.15), [REF], [REF], fp64)["within_fp64_judgement"]
    assert not bench.judge_fp64(_off(REF, 5, 0.16), [REF], [REF], fp64)["within_fp64_judgement"]


def test_every_output_is_judged(bench):
    small = np.linspace(-1.0, 1.0, 101)
    fp64, ort, eager = [REF, small], _off(REF, 1, 1.0) + [small], [REF, small]
    assert bench.judge_fp64(_off(REF, 2, 1.5) + [small], ort, eager, fp64)["within_fp64_judgement"]
    # the second output is 1e-3 off while both yardsticks are exact there: beyond its own bound (1.1e-4)
    res = bench.judge_fp64(_off(REF, 2, 1.5) + _off(small, 3, 1e-3), ort, eager, fp64)
    assert not res["within_fp64_judgement"] and res["max_abs_vs_fp64"][1] == pytest.approx(1e-3)


def test_nothing_passes_where_onnx_runtime_disagrees_with_the_fp64_run(bench):
    # an FP64 module that is not the function ONNX Runtime runs (relative L2 1e-2) judges nothing
    res = bench.judge_fp64([REF], [REF * 1.01], [REF], [REF])
    assert not res["fp64_agrees_with_ort"] and not res["within_fp64_judgement"]
    assert bench.judge_fp64([REF], [REF * 1.0005], [REF], [REF])["fp64_agrees_with_ort"]


def test_wrong_shapes_or_counts_fail(bench):
    assert not bench.judge_fp64([REF.T], [REF], [REF], [REF])["within_fp64_judgement"]
    assert not bench.judge_fp64([REF, REF], [REF], [REF], [REF])["within_fp64_judgement"]


def test_row_line_reports_the_judgement(bench):
    def row(kiln: dict) -> dict:
        return {"model": "yolov5l", "batch": 1, "threads": 1, "contenders": {
            "kiln": {"median_ms": 2.0, "p90_ms": 2.0, **kiln}, "onnxruntime": {"median_ms": 1.0, "p90_ms": 1.0}}}
    judged = bench.judge_fp64(_off(REF, 30, 1.5), _off(REF, 10, 1.0), [REF], [REF])
    line = bench._line(row({"max_abs_vs_ort": 2.2, "within_fp32_tol": False, **judged}))
    assert "err 2.2e+00 (vs FP64 1.5e+00; ORT's 1.0e+00, eager FP32's 0.0e+00: ok)" in line
    judged = bench.judge_fp64(_off(REF, 30, 2.5), _off(REF, 10, 1.0), [REF], [REF])
    assert line.replace("1.5e+00", "2.5e+00").replace(": ok)", ": FAIL)") == bench._line(
        row({"max_abs_vs_ort": 2.2, "within_fp32_tol": False, **judged}))
    assert bench._line(row({"max_abs_vs_ort": 2.2, "within_fp32_tol": False})).endswith("err 2.2e+00 FAIL")
    assert bench._line(row({"max_abs_vs_ort": 1e-6, "within_fp32_tol": True})).endswith("err 1.0e-06")
