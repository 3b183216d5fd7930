"""benchmarks/cpu_bench.py runs: one small zoo model in a child process gives a row with Kiln and ONNX
Runtime timed, Kiln's output checked against ONNX Runtime, and the report's ratios from the medians (wall time,
and process CPU time on 1-thread rows)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_bench.py"

pytest.importorskip("onnxruntime")


def _bench_module():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import cpu_bench
    finally:
        sys.path.remove(str(BENCH.parent))
    return cpu_bench


def test_one_model_row():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, str(BENCH), "--one", "zoo:lstm_2x_bidirectional", "--small", "--batches",
                          "2", "--threads", "1", "--rounds", "5", "--warmup", "1", "--no-openvino", "--baseline"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(rows) == 1
    row = rows[0]
    assert (row["model"], row["batch"], row["threads"]) == ("lstm_2x_bidirectional", 2, 1)
    assert set(row["contenders"]) == {"kiln", "kiln_torch_conv", "onnxruntime"}
    for c in row["contenders"].values():
        assert c["runs"] == 5 and 0 < c["median_ms"] <= c["p90_ms"] and c["cpu_median_ms"] > 0
    assert row["contenders"]["kiln"]["within_fp32_tol"]
    text = _bench_module().report(rows)
    kiln, ort = row["contenders"]["kiln"]["median_ms"], row["contenders"]["onnxruntime"]["median_ms"]
    assert f"vs onnxruntime {ort / kiln:.2f}x" in text
    kiln, ort = row["contenders"]["kiln"]["cpu_median_ms"], row["contenders"]["onnxruntime"]["cpu_median_ms"]
    assert f"CPU time vs onnxruntime {ort / kiln:.2f}x" in text


def test_report_and_command_line_helpers():
    bench = _bench_module()
    rows = [{"model": m, "batch": 1, "threads": t, "contenders": {
        "kiln": {"median_ms": k, "p90_ms": k, "cpu_median_ms": k / 2, "max_abs_vs_ort": 0.0, "within_fp32_tol": True},
        "onnxruntime": {"median_ms": o, "p90_ms": o, "cpu_median_ms": c}}}
        for m, t, k, o, c in (("a", 1, 1.0, 2.0, 1.5), ("b", 2, 4.0, 2.0, 1.0), ("c", 1, 4.0, 2.0, 1.0))]
    text = bench.report(rows)
    assert "geometric mean Kiln speed-up over onnxruntime: 0.79x over 3 rows (min 0.50x)" in text
    # CPU time ratios only for the 1-thread rows a and c: 1.5 / 0.5 and 1.0 / 2.0
    assert "in CPU time, 1-thread rows: 1.22x over 2 rows (min 0.50x)" in text
    assert "CPU time vs onnxruntime 3.00x" in text and text.count("CPU time vs") == 2
    assert bench._without_out(["--out", "x.json", "--small", "--out=y.json", "--threads", "1"]) == \
        ["--small", "--threads", "1"]
    import numpy as np
    err, ok = bench._max_err([np.array([1.0, 2.0])], [np.array([1.0, 2.0004])])
    assert err == pytest.approx(4e-4) and not ok          # bound: 1e-5 + 1e-4 * 2.0004
