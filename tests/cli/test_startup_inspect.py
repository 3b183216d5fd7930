"""`kiln inspect model.onnx` reads the graph with kiln.onnx.reader, without importing onnx (seconds of
start-up): value types (Kiln's dtype names), symbolic and unknown dims, opsets, producer and nodes as written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper, save

_PROBE = ("import sys, io, json, contextlib, kiln.cli\n"
          "buf = io.StringIO()\n"
          "with contextlib.redirect_stdout(buf):\n"
          "    code = kiln.cli.main(['inspect', sys.argv[1], '--json'])\n"
          "print(json.dumps([code, 'onnx' in sys.modules, 'torch' in sys.modules, json.loads(buf.getvalue())]))\n")


def _model(path: Path) -> Path:
    """A sequence input, a float input with a symbolic and an unknown dim, a string input; bfloat16, int64,
    string and float8 outputs; a custom domain; one initializer."""
    nodes = [helper.make_node("SequenceLength", ["s"], ["n"], name="len"),
             helper.make_node("Cast", ["x"], ["c"], to=TensorProto.BFLOAT16, name="cast"),
             helper.make_node("Identity", ["t"], ["t2"]),
             helper.make_node("Foo", ["x", "w"], ["f"], domain="com.example", name="foo")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None),
                                       helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, None]),
                                       helper.make_tensor_value_info("t", TensorProto.STRING, [2])],
                          [helper.make_tensor_value_info("n", TensorProto.INT64, []),
                           helper.make_tensor_value_info("c", TensorProto.BFLOAT16, ["N", 3, None]),
                           helper.make_tensor_value_info("t2", TensorProto.STRING, [2]),
                           helper.make_tensor_value_info("f", TensorProto.FLOAT8E4M3FN, [1])],
                          [numpy_helper.from_array(np.ones(3, np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 2)],
                          producer_name="maker", producer_version="1.2")
    save(m, str(path))
    return path


def test_inspect_reads_an_onnx_model_without_onnx(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", _PROBE, str(_model(tmp_path / "m.onnx"))], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    code, onnx_imported, torch_imported, info = json.loads(r.stdout.strip().splitlines()[-1])
    assert (code, onnx_imported, torch_imported) == (0, False, False)
    assert info["opsets"] == {"ai.onnx": 17, "com.example": 2} and info["producer"] == "maker 1.2"
    assert info["initializers"] == 1
    assert info["inputs"] == [{"name": "s", "dtype": "?", "shape": []},
                              {"name": "x", "dtype": "float32", "shape": ["N", 3, "?"]},
                              {"name": "t", "dtype": "string", "shape": [2]}]
    assert info["outputs"] == [{"name": "n", "dtype": "int64", "shape": []},
                               {"name": "c", "dtype": "bfloat16", "shape": ["N", 3, "?"]},
                               {"name": "t2", "dtype": "string", "shape": [2]},
                               {"name": "f", "dtype": "float8_e4m3fn", "shape": [1]}]
    assert info["nodes"] == [
        {"name": "len", "op": "SequenceLength", "domain": "ai.onnx", "inputs": ["s"], "outputs": ["n"]},
        {"name": "cast", "op": "Cast", "domain": "ai.onnx", "inputs": ["x"], "outputs": ["c"]},
        {"name": "", "op": "Identity", "domain": "ai.onnx", "inputs": ["t"], "outputs": ["t2"]},
        {"name": "foo", "op": "Foo", "domain": "com.example", "inputs": ["x", "w"], "outputs": ["f"]}]
