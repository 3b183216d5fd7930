"""Issue 15, attacks 1 and 2: no code from an engine file, no planted generated code.

1. A forged engine (checksums valid) whose Pointwise program carries Python in an argument, or whose
   layer names a GPU-only tactic on the CPU, is refused when the engine is loaded into a context,
   in one line, and nothing from the file runs (a canary file stays absent).
2. Generated kernels live in a private per-user cache, named by the SHA-256 of their content; a file
   planted under the expected name is never imported, and a folder others can write is refused.
"""
from __future__ import annotations

import ast
import copy
import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from _kiln_cli import run_cli

import kiln
from kiln import codecache
from kiln.engine.format import read_engine, write_engine
from kiln.errors import BuildError, EngineFormatError, KilnError
from kiln.ir.network import Network
from kiln.kernels import KernelContext
from kiln.kernels import pointwise_fused as pf
from kiln.ir.pointwise import MAX_STEPS
from kiln.runtime.program import Program

PROGRAM = [{"op": "neg", "args": ["i0"]}, {"op": "prod", "args": ["v0", 2.0]}]


def _escape(canary: Path) -> str:
    """An argument that, pasted into the old generator's kernel body, is valid Python that runs at import."""
    return f"i0\nimport os\nos.system('touch {canary}')\ndef _pad(x0):\n    return x0"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own cache root and an empty in-process kernel table."""
    root = tmp_path / "cache"
    monkeypatch.setenv("KILN_CACHE_DIR", str(root))
    monkeypatch.setattr(pf, "_KERNELS", {})
    return root


@pytest.fixture(scope="module")
def engine_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CPU engine with one Pointwise layer y = -x * 2."""
    net = Network()
    x = net.add_input("x", "float32", (2, 3))
    layer = net.add_layer("Pointwise", [x], {"program": copy.deepcopy(PROGRAM)}, name="pw")
    net.mark_output(layer.outputs[0], "y")
    engine = kiln.build(net, kiln.BuildConfig(device="cpu", profiles={"x": (2, 3)}))
    path = tmp_path_factory.mktemp("engine") / "pw.kiln"
    engine.save(path)
    return path


def _forge(src: Path, dst: Path, program: list, tactic: str = "torch") -> Path:
    """Rewrite the Pointwise layer of ``src`` into ``dst`` through the real writer (valid checksums)."""
    header, weights = read_engine(str(src))
    header = copy.deepcopy(header)
    header.pop("weights", None)
    (layer,) = [lay for lay in header["plan"]["layers"] if lay["kind"] == "Pointwise"]
    layer["attrs"]["program"] = program
    layer["tactic"] = tactic
    write_engine(str(dst), header, {k: np.array(v) for k, v in weights.items()})
    return dst


def test_clean_engine_runs(engine_path: Path) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    got = kiln.load(engine_path).context().run({"x": x})["y"]
    np.testing.assert_array_equal(got, -x * 2)


