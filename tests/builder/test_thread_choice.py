"""The build times a CPU engine on one thread and on all usable cores and records the faster
(kiln/builder/threads.py); the engine header's choice is validated like every other field."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.builder import threads
from kiln.errors import KilnError


class _Timed:
    """A stand-in engine whose run takes ``seconds[n]`` on n threads (a sleep: wall time, as the build measures)
    and records the inputs it was given."""

    def __init__(self, seconds: dict[int, float], fail: bool = False):
        self.seconds, self.fail, self.fed = seconds, fail, []
        self.inputs = [{"name": "x", "dtype": "float32", "shape": [None, 3]}, {"name": "k", "dtype": "int64",
                                                                                "shape": [2]}]
        self.profiles = [{"x": {"min": [1, 3], "opt": [4, 3], "max": [8, 3]}}]

    def context(self, threads: int):
        engine = self

        class Ctx:
            def run(self, feeds):
                if engine.fail:
                    raise ValueError("zeros are not a valid input here")
                engine.fed.append({k: (v.shape, v.dtype.name, float(np.abs(v).sum())) for k, v in feeds.items()})
                time.sleep(engine.seconds[threads])
        return Ctx()


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_faster_thread_count_is_chosen_and_one_thread_wins_near_ties():
    slow_parallel = _Timed({1: 0.001, 4: 0.003})
    assert threads.choose_threads(slow_parallel, 4) == 1
    assert slow_parallel.fed[0] == {"x": ((4, 3), "float32", 0.0), "k": ((2,), "int64", 0.0)}   # zeros, opt shape
    assert threads.choose_threads(_Timed({1: 0.004, 4: 0.001}), 4) == 4
    assert threads.choose_threads(_Timed({1: 0.0021, 4: 0.002}), 4) == 1          # 5% faster: not enough


def test_nothing_is_chosen_for_one_core_long_runs_or_runs_that_fail_on_zeros():
    assert threads.choose_threads(_Timed({1: 0.001}), 1) is None
    assert threads.choose_threads(_Timed({1: 0.06, 2: 0.06}), 2) is None
    assert threads.choose_threads(_Timed({1: 0.001, 2: 0.001}, fail=True), 2) is None
    sequence = _Timed({1: 0.001, 2: 0.003})
    sequence.inputs[1]["dtype"] = "sequence(float32)"
    assert threads.choose_threads(sequence, 2) is None and sequence.fed == []


def _model(tmp_path, n: int = 16):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "mm.onnx"
    path.write_bytes(model.SerializeToString())
    return str(path)


def test_a_cpu_build_records_its_choice_and_it_survives_save_and_load(tmp_path, monkeypatch):
    monkeypatch.setattr("kiln.kernels.cpu_threads.usable_cores", lambda *a, **k: 2)
    engine = kiln.build(kiln.onnx.parse(_model(tmp_path)), kiln.BuildConfig(device="cpu"))
    assert engine.header["build"]["cpu_threads"] == 1       # a 2x16 matmul: threads only add their cost
    engine.save(str(tmp_path / "mm.kiln"))
    assert kiln.load(str(tmp_path / "mm.kiln")).header["build"]["cpu_threads"] == 1


@pytest.mark.parametrize("bad", [0, -1, 5000, "2", True, 1.5])
def test_a_bad_thread_choice_in_an_engine_file_is_refused_in_one_line(tmp_path, bad):
    engine = kiln.build(kiln.onnx.parse(_model(tmp_path)), kiln.BuildConfig(device="cpu"))
    engine.header["build"]["cpu_threads"] = bad
    engine.save(str(tmp_path / "bad.kiln"))
    with pytest.raises(KilnError, match="cpu_threads") as e:
        kiln.load(str(tmp_path / "bad.kiln"))
    assert "\n" not in str(e.value)
