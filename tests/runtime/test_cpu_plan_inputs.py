"""ExecutionContext.run checks an input's dtype and shape once per (dtype, shape) it meets: later runs at an
accepted signature skip the check, any other signature is still checked (wrong dtype, rank, fixed dim, shape
outside the profile: one-line errors, also after good runs), and results stay equal to ONNX Runtime's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.errors import ShapeError
from kiln.runtime import engine as engine_module

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """y = relu(x + c) with x [n, 4], n in 1..6; a second input s [2] added to y's first row."""
    import onnx
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["a"]), helper.make_node("Relu", ["a"], ["y"]),
         helper.make_node("Mul", ["s", "two"], ["z"])], "g",
        [vi("x", TensorProto.FLOAT, ["n", 4]), vi("s", TensorProto.FLOAT, [2])],
        [vi("y", TensorProto.FLOAT, ["n", 4]), vi("z", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.linspace(-1, 1, 4, dtype=np.float32), "c"),
         numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    path = tmp_path_factory.mktemp("inputs") / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    engine = kiln.build(kiln.onnx.parse(str(path)), kiln.BuildConfig(
        device="cpu", profiles={"x": ((1, 4), (2, 4), (6, 4))}))
    return engine, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _feeds(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + n)
    return {"x": rng.standard_normal((n, 4)).astype(np.float32), "s": rng.standard_normal(2).astype(np.float32)}


def test_each_signature_is_checked_once(built, monkeypatch) -> None:
    engine, sess = built
    ctx = engine.context(threads=1)
    checked = []
    real = engine_module.ExecutionContext._check
    monkeypatch.setattr(engine_module.ExecutionContext, "_check",
                        lambda self, name, t: (checked.append((name, tuple(t.shape))), real(self, name, t))[1])
    for i, n in enumerate((2, 2, 3, 2, 3, 2)):
        feeds = _feeds(n, i)
        got = ctx.run(feeds)
        for spec, ref in zip(engine.outputs, sess.run(None, feeds)):
            np.testing.assert_array_equal(got[spec["name"]], ref)
    got = ctx.run({"x": torch.from_numpy(_feeds(3)["x"]), "s": _feeds(3)["s"]})       # a tensor: same signature
    assert isinstance(got["y"], torch.Tensor)
    assert checked == [("x", (2, 4)), ("s", (2,)), ("x", (3, 4))]


def test_a_bad_input_after_good_runs_is_still_refused(built) -> None:
    engine, _ = built
    ctx = engine.context(threads=1)
    for n in (1, 2, 6):
        ctx.run(_feeds(n))
    bad = {"outside the profile": ({"x": np.zeros((7, 4), np.float32)}, "outside every optimization profile"),
           "fixed dim": ({"x": np.zeros((2, 5), np.float32)}, "must have 4 at dim 1"),
           "rank": ({"x": np.zeros((2, 4, 1), np.float32)}, "must have rank 2"),
           "dtype": ({"x": np.zeros((2, 4), np.float64)}, "must be float32"),
           "dtype of an accepted shape": ({"x": np.zeros((2, 4), np.float16)}, "must be float32")}
    for why, (override, text) in bad.items():
        with pytest.raises(ShapeError) as err:
            ctx.run({**_feeds(2), **override})
        assert text in str(err.value) and "\n" not in str(err.value), why
    np.testing.assert_array_equal(ctx.run(_feeds(2))["z"], _feeds(2)["s"] * 2)       # still runs after them


def test_the_remembered_signatures_are_bounded(built, monkeypatch) -> None:
    engine, _ = built
    monkeypatch.setattr(engine_module, "MAX_ACCEPTED_SHAPES", 2)
    ctx = engine.context(threads=1)
    for n in (1, 2, 3, 4, 5, 1):
        ctx.run(_feeds(n))
        assert len(ctx._accepted["x"]) <= 2
    assert (torch.float32, torch.Size([1, 4])) in ctx._accepted["x"]
