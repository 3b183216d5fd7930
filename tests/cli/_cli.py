"""Helpers for the CLI tests: run `kiln` as a user types it (in this process, through kiln.cli.main); small
ONNX models."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import onnx
from _kiln_cli import run_cli
from onnx import TensorProto, helper, numpy_helper

kiln = run_cli


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path → content hash; folders as 'dir')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_user_error(r: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, exactly one stderr line, no traceback; the line holds each of ``words``. Returns the line."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def two_inputs_model(path: Path) -> Path:
    """a[N,8] → Relu → ya and b[M,1,4] → Relu → yb: two inputs with dynamic dims."""
    g = helper.make_graph(
        [helper.make_node("Relu", ["a"], ["ya"], name="relu_a"),
         helper.make_node("Relu", ["b"], ["yb"], name="relu_b")],
        "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 8]),
                helper.make_tensor_value_info("b", TensorProto.FLOAT, ["M", 1, 4])],
        [helper.make_tensor_value_info("ya", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_value_info("yb", TensorProto.FLOAT, ["M", 1, 4])])
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def scalar_input_model(path: Path) -> Path:
    """y = x * sr with a rank-0 input ``sr`` (a sample rate, as in audio models)."""
    g = helper.make_graph([helper.make_node("Mul", ["x", "sr"], ["y"], name="mul")], "scalar",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
                           helper.make_tensor_value_info("sr", TensorProto.FLOAT, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def lstm_model(path: Path) -> Path:
    """One LSTM layer: on CPU it has two valid tactics (the step loop and torch's fused LSTM) to time."""
    rng = np.random.default_rng(0)
    hidden, size = 8, 8
    w = numpy_helper.from_array((rng.standard_normal((1, 4 * hidden, size)) * 0.3).astype(np.float32), "W")
    r = numpy_helper.from_array((rng.standard_normal((1, 4 * hidden, hidden)) * 0.3).astype(np.float32), "R")
    g = helper.make_graph([helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=hidden, name="lstm")],
                          "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 1, size])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, r])
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)]), path)
