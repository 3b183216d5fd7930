"""Start-up: commands that only read files or list things do not import torch (seconds of start-up);
`kiln inspect` reads an engine header or an ONNX model's graph with the standard library and numpy;
`kiln plugins` imports the built-in plugins but neither Triton (their kernels are deferred until a launch:
kiln.triton_support) nor numpy. ONNX files are read without the onnx package (its ml_dtypes extension alone
costs a second or more), by `kiln inspect`, `kiln check` and `kiln build`. `kiln check` of a static model
whose layers' shapes follow in closed form (convolutions, pooling, matrix products, normalization,
element-wise layers, views, shape arithmetic on static shapes) does not import torch either (nothing in the
build's steps could refuse it). Shape inference on meta tensors does not import torch._dynamo (seconds of
CPU), in `kiln check` with a profile (which runs the build's steps) or in a small CPU build."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

_PROBE = ("import sys, io, json, contextlib, kiln.cli\n"
          "with contextlib.redirect_stdout(io.StringIO()):\n"
          "    code = kiln.cli.main(sys.argv[1:])\n"
          "print(json.dumps([code, sorted(m for m in ('torch', 'onnx', 'numpy', 'ml_dtypes', 'sympy', 'triton') "
          "if m in sys.modules)]))\n")


def _imported(*args: object) -> tuple[int, list[str]]:
    r = subprocess.run([sys.executable, "-c", _PROBE, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    code, mods = json.loads(r.stdout)
    return code, mods


@pytest.mark.parametrize("command,allowed", [(["inspect", "ENGINE"], {"numpy"}), (["inspect", "ENGINE", "--json"],
                                             {"numpy"}), (["plugins"], set()), (["check", "MODEL"], {"numpy"}),
                                             (["inspect", "MODEL"], {"numpy"})],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_reading_commands_do_not_import_torch(command, allowed, engine, models):
    code, mods = _imported(*[{"ENGINE": engine, "MODEL": models("two")}.get(a, a) for a in command])
    assert code == 0 and set(mods) <= allowed, mods


def test_parser_imports_nothing_heavy():
    r = subprocess.run([sys.executable, "-c", "import sys, kiln.cli; kiln.cli.make_parser(); "
                        "print(sorted(m for m in ('torch', 'onnx', 'numpy') if m in sys.modules))"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


_CHECK_THEN_BUILD = ("import sys, io, contextlib, kiln.cli\n"
                     "model, out = sys.argv[1:]\n"
                     "for args in (['check', model, '--shapes', 'x:1x3x8x8'],\n"
                     "             ['build', model, '-o', out, '--device', 'cpu', '-q']):\n"
                     "    with contextlib.redirect_stdout(io.StringIO()):\n"
                     "        code = kiln.cli.main(args)\n"
                     "    print(args[0], code, 'torch._dynamo' in sys.modules)\n")


def _small_cnn(path: Path) -> Path:
    """x[1,3,8,8] → Conv → Add → Relu → MaxPool → Sigmoid·Mul → GlobalAveragePool → Flatten → Gemm → Softmax."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
            (("w", (4, 3, 3, 3)), ("b", (1, 4, 1, 1)), ("fw", (5, 4)), ("fb", (5,)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "b"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Sigmoid", ["p"], ["s"]), helper.make_node("Mul", ["p", "s"], ["m"]),
             helper.make_node("GlobalAveragePool", ["m"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["l"], transB=1), helper.make_node("Softmax", ["l"], ["y"])]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], init)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_shape_inference_does_not_import_dynamo(tmp_path: Path) -> None:
    model = _small_cnn(tmp_path / "cnn.onnx")
    r = subprocess.run([sys.executable, "-c", _CHECK_THEN_BUILD, str(model), str(tmp_path / "cnn.kiln")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n")[:2] == ["check 0 False", "build 0 False"], r.stdout
    assert (tmp_path / "cnn.kiln").stat().st_size > 0


def _pointwise(path: Path) -> Path:
    """x[1,4] → Relu → Add (a [4] constant, broadcast) → Sigmoid → Cast(float16): static, shape-keeping layers."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "b"], ["a"]),
             helper.make_node("Sigmoid", ["a"], ["s"]), helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT16)]
    g = helper.make_graph(nodes, "pw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4])],
                          [numpy_helper.from_array(np.arange(4, dtype=np.float32), "b")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_check_of_a_static_pointwise_model_imports_neither_torch_nor_onnx(tmp_path: Path) -> None:
    model = _pointwise(tmp_path / "pw.onnx")
    assert _imported("check", model) == (0, ["numpy"])
    assert _imported("check", model, "--device", "cpu") == (0, ["numpy"])
    code, mods = _imported("check", model, "--shapes", "x:1x4")     # a profile is checked by the build's steps
    assert code == 0 and "torch" in mods and "onnx" not in mods, mods


def _matmul_relu(path: Path) -> Path:
    """x[1,4] → MatMul (a [4,4] constant) → Relu."""
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                          "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                          [numpy_helper.from_array(np.ones((4, 4), np.float32), "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_check_of_a_static_conv_gemm_matmul_model_imports_neither_torch_nor_onnx(tmp_path: Path) -> None:
    """Conv, MaxPool, GlobalAveragePool, Flatten, Gemm (the small CNN) and MatMul: shapes from kiln.ir.shape_rules."""
    for model in (_small_cnn(tmp_path / "cnn.onnx"), _matmul_relu(tmp_path / "mm.onnx")):
        assert _imported("check", model) == (0, ["numpy"]), model.name


_BUILDS = ("import sys, io, contextlib, json, kiln.cli\n"
           "codes = []\n"
           "for model in sys.argv[1:]:\n"
           "    with contextlib.redirect_stdout(io.StringIO()):\n"
           "        codes.append(kiln.cli.main(['build', model, '-o', model + '.kiln', '--device', 'cpu', '-q']))\n"
           "print(json.dumps([codes, sorted(m for m in ('torch', 'sympy', 'torch.fx.experimental.symbolic_shapes', "
           "'torch._dynamo') if m in sys.modules)]))\n")


def test_small_cpu_builds_do_not_import_sympy(tmp_path: Path) -> None:
    """Shape inference answers the common kinds in closed form (kiln/builder/shape_rules.py): torch's meta
    kernels would import torch.fx.experimental.symbolic_shapes and sympy through torch._check."""
    models = [_matmul_relu(tmp_path / "mm.onnx"), _small_cnn(tmp_path / "cnn.onnx")]
    r = subprocess.run([sys.executable, "-c", _BUILDS, *map(str, models)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [[0, 0], ["torch"]], r.stdout
    assert all(Path(f"{m}.kiln").stat().st_size > 0 for m in models)


def test_a_tiny_cpu_build_imports_neither_onnx_nor_ml_dtypes(tmp_path: Path) -> None:
    model = _pointwise(tmp_path / "pw.onnx")
    code, mods = _imported("build", model, "-o", tmp_path / "pw.kiln", "--device", "cpu", "-q")
    assert code == 0 and "torch" in mods and not {"onnx", "ml_dtypes"} & set(mods), mods
    assert (tmp_path / "pw.kiln").stat().st_size > 0