@pytest.mark.parametrize("tactic", ["triton", "torch"])
def test_kiln_run_refuses_forged_program(tactic: str, engine_path: Path, tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    bad = _forge(engine_path, tmp_path / "bad.kiln", [{"op": "neg", "args": [_escape(canary)]}], tactic=tactic)
    proc = run_cli("run", bad, cwd=tmp_path)      # the test's own kernel cache and table (_private_cache)
    assert not canary.exists()
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("kiln: error:"), proc.stderr
    assert "'pw'" in lines[0] and "damaged" in lines[0], lines[0]         # refused as a bad file, not at run
    assert "program" in lines[0] or (tactic == "triton" and "'triton'" in lines[0]), lines[0]


BAD_PROGRAMS = {
    "code in an argument": lambda c: [{"op": "neg", "args": [_escape(c)]}],
    "issue payload": lambda c: [{"op": "neg", "args": ["i0\nimport os\nos.system('touch CANARY')\n"]}],
    "unknown op": lambda c: [{"op": "__import__('os').system('true')", "args": ["i0"]}],
    "op not a string": lambda c: [{"op": ["neg"], "args": ["i0"]}],
    "input index past the layer's inputs": lambda c: [{"op": "neg", "args": ["i1"]}],
    "step reads itself": lambda c: [{"op": "neg", "args": ["i0"]}, {"op": "exp", "args": ["v1"]}],
    "ref with trailing newline": lambda c: [{"op": "neg", "args": ["i0\n"]}],
    "non-ASCII digit": lambda c: [{"op": "neg", "args": ["i\u0660"]}],
    "number as a string": lambda c: [{"op": "sum", "args": ["i0", "2.0"]}],
    "bool as a number": lambda c: [{"op": "sum", "args": ["i0", True]}],
    "integer too large for a float": lambda c: [{"op": "sum", "args": ["i0", 10 ** 400]}],
    "alpha as code": lambda c: [{"op": "leaky_relu", "args": ["i0"], "alpha": "0.1)\nimport os\n("}],
    "extra key": lambda c: [{"op": "neg", "args": ["i0"], "code": "import os"}],
    "missing args": lambda c: [{"op": "neg"}],
    "wrong arity": lambda c: [{"op": "sum", "args": ["i0"]}],
    "no tensor read": lambda c: [{"op": "sum", "args": [1.0, 2.0]}],
    "empty program": lambda c: [],
    "program not a list": lambda c: "neg(i0)",
    "step not an object": lambda c: [["neg", "i0"]],
    "too many steps": lambda c: [{"op": "neg", "args": ["i0"]}] * (MAX_STEPS + 1),
}


@pytest.mark.parametrize("case", list(BAD_PROGRAMS))
def test_forged_program_refused_at_load(case: str, engine_path: Path, tmp_path: Path) -> None:
    """Refused by the header schema (kiln.load) or when the layer is set up (context), never later."""
    canary = tmp_path / "CANARY"
    bad = _forge(engine_path, tmp_path / "bad.kiln", BAD_PROGRAMS[case](canary))
    with pytest.raises(EngineFormatError) as info:
        kiln.load(bad).context()
    msg = str(info.value)
    assert "\n" not in msg and "'pw'" in msg, msg
    assert not canary.exists()


@pytest.mark.parametrize("case", list(BAD_PROGRAMS))
def test_makers_validate_before_anything(case: str, tmp_path: Path) -> None:
    """Both tactic makers and the generator refuse the program themselves, writing nothing."""
    canary = tmp_path / "CANARY"
    program = BAD_PROGRAMS[case](canary)
    for maker in (pf.make_pointwise_torch, pf.make_pointwise_triton):
        with pytest.raises(BuildError, match="^Pointwise program [^\n]*$"):
            maker({"program": program}, KernelContext(device="cuda", input_dtypes=("float32",)))
    with pytest.raises(BuildError):
        pf.source(program, 1, 2)
    with pytest.raises(BuildError):
        pf.compiled(program, 1, 2)
    assert not canary.exists()
    assert not (tmp_path / "cache").exists()        # nothing was written either


def test_gpu_tactic_in_cpu_engine_refused(engine_path: Path, tmp_path: Path) -> None:
    bad = _forge(engine_path, tmp_path / "bad.kiln", copy.deepcopy(PROGRAM), tactic="triton")
    engine = kiln.load(bad)
    with pytest.raises(EngineFormatError) as info:
        engine.context()
    msg = str(info.value)
    assert "\n" not in msg and "'triton'" in msg and "cpu" in msg and "forged" in msg, msg


def _plan(tactic: str, host: bool) -> dict:
    return {"inputs": [{"name": "x", "dtype": "float32", "shape": [2, 3]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [2, 3]}],
            "tensors": {"y": {"dtype": "float32", "shape": [2, 3]}},
            "layers": [{"name": "pw", "kind": "Pointwise", "inputs": ["x"], "outputs": ["y"],
                        "attrs": {"program": copy.deepcopy(PROGRAM)}, "tactic": tactic, "host": host}]}


def test_host_layer_checked_against_cpu() -> None:
    """In a CUDA plan, a host layer runs on the CPU, so a CUDA-only tactic there is refused; the same
    layer on the device is accepted (setting it up touches no GPU)."""
    Program(_plan("triton", host=False), {}, "cuda")
    with pytest.raises(EngineFormatError, match="runs only on cuda, but the layer runs on cpu"):
        Program(_plan("triton", host=True), {}, "cuda")


# ---- the grammar itself ------------------------------------------------------------------------
def test_op_table_is_what_the_fusion_pass_emits() -> None:
    from kiln.passes.fuse_pointwise import ACTS, BINARY, UNARY
    assert set(pf.OPS) == BINARY | UNARY | ACTS
    assert {op for op, arity in pf.OPS.items() if arity == 2} == BINARY


def test_literals_are_emitted_as_floats() -> None:
    """Special floats become Python float expressions that evaluate back to the same value."""
    values = [float("nan"), float("inf"), float("-inf"), -0.0, 1e-300, 3, 2 ** 60, np.float32(0.1)]
    program = [{"op": "neg", "args": ["i0"]}] + [{"op": "sum", "args": ["v0", v]} for v in values]
    src = pf.source(program, 1, 1)
    tree = ast.parse(src)
    kernel = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "kernel")
    emitted = [ast.unparse(a.value.right) for a in kernel.body
               if isinstance(a, ast.Assign) and a.targets[0].id.startswith("v") and isinstance(a.value, ast.BinOp)]
    assert len(emitted) == len(values)
    for text, want in zip(emitted, values):
        got = eval(text, {"__builtins__": {"float": float}})      # noqa: S307 (a literal expression)
        assert isinstance(got, float) and (got == float(want) or (got != got and want != want))
        assert np.signbit(got) == np.signbit(float(want))


