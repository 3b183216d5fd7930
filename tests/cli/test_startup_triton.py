"""Start-up without Triton: kernels decorated with kiln.triton_support's ``triton.jit`` are deferred until
their first use, so a CPU build and run (which launch no Triton kernel) never import Triton; the first launch
imports it and the kernels then run as Triton's own (checked in the interpreter, as on CI)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

_W = np.array([[0.5, -1.0, 2.0, 0.25], [1.5, 0.75, -0.5, 1.0], [-2.0, 0.5, 1.0, -0.75], [0.25, -1.25, 0.5, 2.0]],
              np.float32)

_BUILD_AND_RUN = textwrap.dedent("""
    import sys, io, json, contextlib, kiln.cli
    model, engine, x, out = sys.argv[1:]
    codes = []
    for args in (["build", model, "-o", engine, "--device", "cpu", "-q"],
                 ["run", engine, "--input", "x=" + x, "--output-dir", out]):
        with contextlib.redirect_stdout(io.StringIO()):
            codes.append(kiln.cli.main(args))
    print(json.dumps([codes, "triton" in sys.modules, "torch" in sys.modules]))
""")


def _matmul_relu(path: Path) -> Path:
    """x[1,4] → MatMul (_W) → Relu."""
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                          "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                          [numpy_helper.from_array(_W, "w")])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("interpret", ["1", None], ids=["TRITON_INTERPRET=1", "no TRITON_INTERPRET"])
def test_a_tiny_cpu_build_and_run_import_no_triton(tmp_path: Path, interpret: str | None) -> None:
    x = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "out").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = interpret
    r = subprocess.run([sys.executable, "-c", _BUILD_AND_RUN, str(_matmul_relu(tmp_path / "mm.onnx")),
                        str(tmp_path / "mm.kiln"), str(tmp_path / "x.npy"), str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [[0, 0], False, True], r.stdout
    got = np.load(tmp_path / "out" / "y.npy")
    ref = np.maximum(x.astype(np.float64) @ _W.astype(np.float64), 0.0)
    # four float32 products and three sums: each output within 4 roundings of the sum of |terms|
    bound = 4 * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(_W).astype(np.float64))
    assert got.dtype == np.float32 and got.shape == (1, 4)
    assert np.all(np.abs(got - ref) <= bound), (got, ref)


_HELPER = '''
from __future__ import annotations
from kiln.triton_support import tl, triton


@triton.jit
def affine(v, A: tl.constexpr):
    return v * A + 1.0
'''

_KERNEL = '''
from __future__ import annotations
from kiln.triton_support import tl, triton
from {helper} import affine


@triton.jit(do_not_specialize=["n"])
def affine_kernel(x_ptr, y_ptr, n, A: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, affine(tl.load(x_ptr + offs, mask=m), A), mask=m)
'''

_LAUNCH = textwrap.dedent("""
    import sys, json
    sys.path.insert(0, sys.argv[1])
    import kern_mod, helper_mod
    import kiln.triton_support as ts
    before = ["triton" in sys.modules, type(kern_mod.affine_kernel).__name__, kern_mod.affine_kernel.__name__,
              kern_mod.tl is ts.tl]
    import torch
    x = torch.arange(10, dtype=torch.float32)
    y = torch.zeros(10)
    kern_mod.affine_kernel[(ts.cdiv(10, 4),)](x, y, 10, A=3.0, BLOCK=4)
    import triton, triton.language
    after = ["triton" in sys.modules, kern_mod.tl is triton.language, kern_mod.triton is triton,
             helper_mod.tl is triton.language, isinstance(kern_mod.affine_kernel, ts.DeferredKernel),
             isinstance(helper_mod.affine, ts.DeferredKernel), isinstance(kern_mod.affine, ts.DeferredKernel)]
    import late_mod                                 # imported after Triton was loaded: Triton's jit at once
    z = torch.zeros(10)
    late_mod.affine_kernel[(3,)](x, z, 10, A=-2.0, BLOCK=4)
    late = [isinstance(late_mod.affine_kernel, ts.DeferredKernel), late_mod.tl is triton.language]
    print(json.dumps([before, after, late, y.tolist(), z.tolist()]))
""")


def test_deferred_kernels_load_triton_on_first_launch(tmp_path: Path) -> None:
    """Importing modules with Triton kernels leaves Triton unimported; the first launch imports it, makes every
    deferred kernel Triton's and rebinds ``tl``/``triton`` and the kernels (a helper from another module
    included) in their modules; a module imported afterwards gets Triton's functions directly."""
    pytest.importorskip("triton")
    (tmp_path / "helper_mod.py").write_text(_HELPER)
    (tmp_path / "kern_mod.py").write_text(_KERNEL.format(helper="helper_mod"))
    (tmp_path / "late_mod.py").write_text(_KERNEL.format(helper="helper_mod"))
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _LAUNCH, str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    before, after, late, y, z = json.loads(r.stdout.strip().splitlines()[-1])
    assert before == [False, "DeferredKernel", "affine_kernel", True]
    assert after == [True, True, True, True, False, False, False]
    assert late == [False, True]
    assert y == [3.0 * v + 1.0 for v in range(10)]
    assert z == [-2.0 * v + 1.0 for v in range(10)]


def test_without_triton_jit_leaves_the_function_alone() -> None:
    code = ("import sys; sys.modules['triton'] = None\n"
            "from kiln.triton_support import HAS_TRITON, load_triton, triton\n"
            "def f(x): return x + 1\n"
            "try:\n    load_triton()\nexcept ImportError:\n    loaded = False\n"
            "print(HAS_TRITON, triton.jit(f) is f, triton.jit(do_not_specialize=['x'])(f) is f, loaded, f(1))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["False", "True", "True", "False", "2"]


_BY_NAME = textwrap.dedent("""
    import sys, json
    import kiln.kernels.norm_triton as nt           # imports int8_gemm's @triton.jit _requantize by name
    import kiln.triton_support as ts
    before = type(nt._requantize).__name__
    nt._kernel()                                    # its kernel is made with Triton's own jit, and loads Triton
    print(json.dumps([before, type(nt._requantize).__name__ == "DeferredKernel"]))
""")


def test_a_helper_imported_by_name_becomes_tritons_function() -> None:
    """A module whose own kernel calls another module's deferred helper, imported by name, holds Triton's function
    once Triton is loaded (compiled kernels cannot call a DeferredKernel: Triton refuses the global)."""
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-c", _BY_NAME], capture_output=True, text=True,
                       env=dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ["DeferredKernel", False]
