"""CPU thread control (kernels/cpu_threads.py): the physical-core default from a CPU topology, the
ExecutionContext option and `--threads` on the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.errors import KilnError
from kiln.kernels import cpu_threads
from kiln.kernels.cpu_threads import check_threads, default_threads, set_default_threads, usable_cores


def _topology(root: Path, cores: list[tuple[int, int]]) -> Path:
    """A fake /sys/devices/system/cpu: logical CPU i sits on (package, core) ``cores[i]``."""
    for i, (pkg, core) in enumerate(cores):
        topo = root / f"cpu{i}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{pkg}\n")
        (topo / "core_id").write_text(f"{core}\n")
    return root


# 2 sockets x 2 cores x 2 hyper-threads, numbered as Linux does: siblings are i and i+4
SMT_MACHINE = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("cpus, want", [
    (set(range(8)), 4),        # every CPU: one thread per physical core
    ({0, 4}, 1),               # two hyper-threads of one core
    ({0, 1, 4, 5}, 2),         # both threads of two cores
    ({0, 2}, 2),               # same core id on two sockets is two cores
    ({3}, 1),
])
def test_usable_cores_counts_physical_cores_in_the_affinity_mask(tmp_path, cpus, want):
    sys_cpu = _topology(tmp_path / "cpu", SMT_MACHINE)
    assert usable_cores(cpus, sys_cpu, tmp_path / "no_cgroup") == want


@pytest.mark.parametrize("files, want", [
    ({"cpu.max": "150000 100000\n"}, 2),        # cgroup v2: 1.5 CPUs -> 2 threads
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, 4),           # no limit
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),     # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),
])
def test_a_cpu_quota_caps_the_default(tmp_path, files, want):
    sys_cpu = _topology(tmp_path / "cpu", SMT_MACHINE)
    cgroup = tmp_path / "cgroup"
    for name, text in files.items():
        (cgroup / name).parent.mkdir(parents=True, exist_ok=True)
        (cgroup / name).write_text(text)
    assert usable_cores(set(range(8)), sys_cpu, cgroup) == want


def test_without_topology_hyper_threads_are_estimated(tmp_path, monkeypatch):
    # psutil is optional (kiln does not depend on it): a stand-in module gives its answer either way
    monkeypatch.setitem(sys.modules, "psutil", types.SimpleNamespace(cpu_count=lambda logical=True: 16 if logical else 8))
    assert usable_cores(set(range(8)), tmp_path / "missing", tmp_path) == 4
    assert usable_cores({0}, tmp_path / "missing", tmp_path) == 1


def test_this_machine_default_fits_the_affinity_mask():
    n = usable_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4", None])
def test_bad_thread_counts_are_one_line_errors(bad):
    with pytest.raises(KilnError) as info:
        check_threads(bad)
    assert "\n" not in str(info.value) and "at least 1" in str(info.value)


def _engine(path: Path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                              "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx_path = path / "mm.onnx"
    onnx_path.write_bytes(model.SerializeToString())
    engine = kiln.build(kiln.onnx.parse(str(onnx_path)), kiln.BuildConfig(device="cpu"))
    engine.header["build"].pop("cpu_threads", None)     # the build's own choice is tested on its own below
    ref = np.maximum(np.ones((4, 16), np.float32) @ numpy_helper.to_array(w), 0)
    return engine, ref


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    set_default_threads(None)
    torch.set_num_threads(before)


def test_context_runs_on_its_thread_count(tmp_path, restore_threads):
    engine, ref = _engine(tmp_path)
    x = {"x": np.ones((4, 16), np.float32)}
    torch.set_num_threads(3)
    np.testing.assert_allclose(engine.context(threads=1).run(x)["y"], ref, rtol=1e-5, atol=1e-5)
    assert torch.get_num_threads() == 1
    engine.context().run(x)
    assert torch.get_num_threads() == default_threads() == usable_cores()
    set_default_threads(2)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(5)
    engine.context().run(x)
    assert torch.get_num_threads() == 2
    with pytest.raises(KilnError, match="at least 1"):
        engine.context(threads=0)


def test_context_runs_on_the_thread_count_its_build_chose(tmp_path, restore_threads):
    """An engine whose build chose a thread count (``build.cpu_threads``) runs on it by default; a context's
    ``threads`` and the process default (``--threads``) still win; the choice is capped at the usable cores."""
    engine, ref = _engine(tmp_path)
    x = {"x": np.ones((4, 16), np.float32)}
    engine.header["build"]["cpu_threads"] = 1
    torch.set_num_threads(3)
    ctx = engine.context()
    np.testing.assert_allclose(ctx.run(x)["y"], ref, rtol=1e-5, atol=1e-5)
    assert ctx.run_threads == torch.get_num_threads() == 1
    assert engine.context(threads=2).run_threads == 2
    engine.header["build"]["cpu_threads"] = 4096
    assert engine.context().run_threads == usable_cores()
    set_default_threads(2)
    engine.header["build"]["cpu_threads"] = 1
    engine.context().run(x)
    assert torch.get_num_threads() == 2


def test_cli_threads(tmp_path):
    engine, _ = _engine(tmp_path)
    path = tmp_path / "mm.kiln"
    engine.save(str(path))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def kiln_cli(*args):
        return subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=300)
    r = kiln_cli("bench", path, "--threads", "1", "--iterations", "3", "--warmup", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["threads"] == 1
    r = kiln_cli("bench", path, "--iterations", "3", "--warmup", "1")
    assert r.returncode == 0 and f"on {cpu_threads.usable_cores()} CPU threads" in r.stdout, r.stdout + r.stderr
    for cmd in (["run", path], ["bench", path], ["compare", tmp_path / "mm.onnx"]):
        r = kiln_cli(*cmd, "--threads", "0")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "--threads" in lines[0], r.stderr
    r = kiln_cli("run", path, "--threads", "1")
    assert r.returncode == 0, r.stderr
    r = kiln_cli("compare", tmp_path / "mm.onnx", "--device", "cpu", "--threads", "1")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("preset, want", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_kiln_first_makes_openmp_threads_sleep(preset, want):
    """OpenMP threads that spin between parallel regions stall every region on a loaded machine;
    kiln, imported before torch, asks for passive waiting unless the user chose a policy."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = "import os, kiln, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == want, out.stderr


