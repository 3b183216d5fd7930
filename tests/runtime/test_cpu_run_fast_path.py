"""ExecutionContext.run on a CPU engine: once every input's (dtype, shape) signature has passed run's checks,
C-ordered writeable numpy feeds of that signature are shared with torch as they are (no per-input check or
conversion). Anything else (a strided or read-only array, another byte order, a tensor, a new signature or a
combination of inputs no single profile holds) takes the checked path; results stay equal to ONNX Runtime's
and outputs that are inputs are still copies."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.errors import KilnError, ShapeError
from kiln.runtime import engine as engine_module

ort = pytest.importorskip("onnxruntime")


def _model(tmp_path, profiles):
    """y = relu(x + c); z = 2 s; xi = x (an output that is an input)."""
    import onnx
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["a"]), helper.make_node("Relu", ["a"], ["y"]),
         helper.make_node("Mul", ["s", "two"], ["z"]), helper.make_node("Identity", ["x"], ["xi"])], "g",
        [vi("x", TensorProto.FLOAT, ["n", 4]), vi("s", TensorProto.FLOAT, ["m"])],
        [vi("y", TensorProto.FLOAT, ["n", 4]), vi("z", TensorProto.FLOAT, ["m"]), vi("xi", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.linspace(-1, 1, 4, dtype=np.float32), "c"),
         numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    engine = kiln.build(kiln.onnx.parse(str(path)), kiln.BuildConfig(device="cpu", profiles=profiles))
    return engine, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("fast"), {"x": ((1, 4), (2, 4), (6, 4)), "s": ((1,), (2,), (4,))})


def _feeds(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 4)).astype(np.float32), "s": rng.standard_normal(2).astype(np.float32)}


def _same_as_onnxruntime(got: dict, sess, feeds: dict) -> None:
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    assert sorted(got) == sorted(ref)
    for name, r in ref.items():
        assert isinstance(got[name], np.ndarray) and got[name].dtype == r.dtype
        np.testing.assert_array_equal(got[name], r)


def test_plain_numpy_feeds_of_a_checked_signature_are_shared_without_conversion(built, monkeypatch) -> None:
    engine, sess = built
    ctx = engine.context(threads=1)
    converted = []
    real = engine_module._host_tensor
    monkeypatch.setattr(engine_module, "_host_tensor", lambda a: (converted.append(a.shape), real(a))[1])
    _same_as_onnxruntime(ctx.run(_feeds(2, 0)), sess, _feeds(2, 0))
    assert converted == [(2, 4), (2,)]
    for seed in range(1, 4):                    # new values each run, the same signature: nothing converted
        feeds = _feeds(2, seed)
        got = ctx.run(feeds)
        _same_as_onnxruntime(got, sess, feeds)
        got["xi"][:] = 7.0                      # an output that is an input is a copy on this path too
        np.testing.assert_array_equal(feeds["x"], _feeds(2, seed)["x"])
    assert converted == [(2, 4), (2,)]
    _same_as_onnxruntime(ctx.run(_feeds(3, 9)), sess, _feeds(3, 9))      # a new signature: checked once
    assert converted[2:] == [(3, 4), (2,)]


def test_feeds_that_cannot_be_shared_take_the_checked_path(built) -> None:
    engine, sess = built
    ctx = engine.context(threads=1)
    ctx.run(_feeds(2, 0))
    feeds = _feeds(2, 1)
    wide = np.zeros((2, 8), np.float32)
    wide[:, ::2] = feeds["x"]
    strided = wide[:, ::2]                      # same dtype and shape, not C-ordered
    frozen = feeds["x"].copy()
    frozen.flags.writeable = False
    swapped = feeds["x"].astype(">f4")          # another byte order
    for x in (strided, frozen, swapped):
        _same_as_onnxruntime(ctx.run({**feeds, "x": x}), sess, feeds)
    got = ctx.run({**feeds, "x": torch.from_numpy(feeds["x"].copy())})
    assert isinstance(got["y"], torch.Tensor)
    np.testing.assert_array_equal(got["y"].numpy(), sess.run(["y"], feeds)[0])
    ctx.run(feeds)
    assert ctx.run(feeds, outputs=["z"]).keys() == {"z"}


def test_bad_inputs_and_output_names_are_refused_after_fast_runs(built) -> None:
    engine, _ = built
    ctx = engine.context(threads=1)
    for seed in range(3):
        ctx.run(_feeds(2, seed))
    bad = {"dtype": ({"x": np.zeros((2, 4), np.float64)}, "must be float32"),
           "rank": ({"x": np.zeros((2, 4, 1), np.float32)}, "must have rank 2"),
           "fixed dim": ({"x": np.zeros((2, 5), np.float32)}, "must have 4 at dim 1"),
           "profile": ({"x": np.zeros((7, 4), np.float32)}, "outside every optimization profile")}
    for why, (override, text) in bad.items():
        with pytest.raises(ShapeError) as err:
            ctx.run({**_feeds(2, 0), **override})
        assert text in str(err.value) and "\n" not in str(err.value), why
    with pytest.raises(KilnError, match=r"^'w' is not an output of this engine; its outputs are \['y', 'z', 'xi'\]\.$"):
        ctx.run(_feeds(2, 0), outputs=["w"])
    with pytest.raises(KilnError, match=r"^Input 's' is missing"):
        ctx.run({"x": _feeds(2, 0)["x"]})


def test_the_shared_signatures_are_bounded(built, monkeypatch) -> None:
    engine, sess = built
    monkeypatch.setattr(engine_module, "MAX_ACCEPTED_SHAPES", 2)
    ctx = engine.context(threads=1)
    for n in (1, 2, 3, 4, 5, 1):
        _same_as_onnxruntime(ctx.run(_feeds(n, n)), sess, _feeds(n, n))
        assert len(ctx._host_signatures) <= 2


def test_a_mix_of_profiles_is_refused_after_each_profile_ran(tmp_path) -> None:
    engine, sess = _model(tmp_path, [{"x": ((1, 4), (1, 4), (2, 4)), "s": ((1,), (1,), (2,))},
                                     {"x": ((3, 4), (3, 4), (6, 4)), "s": ((3,), (3,), (4,))}])
    ctx = engine.context(threads=1)
    rng = np.random.default_rng(0)
    small = {"x": rng.standard_normal((2, 4)).astype(np.float32), "s": rng.standard_normal(2).astype(np.float32)}
    large = {"x": rng.standard_normal((3, 4)).astype(np.float32), "s": rng.standard_normal(3).astype(np.float32)}
    for feeds in (small, large, small, large):
        _same_as_onnxruntime(ctx.run(feeds), sess, feeds)
    with pytest.raises(ShapeError, match="no single profile holds them all"):
        ctx.run({"x": small["x"], "s": large["s"]})
