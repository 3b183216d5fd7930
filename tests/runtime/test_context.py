"""ExecutionContext: how inputs are given, which shapes are accepted, errors, threads.

The engine under test is a two-input, two-output ONNX graph whose reference is a
few lines of numpy: y = relu(x @ W + E[ids]), s = sum(y, axis=1).
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from _models import assert_close_fp32, ort_run
from kiln.errors import KilnError, ShapeError

RNG = np.random.default_rng(0)
W = RNG.standard_normal((8, 6)).astype(np.float32)
E = RNG.standard_normal((10, 6)).astype(np.float32)
PROFILE = {"x": ((1, 8), (4, 8), (8, 8)), "ids": ((1,), (4,), (8,))}


def reference(x: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    y = np.maximum(x @ W + E[ids], 0)
    return {"y": y, "s": y.sum(1)}


def _model(path: Path) -> Path:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]),
             helper.make_node("Gather", ["E", "ids"], ["e"], axis=0),
             helper.make_node("Add", ["xw", "e"], ["pre"]),
             helper.make_node("Relu", ["pre"], ["y"]),
             helper.make_node("ReduceSum", ["y", "axes"], ["s"], keepdims=0)]
    graph = helper.make_graph(
        nodes, "two_in_two_out",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch"])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(E, "E"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory) -> Path:
    return _model(tmp_path_factory.mktemp("ctx") / "two.onnx")


@pytest.fixture(scope="module")
def engine(onnx_path: Path):
    return kiln.build(kiln.onnx.parse(onnx_path), kiln.BuildConfig(device="cpu", profiles=PROFILE))


def _inputs(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    return r.standard_normal((batch, 8)).astype(np.float32), r.integers(-10, 10, batch).astype(np.int64)


def test_reference_agrees_with_onnxruntime(onnx_path: Path) -> None:
    """The numpy reference is what the ONNX graph means (negative Gather indices included)."""
    x, ids = _inputs(5)
    ref, ort = reference(x, ids), ort_run(onnx_path, {"x": x, "ids": ids})
    for k in ref:
        np.testing.assert_allclose(ort[k], ref[k], rtol=1e-5, atol=1e-5)


# ---- input forms ----------------------------------------------------------------------------

def test_numpy_in_numpy_out_by_name(engine) -> None:
    x, ids = _inputs(3)
    out = engine.context().run({"ids": ids, "x": x})        # order of the mapping does not matter
    assert set(out) == {"y", "s"}
    for k, v in reference(x, ids).items():
        assert isinstance(out[k], np.ndarray) and out[k].dtype == np.float32
        assert_close_fp32(out[k], v, k)


def test_positional_list_input_and_output_selection(engine) -> None:
    x, ids = _inputs(2)
    ctx = engine.context()
    names = [t["name"] for t in engine.inputs]
    assert names == ["x", "ids"]
    out = ctx.run([x, ids])
    assert_close_fp32(out["s"], reference(x, ids)["s"])
    only = ctx.run({"x": x, "ids": ids}, outputs=["s"])
    assert list(only) == ["s"]
    assert ctx({"x": x, "ids": ids})["y"].shape == (2, 6)      # contexts are callable


def test_nested_python_lists_are_accepted(engine) -> None:
    x, ids = _inputs(2)
    out = engine.context().run({"x": x.tolist(), "ids": ids.tolist()})
    assert_close_fp32(out["y"], reference(x, ids)["y"])


def test_non_contiguous_numpy_input(engine) -> None:
    x, ids = _inputs(4)
    xt = np.asfortranarray(x)
    assert not xt.flags.c_contiguous
    assert_close_fp32(engine.context().run({"x": xt, "ids": ids})["y"], reference(x, ids)["y"])


def test_torch_in_torch_out(engine) -> None:
    x, ids = _inputs(3)
    out = engine.context().run({"x": torch.from_numpy(x), "ids": torch.from_numpy(ids)})
    for k, v in reference(x, ids).items():
        assert isinstance(out[k], torch.Tensor) and out[k].dtype == torch.float32 and out[k].device.type == "cpu"
        assert_close_fp32(out[k].numpy(), v, k)


def test_non_contiguous_torch_input(engine) -> None:
    x, ids = _inputs(6)
    xt = torch.from_numpy(np.ascontiguousarray(x.T)).t()
    assert not xt.is_contiguous()
    assert_close_fp32(engine.context().run({"x": xt, "ids": torch.from_numpy(ids)})["y"].numpy(),
                      reference(x, ids)["y"])


class _DLPackOnly:
    """An array known only through the DLPack protocol (as from CuPy, JAX or TensorFlow)."""

    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_dlpack_input(engine) -> None:
    x, ids = _inputs(3)
    out = engine.context().run({"x": _DLPackOnly(x), "ids": _DLPackOnly(ids)})
    assert isinstance(out["y"], torch.Tensor)
    assert_close_fp32(out["y"].numpy(), reference(x, ids)["y"])


def test_inputs_are_not_modified(engine) -> None:
    x, ids = _inputs(3)
    x0, ids0 = x.copy(), ids.copy()
    engine.context().run({"x": x, "ids": ids})
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(ids, ids0)


# ---- shapes and profiles --------------------------------------------------------------------

def test_dynamic_batch_within_profile(engine) -> None:
    ctx = engine.context()
    for batch in (1, 2, 5, 8, 3, 1):               # grows and shrinks on one context
        x, ids = _inputs(batch, seed=batch)
        out = ctx.run({"x": x, "ids": ids})
        for k, v in reference(x, ids).items():
            assert_close_fp32(out[k], v, f"{k} at batch {batch}")


@pytest.mark.parametrize("batch", [9, 64])
def test_outside_profile_names_min_and_max(engine, batch: int) -> None:
    x, ids = _inputs(batch)
    with pytest.raises(ShapeError) as info:
        engine.context().run({"x": x, "ids": ids})
    msg = str(info.value)
    assert "'x'" in msg and f"({batch}, 8)" in msg, msg
    assert "min (1, 8)" in msg and "max (8, 8)" in msg, msg


def test_several_profiles(onnx_path: Path) -> None:
    small = {"x": ((1, 8), (2, 8), (4, 8)), "ids": ((1,), (2,), (4,))}
    large = {"x": ((16, 8), (24, 8), (32, 8)), "ids": ((16,), (24,), (32,))}
    engine = kiln.build(kiln.onnx.parse(onnx_path), kiln.BuildConfig(device="cpu", profiles=[small, large]))
    assert len(engine.profiles) == 2
    ctx = engine.context()
    for batch in (1, 4, 16, 32, 20):
        x, ids = _inputs(batch, seed=batch)
        assert_close_fp32(ctx.run({"x": x, "ids": ids})["y"], reference(x, ids)["y"], f"batch {batch}")
    x, ids = _inputs(10)
    with pytest.raises(ShapeError) as info:
        ctx.run({"x": x, "ids": ids})
    msg = str(info.value)
    assert "min (1, 8) max (4, 8)" in msg and "min (16, 8) max (32, 8)" in msg, msg


# ---- errors ---------------------------------------------------------------------------------

def test_wrong_dtype(engine) -> None:
    x, ids = _inputs(2)
    with pytest.raises(ShapeError) as info:
        engine.context().run({"x": x.astype(np.float64), "ids": ids})
    msg = str(info.value)
    assert "'x'" in msg and "float32" in msg and "float64" in msg, msg
    with pytest.raises(ShapeError) as info:
        engine.context().run({"x": x, "ids": ids.astype(np.float32)})
    assert "'ids'" in str(info.value) and "int64" in str(info.value)


def test_wrong_rank(engine) -> None:
    x, ids = _inputs(2)
    with pytest.raises(ShapeError) as info:
        engine.context().run({"x": x[None], "ids": ids})
    msg = str(info.value)
    assert "'x'" in msg and "rank 2" in msg and "(1, 2, 8)" in msg, msg


def test_wrong_static_dim(engine) -> None:
    _, ids = _inputs(2)
    with pytest.raises(ShapeError) as info:
        engine.context().run({"x": np.zeros((2, 7), np.float32), "ids": ids})
    msg = str(info.value)
    assert "'x'" in msg and "8" in msg and "(2, 7)" in msg, msg


def test_unknown_input(engine) -> None:
    x, ids = _inputs(2)
    with pytest.raises(KilnError) as info:
        engine.context().run({"x": x, "ids": ids, "mask": ids})
    msg = str(info.value)
    assert "'mask'" in msg and "not an input" in msg and "'x'" in msg and "'ids'" in msg, msg


def test_missing_input(engine) -> None:
    x, _ = _inputs(2)
    with pytest.raises(KilnError) as info:
        engine.context().run({"x": x})
    msg = str(info.value)
    assert "'ids'" in msg and "missing" in msg, msg


def test_unsupported_input_object(engine) -> None:
    _, ids = _inputs(2)
    with pytest.raises(KilnError) as info:
        engine.context().run({"x": object(), "ids": ids})
    assert "'x'" in str(info.value) and "numpy" in str(info.value)


def test_string_input(engine) -> None:
    _, ids = _inputs(2)
    with pytest.raises(ShapeError) as info:
        engine.context().run({"x": np.array([["a"] * 8] * 2), "ids": ids})
    assert "'x'" in str(info.value) and "string" in str(info.value)


def test_errors_leave_the_context_usable(engine) -> None:
    ctx = engine.context()
    x, ids = _inputs(9)
    with pytest.raises(ShapeError):
        ctx.run({"x": x, "ids": ids})
    x, ids = _inputs(2)
    assert_close_fp32(ctx.run({"x": x, "ids": ids})["y"], reference(x, ids)["y"])


# ---- threads --------------------------------------------------------------------------------

THREADS, RUNS = 8, 100


def _hammer(get_ctx, cases: list[tuple[dict, dict]]) -> list[str]:
    """THREADS threads × RUNS runs; each thread cycles through its own inputs; returns failures."""
    failures: list[str] = []
    start = threading.Barrier(THREADS)

    def work(tid: int) -> None:
        ctx = get_ctx()
        start.wait()
        try:
            for i in range(RUNS):
                feeds, ref = cases[(tid * 7 + i) % len(cases)]
                out = ctx.run(feeds)
                for k, v in ref.items():
                    if out[k].shape != v.shape or not np.allclose(out[k], v, rtol=1e-4, atol=1e-5):
                        failures.append(f"thread {tid} run {i} output {k}")
        except Exception as exc:   # noqa: BLE001 — report any failure from the thread
            failures.append(f"thread {tid}: {type(exc).__name__}: {exc}")
    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return failures


@pytest.fixture(scope="module")
def thread_cases() -> list[tuple[dict, dict]]:
    cases = []
    for seed in range(16):
        x, ids = _inputs(1 + seed % 8, seed=100 + seed)
        cases.append(({"x": x, "ids": ids}, reference(x, ids)))
    return cases


def test_threads_one_context_each(engine, thread_cases) -> None:
    assert _hammer(engine.context, thread_cases) == []


def test_threads_share_one_context(engine, thread_cases) -> None:
    ctx = engine.context()
    assert _hammer(lambda: ctx, thread_cases) == []


def test_threads_on_a_conv_net(model_case) -> None:
    """A deeper engine (folded BN, pooling, FC) under the same load; references from ONNX Runtime."""
    case = model_case("conv_bn")
    engine = kiln.build(kiln.onnx.parse(case.path), kiln.BuildConfig(device="cpu", profiles=case.profiles()))
    cases = []
    for seed in range(8):
        feeds = case.feeds(1 + seed % 4, seed=seed)
        cases.append((feeds, ort_run(case.path, feeds)))
    assert _hammer(engine.context, cases) == []
    shared = engine.context()
    assert _hammer(lambda: shared, cases) == []


# ---- outputs own their memory ---------------------------------------------------------------

@pytest.fixture(scope="module")
def aliasing_engine():
    """Outputs that are a view of the input (Flatten) and a folded constant (sqrt of a weight)."""
    net = kiln.Network("alias")
    x = net.add_input("x", "float32", (2, 3))
    net.mark_output(net.add_flatten(x, 0).output, "flat")
    net.mark_output(net.add_unary(net.add_constant(np.array([1.0, 4.0], np.float32)), "sqrt").output, "k")
    return kiln.build(net, kiln.BuildConfig(device="cpu"))


def test_writing_an_output_leaves_the_input_alone(aliasing_engine) -> None:
    ctx = aliasing_engine.context()
    xv = np.ones((2, 3), np.float32)
    ctx.run({"x": xv})["flat"][:] = 7
    assert (xv == 1).all()
    xt = torch.ones(2, 3)
    ctx.run({"x": xt})["flat"].fill_(7)
    assert (xt == 1).all()


def test_writing_a_constant_output_does_not_change_later_runs(aliasing_engine, tmp_path: Path) -> None:
    xv = np.ones((2, 3), np.float32)
    aliasing_engine.context().run({"x": xv})["k"][:] = 99
    np.testing.assert_array_equal(aliasing_engine.context().run({"x": xv})["k"], [1.0, 2.0])
    aliasing_engine.save(tmp_path / "alias.kiln")
    loaded = kiln.load(tmp_path / "alias.kiln").context()
    loaded.run({"x": xv})["k"][:] = 5
    np.testing.assert_array_equal(loaded.run({"x": xv})["k"], [1.0, 2.0])


def test_unknown_output_name(engine) -> None:
    x, ids = _inputs(2)
    with pytest.raises(KilnError) as info:
        engine.context().run({"x": x, "ids": ids}, outputs=["y", "logits"])
    msg = str(info.value)
    assert "'logits'" in msg and "not an output" in msg and "'y'" in msg and "'s'" in msg, msg


def test_inputs_must_share_one_profile(onnx_path: Path) -> None:
    """x from the small profile and ids from the large one: each fits a profile, together none."""
    small = {"x": ((1, 8), (2, 8), (4, 8)), "ids": ((1,), (2,), (4,))}
    large = {"x": ((16, 8), (24, 8), (32, 8)), "ids": ((16,), (24,), (32,))}
    engine = kiln.build(kiln.onnx.parse(onnx_path), kiln.BuildConfig(device="cpu", profiles=[small, large]))
    x, _ = _inputs(2)
    _, ids = _inputs(20)
    with pytest.raises(ShapeError) as info:
        engine.context().run({"x": x, "ids": ids})
    msg = str(info.value)
    assert "no single profile" in msg and "(2, 8)" in msg and "(20,)" in msg, msg


def test_profile_takes_the_inputs_by_name_as_run_does(engine) -> None:
    """``profile`` accepts {name: array} like ``run`` (and a list of tensors in input order): one row per layer with a
    positive time; a mapping that is not the engine's inputs is one line."""
    x, ids = _inputs(2)
    ctx = engine.context()
    by_name = ctx.profile({"x": x, "ids": ids}, runs=2)
    in_order = ctx.profile([torch.from_numpy(x), torch.from_numpy(ids)], runs=2)
    assert [r["name"] for r in by_name] == [r["name"] for r in in_order] == [layer["name"] for layer in engine.layers]
    assert all(r["ms"] > 0 for r in by_name)
    with pytest.raises(KilnError, match="exactly this engine's inputs") as info:
        ctx.profile({"x": x})
    assert "\n" not in str(info.value)