def test_fusion_pass_programs_still_build_and_run() -> None:
    """A chain the fusion pass turns into a program (sigmoid, *2, + g, clip, pow 2) matches numpy."""
    net = Network()
    x, g = net.add_input("x", "float32", (2, 3, 4)), net.add_input("g", "float32", (1, 3, 1))
    s = net.add_layer("Activation", [x], {"type": "sigmoid"}).outputs[0]
    d = net.add_layer("ElementWise", [s, net.add_constant(np.float32(2.0))], {"op": "prod"}).outputs[0]
    a = net.add_layer("ElementWise", [d, g], {"op": "sum"}).outputs[0]
    c = net.add_layer("Activation", [a], {"type": "clip", "alpha": -0.5, "beta": 1.5}).outputs[0]
    p = net.add_layer("ElementWise", [c, net.add_constant(np.float32(2.0))], {"op": "pow"}).outputs[0]
    net.mark_output(p, "y")
    engine = kiln.build(net, kiln.BuildConfig(device="cpu", profiles={"x": (2, 3, 4), "g": (1, 3, 1)}))
    fused = [lay for lay in engine.layers if lay["kind"] == "Pointwise"]
    assert len(fused) == 1 and len(fused[0]["attrs"]["program"]) == 5
    rng = np.random.default_rng(0)
    xv = rng.standard_normal((2, 3, 4)).astype(np.float32)
    gv = rng.standard_normal((1, 3, 1)).astype(np.float32)
    ref = np.clip(2.0 / (1.0 + np.exp(-xv.astype(np.float64))) + gv, -0.5, 1.5) ** 2
    got = engine.context().run({"x": xv, "g": gv})["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


# ---- the per-user cache ------------------------------------------------------------------------
@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _x() -> torch.Tensor:
    return torch.arange(6, dtype=torch.float32).reshape(2, 3) - 2.5


def _expected_file(program: list, rank: int = 2) -> tuple[str, Path]:
    src = pf.source(program, 1, rank)
    return src, codecache.cache_dir("kernels") / f"{hashlib.sha256(src.encode()).hexdigest()}.py"


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.usefixtures("interpret")
def test_cache_is_private_and_content_addressed(_private_cache: Path) -> None:
    old = os.umask(0)                    # the 0700 must not depend on the caller's umask
    try:
        got = pf.run_triton(PROGRAM, [_x()], block=16)
    finally:
        os.umask(old)
    torch.testing.assert_close(got, -_x() * 2, rtol=0, atol=0)
    kernels = _private_cache / "kernels"
    assert _mode(_private_cache) == 0o700 and _mode(kernels) == 0o700
    assert os.stat(kernels).st_uid == os.getuid()
    (file,) = [p for p in kernels.iterdir() if not p.name.startswith(".")]
    data = file.read_bytes()
    assert file.name == hashlib.sha256(data).hexdigest() + ".py"
    assert data.decode() == pf.source(PROGRAM, 1, 2)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("as_link", [False, True])
def test_planted_kernel_is_not_imported(as_link: bool, tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    src, path = _expected_file(PROGRAM)
    planted = f"import os\nos.system('touch {canary}')\nkernel = None\n"
    if as_link:
        target = tmp_path / "planted.py"
        target.write_text(planted)
        path.symlink_to(target)
    else:
        path.write_text(planted)
    got = pf.run_triton(PROGRAM, [_x()], block=16)
    torch.testing.assert_close(got, -_x() * 2, rtol=0, atol=0)
    assert not canary.exists()
    assert not path.is_symlink() and path.read_text() == src     # replaced by what Kiln generated


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("where,mode", [("root", 0o777), ("root", 0o770), ("kernels", 0o703), ("kernels", 0o720)])
def test_cache_writable_by_others_is_refused(where: str, mode: int, _private_cache: Path, tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    _, path = _expected_file(PROGRAM)
    path.write_text(f"import os\nos.system('touch {canary}')\n")
    os.chmod(_private_cache if where == "root" else path.parent, mode)
    with pytest.raises(KilnError, match="writable by other users") as info:
        pf.run_triton(PROGRAM, [_x()], block=16)
    assert "\n" not in str(info.value) and "KILN_CACHE_DIR" in str(info.value)
    assert not canary.exists()
    assert _mode(_private_cache if where == "root" else path.parent) == mode    # refused, not silently changed


def _foreign(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``path`` another user's: chown where we may, else pretend to be someone else."""
    if os.getuid() == 0:
        os.chown(path, 4242, 4242)
    else:
        uid = os.getuid() + 1
        monkeypatch.setattr(os, "getuid", lambda: uid)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("where", ["root", "kernels"])
def test_cache_owned_by_another_user_is_refused(where: str, _private_cache: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    canary = tmp_path / "CANARY"
    _, path = _expected_file(PROGRAM)
    path.write_text(f"import os\nos.system('touch {canary}')\n")
    _foreign(_private_cache if where == "root" else path.parent, monkeypatch)
    with pytest.raises(KilnError, match="belongs to another user") as info:
        pf.run_triton(PROGRAM, [_x()], block=16)
    assert "\n" not in str(info.value)
    assert not canary.exists()


def test_cache_root_follows_xdg_and_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KILN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert codecache.cache_root() == tmp_path / "xdg" / "kiln"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")       # the XDG spec: relative paths are invalid
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert codecache.cache_root() == tmp_path / "home" / ".cache" / "kiln"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert codecache.cache_root() == tmp_path / "home" / ".cache" / "kiln"
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "override"))
    assert codecache.cache_dir("kernels") == tmp_path / "override" / "kernels"
    assert _mode(tmp_path / "override") == 0o700
