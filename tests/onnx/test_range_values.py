"""Range with start/limit/delta computed at run time: ONNX Runtime's values, and a one-line refusal
for a zero or non-finite delta (instead of a ZeroDivisionError from the kernel)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import kiln
import kiln.onnx
from kiln.errors import ShapeError


def _range_model(dtype: int) -> bytes:
    inputs = [helper.make_tensor_value_info(n, dtype, []) for n in ("start", "limit", "delta")]
    out = helper.make_tensor_value_info("y", dtype, ["n"])
    graph = helper.make_graph([helper.make_node("Range", ["start", "limit", "delta"], ["y"], name="r")],
                              "range", inputs, [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.fixture(scope="module", params=[(TensorProto.FLOAT, np.float32), (TensorProto.INT64, np.int64)],
                ids=["float", "int64"])
def engine(request, tmp_path_factory):
    dtype, np_dtype = request.param
    path = tmp_path_factory.mktemp("range") / "range.onnx"
    path.write_bytes(_range_model(dtype))
    built = kiln.build(kiln.onnx.parse(str(path)), kiln.BuildConfig(device="cpu"))
    return built.context(), ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), np_dtype


@pytest.mark.parametrize("start,limit,delta", [(0, 10, 3), (10, 1, -2), (5, 5, 1), (1, 0, 1)])
def test_range_matches_onnxruntime(engine, start, limit, delta):
    ctx, sess, dt = engine
    feeds = {"start": np.array(start, dt), "limit": np.array(limit, dt), "delta": np.array(delta, dt)}
    got = np.asarray(ctx.run(feeds)["y"])
    ref = sess.run(None, feeds)[0]
    assert got.dtype == ref.dtype and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


def test_range_zero_delta_is_one_line(engine):
    ctx, sess, dt = engine
    feeds = {"start": np.array(0, dt), "limit": np.array(4, dt), "delta": np.array(0, dt)}
    with pytest.raises(Exception):           # ONNX Runtime refuses it too
        sess.run(None, feeds)
    with pytest.raises(ShapeError) as e:
        ctx.run(feeds)
    msg = str(e.value)
    assert "\n" not in msg and "'r'" in msg and "delta" in msg and "non-zero" in msg


def test_range_nan_limit_is_one_line(engine):
    ctx, _, dt = engine
    if dt != np.float32:
        pytest.skip("integers have no NaN")
    with pytest.raises(ShapeError, match="finite"):
        ctx.run({"start": np.array(0, dt), "limit": np.array(np.nan, dt), "delta": np.array(1, dt)})
