"""ExecutionContext.run on a CPU engine runs under torch's inference-mode guard and shares plain numpy feeds of a
checked signature without re-checking them. These tests pin what that must keep: outputs never require grad or
carry an autograd graph, the caller's grad and inference modes are as they were after a run (and after a refused
or failing one), a changed dtype or shape is still refused in one line after many fast runs, outputs that are
views of an input or are a weight are copies, and threads sharing one context get their own results."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.errors import ShapeError

_W = np.arange(12, dtype=np.float32).reshape(4, 3) / 7 - 0.8
_B = np.array([0.25, -0.5, 0.125], np.float32)


@pytest.fixture(scope="module")
def engine():
    """y = relu(x @ W + b); flat = reshape(x, [-1]) (a view of the input); w = W (an output that is a weight)."""
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
         helper.make_node("Relu", ["a"], ["y"]), helper.make_node("Reshape", ["x", "minus_one"], ["flat"]),
         helper.make_node("Identity", ["W"], ["w"])], "g",
        [vi("x", TensorProto.FLOAT, ["n", 4])],
        [vi("y", TensorProto.FLOAT, ["n", 3]), vi("flat", TensorProto.FLOAT, ["k"]), vi("w", TensorProto.FLOAT, [4, 3])],
        [numpy_helper.from_array(_W, "W"), numpy_helper.from_array(_B, "b"),
         numpy_helper.from_array(np.array([-1], np.int64), "minus_one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return kiln.build(kiln.onnx.parse(model.SerializeToString()),
                      kiln.BuildConfig(device="cpu", profiles={"x": ((1, 4), (2, 4), (6, 4))}))


def _reference(x: np.ndarray) -> dict[str, np.ndarray]:
    y = np.maximum(x.astype(np.float64) @ _W.astype(np.float64) + _B, 0)
    return {"y": y, "flat": x.reshape(-1).copy(), "w": _W.copy()}


def _check(got: dict, x: np.ndarray) -> None:
    ref = _reference(x)
    assert sorted(got) == sorted(ref)
    # y: 4-term float32 dot products; |error| <= 4 * 2**-24 * sum|x||W| + rounding of the add
    bound = 8 * 2.0 ** -24 * (np.abs(x) @ np.abs(_W) + np.abs(_B)) + 1e-30
    assert np.all(np.abs(got["y"] - ref["y"]) <= bound)
    np.testing.assert_array_equal(got["flat"], ref["flat"])
    np.testing.assert_array_equal(got["w"], ref["w"])


def _x(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def test_outputs_that_view_an_input_or_are_a_weight_are_copies_on_every_run(engine) -> None:
    ctx = engine.context(threads=1)
    for seed in range(5):                      # the first run checks the signature, the others take the fast path
        x = _x(2, seed)
        kept = x.copy()
        got = ctx.run({"x": x})
        _check(got, kept)
        assert not np.shares_memory(got["flat"], x) and not np.shares_memory(got["y"], x)
        got["flat"][:] = 9.0
        got["w"][:] = 9.0
        np.testing.assert_array_equal(x, kept)
    _check(ctx.run({"x": _x(2, 7)}), _x(2, 7))   # the weight is unchanged for later runs


def test_a_changed_dtype_or_shape_is_refused_after_fast_runs(engine) -> None:
    ctx = engine.context(threads=1)
    for seed in range(4):
        _check(ctx.run({"x": _x(3, seed)}), _x(3, seed))
    assert len(ctx._host_signatures) == 1
    bad = [(np.zeros((3, 4), np.float64), "must be float32"), (np.zeros((3, 4), np.int32), "must be float32"),
           (np.zeros((3, 5), np.float32), "must have 4 at dim 1"), (np.zeros((3, 4, 1), np.float32), "must have rank 2"),
           (np.zeros((7, 4), np.float32), "outside every optimization profile"),
           (np.zeros(4, np.float32), "must have rank 2")]
    for x, text in bad:
        with pytest.raises(ShapeError) as err:
            ctx.run({"x": x})
        assert text in str(err.value) and "\n" not in str(err.value)
        _check(ctx.run({"x": _x(3, 1)}), _x(3, 1))          # the fast path still works after a refusal
    _check(ctx.run({"x": _x(5, 2)}), _x(5, 2))              # a new valid signature: checked once, then fast
    _check(ctx.run({"x": _x(5, 3)}), _x(5, 3))
    assert len(ctx._host_signatures) == 2


def test_outputs_carry_no_grad_and_the_callers_modes_are_restored(engine) -> None:
    ctx = engine.context(threads=1)
    x = torch.from_numpy(_x(2, 0)).requires_grad_()
    for _ in range(2):
        got = ctx.run({"x": x})
        for v in got.values():
            assert not v.requires_grad and v.grad_fn is None
        _check({k: v.numpy() for k, v in got.items()}, _x(2, 0))
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    for _ in range(2):                        # numpy feeds: the checked run, then the fast path
        ctx.run({"x": _x(2, 0)})
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    with pytest.raises(ShapeError):
        ctx.run({"x": np.zeros((9, 4), np.float32)})
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    with torch.no_grad():
        ctx.run({"x": _x(2, 1)})
        assert not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert torch.is_grad_enabled()


def test_threads_sharing_one_context_on_the_fast_path_get_their_own_results(engine) -> None:
    ctx = engine.context(threads=1)
    ctx.run({"x": _x(4, 0)})
    failures: list = []

    def work(seed: int) -> None:
        try:
            for i in range(30):
                x = _x(4, seed * 100 + i)
                _check(ctx.run({"x": x}), x)
        except BaseException as exc:        # noqa: BLE001 - reported to the main thread below
            failures.append(exc)
    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]