def test_cpu_tactics_are_timed_and_cached_per_thread_count(tmp_path, restore_threads):
    """A CPU build times its convolutions on the thread count the engine will run on, and a timing
    cache keeps those times apart from another thread count's. (9.4 MFLOP: above SMALL_LAYER_FLOPS, so it runs on
    the engine's count; a smaller one runs, and is timed, on one thread at any count: tests/builder/test_cpu_timing.)"""
    from kiln.builder.timing_cache import TimingCache
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 32, 32])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    cache = tmp_path / "cpu.timing"
    seen = []
    for n in (1, 2):
        set_default_threads(n)
        torch.set_num_threads(3)
        kiln.build(kiln.onnx.parse(model.SerializeToString()), kiln.BuildConfig(device="cpu",
                                                                                 timing_cache=str(cache)))
        assert torch.get_num_threads() == n
        seen.append({k for k in TimingCache(str(cache)).entries if "|threads:" not in k})    # tactic times only
    assert len(seen[0]) == 1 and len(seen[1]) == 2
    assert [k for k in seen[0]][0].split("|")[0].endswith("/1 threads")
    assert [k for k in seen[1] - seen[0]][0].split("|")[0].endswith("/2 threads")


def test_onnxruntime_islands_use_the_default_thread_count(restore_threads):
    from kiln.kernels.ort_island import session
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    set_default_threads(1)
    opts = session(model.SerializeToString()).get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
