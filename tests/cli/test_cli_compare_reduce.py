"""`kiln compare --reduce` prints a command that reproduces the failure: the reduced model checked
with the same tolerances, error statistic, precision and device as the run that printed it."""
from __future__ import annotations

import shlex

import numpy as np
import onnx
import pytest
from _cli import kiln
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("onnxruntime")


def _mlp(path) -> None:
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["z"], name="add"),
             helper.make_node("Tanh", ["z"], ["y"], name="tanh")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_reproduce_command_keeps_the_tolerances(tmp_path):
    _mlp(tmp_path / "mlp.onnx")
    # FP16 on CPU is ~1e-3 off FP32: it passes FP16's default tolerances (1e-2) and fails these.
    r = kiln("compare", "mlp.onnx", "--device", "cpu", "--fp16", "--atol", "1e-6", "--rtol", "1e-6",
             "--check-error-stat", "mean", "--reduce", "--reduce-output", "small.onnx", "--no-histogram", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("reproduce: "))
    argv = shlex.split(line[len("reproduce: "):])
    assert argv[:3] == ["kiln", "compare", "small.onnx"]
    rest = [a for a in argv[3:] if a != "--fp16"]
    flags = dict(zip(rest[::2], rest[1::2]))
    assert "--fp16" in argv and flags["--device"] == "cpu" and flags["--check-error-stat"] == "mean"
    assert float(flags["--atol"]) == 1e-6 and float(flags["--rtol"]) == 1e-6
    again = kiln(*argv[1:], cwd=tmp_path)
    assert again.returncode == 1, again.stdout + again.stderr          # it still fails, as it did
    assert "FAIL" in again.stdout
