"""A Loop whose trip count or condition asks for more iterations than the limit is one error, not a run
that never ends (a forged engine's weight once asked for 4e16 iterations)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.errors import ShapeError


def _loop_model(path, trip: int, with_cond: bool):
    """y = x + trip (one added per iteration); the body passes its condition through unchanged."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "one"], ["acc_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.ones(1, np.float32), "one")])
    g = helper.make_graph([helper.make_node("Loop", ["M", "c" if with_cond else "", "x"], ["y"], body=body, name="L")],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                          [numpy_helper.from_array(np.array(trip, np.int64), "M"),
                           numpy_helper.from_array(np.array(True), "c")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return kiln.build(kiln.onnx.parse(str(path)), kiln.BuildConfig(device="cpu"))


@pytest.mark.parametrize("with_cond", [False, True])
def test_loop_within_the_limit_matches_onnxruntime(tmp_path, with_cond):
    import onnxruntime as ort
    engine = _loop_model(tmp_path / "m.onnx", 300, with_cond)
    x = np.array([0.5], np.float32)
    ref = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(engine.context().run({"x": x})["y"], ref)


def test_trip_count_past_the_default_limit_is_refused_before_running(tmp_path, monkeypatch):
    monkeypatch.delenv("KILN_MAX_LOOP_ITERATIONS", raising=False)
    engine = _loop_model(tmp_path / "m.onnx", 4 * 10 ** 16, with_cond=False)
    with pytest.raises(ShapeError, match=r"past 100,000 iterations \(its trip count is 40,000,000,000,000,000\)"):
        engine.context().run({"x": np.zeros(1, np.float32)})


def test_condition_that_stays_true_stops_at_the_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_MAX_LOOP_ITERATIONS", "50")
    engine = _loop_model(tmp_path / "m.onnx", 10 ** 12, with_cond=True)
    with pytest.raises(ShapeError, match="past 50 iterations") as info:
        engine.context().run({"x": np.zeros(1, np.float32)})
    assert "\n" not in str(info.value) and "KILN_MAX_LOOP_ITERATIONS" in str(info.value)

    engine = _loop_model(tmp_path / "n.onnx", 80, with_cond=True)    # 80 iterations: over 50, under a raised limit
    with pytest.raises(ShapeError):
        engine.context().run({"x": np.zeros(1, np.float32)})
    monkeypatch.setenv("KILN_MAX_LOOP_ITERATIONS", "100")
    assert engine.context().run({"x": np.zeros(1, np.float32)})["y"][0] == 80.0
