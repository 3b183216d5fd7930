"""v2 request bodies (JSON and the binary tensor extension): what is accepted, and the one-line refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kiln.serve.errors import BadRequest
from kiln.serve.model import ModelOptions, ServedModel
from kiln.serve.protocol import decode_http, encode_http


class Engine:
    """x [N, 3] float32 and k [N, 3] int8 -> y [N, 3] float32; one profile N 1..4."""

    inputs = [{"name": "x", "dtype": "float32", "shape": ["N", 3]}, {"name": "k", "dtype": "int8", "shape": ["N", 3]}]
    outputs = [{"name": "y", "dtype": "float32", "shape": ["N", 3]}]
    profiles = [{"x": {"min": [1, 3], "opt": [2, 3], "max": [4, 3]}, "k": {"min": [1, 3], "opt": [2, 3], "max": [4, 3]}}]


MODEL = ServedModel("m", Engine(), ModelOptions())
X = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
K = np.array([[1, -2, 3], [4, 5, -128]], np.int8)


def entry(name: str, datatype: str, arr: np.ndarray, binary: bool = False) -> dict:
    e = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
    if binary:
        e["parameters"] = {"binary_data_size": arr.nbytes}
    else:
        e["data"] = arr.reshape(-1).tolist()
    return e


def body(inputs: list[dict], blobs: bytes = b"", **extra) -> tuple[bytes, str | None]:
    head = json.dumps({"inputs": inputs, **extra}).encode()
    return head + blobs, (str(len(head)) if blobs else None)


def test_metadata_has_v2_datatypes_and_minus_one_for_dynamic_dims():
    meta = MODEL.metadata()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]},
                              {"name": "k", "datatype": "INT8", "shape": [-1, 3]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]
    assert MODEL.batch_axis and MODEL.max_batch == 4


def test_json_and_binary_inputs_decode_to_the_same_arrays():
    a = decode_http(MODEL, *body([entry("x", "FP32", X), entry("k", "INT8", K)]))
    b = decode_http(MODEL, *body([entry("x", "FP32", X, True), entry("k", "INT8", K, True)],
                                 X.tobytes() + K.tobytes()))
    for req in (a, b):
        np.testing.assert_array_equal(req.arrays["x"], X)
        np.testing.assert_array_equal(req.arrays["k"], K)
        assert req.arrays["k"].dtype == np.int8 and req.rows == 2 and req.outputs == ["y"]
    assert a.key == b.key == ((3,), (3,))


def test_binary_output_response_is_json_then_raw_bytes():
    req = decode_http(MODEL, *body([entry("x", "FP32", X), entry("k", "INT8", K)],
                                   outputs=[{"name": "y", "parameters": {"binary_data": True}}], id="r1"))
    y = (X * 3).astype(np.float32)
    payload, n = encode_http(req, {"y": y})
    head = json.loads(payload[:n])
    assert head["id"] == "r1" and head["outputs"][0]["parameters"]["binary_data_size"] == y.nbytes
    np.testing.assert_array_equal(np.frombuffer(payload[n:], np.float32).reshape(2, 3), y)
    req.binary = set()
    payload, n = encode_http(req, {"y": y})
    assert n is None and json.loads(payload)["outputs"][0]["data"] == y.reshape(-1).tolist()


@pytest.mark.parametrize("make, words", [
    (lambda: (b"{not json", None), "not valid JSON"),
    (lambda: (b"[1, 2]", None), "JSON list"),
    (lambda: body([]), "no \"inputs\""),
    (lambda: body([entry("z", "FP32", X)]), "'z' is not an input"),
    (lambda: body([entry("x", "FP64", X.astype(np.float64)), entry("k", "INT8", K)]), "is FP32, got datatype 'FP64'"),
    (lambda: body([entry("x", "FP32", X)]), "'k' is missing"),
    (lambda: body([entry("x", "FP32", X), entry("x", "FP32", X)]), "given twice"),
    (lambda: body([entry("x", "FP32", X.reshape(3, 2)), entry("k", "INT8", K)]), "must have shape [-1, 3]"),
    (lambda: body([entry("x", "FP32", X[None]), entry("k", "INT8", K)]), "rank 2"),
    (lambda: body([entry("x", "FP32", np.zeros((5, 3), np.float32)), entry("k", "INT8", np.zeros((5, 3), np.int8))]),
     "outside every optimization profile"),
    (lambda: body([entry("x", "FP32", X), entry("k", "INT8", K[:1])]), "share their first"),
    (lambda: body([{**entry("x", "FP32", X), "data": [1.0] * 5}, entry("k", "INT8", K)]), "5 values for shape [2, 3]"),
    (lambda: body([{**entry("x", "FP32", X), "data": ["a"] * 6}, entry("k", "INT8", K)]), "takes numbers"),
    (lambda: body([{**entry("x", "FP32", X), "data": [[1.0, 2.0], [3.0]]}, entry("k", "INT8", K)]), "regular array"),
    (lambda: body([entry("x", "FP32", X), {**entry("k", "INT8", K), "data": [1.5] * 6}]), "whole numbers"),
    (lambda: body([entry("x", "FP32", X), {**entry("k", "INT8", K), "data": [300] * 6}]), "outside [-128, 127]"),
    (lambda: body([entry("x", "FP32", X, True), entry("k", "INT8", K, True)], X.tobytes() + K.tobytes()[:3]),
     "truncated"),
    (lambda: body([entry("x", "FP32", X, True), entry("k", "INT8", K, True)], X.tobytes() + K.tobytes() + b"!"),
     "1 bytes after"),
    (lambda: body([{**entry("x", "FP32", X, True), "parameters": {"binary_data_size": 8}}, entry("k", "INT8", K)],
                  X.tobytes()[:8]), "needs 24 bytes"),
    (lambda: (body([entry("x", "FP32", X), entry("k", "INT8", K)])[0], "99999"), "Inference-Header-Content-Length"),
    (lambda: (body([entry("x", "FP32", X), entry("k", "INT8", K)])[0], "ten"), "Inference-Header-Content-Length"),
    (lambda: body([entry("x", "FP32", X), entry("k", "INT8", K)], outputs=[{"name": "nope"}]), "not an output"),
    (lambda: body([entry("x", "FP32", X), entry("k", "INT8", K)], outputs=[{"name": "y", "parameters":
                                                                           {"classification": 2}}]), "classification"),
    (lambda: body([entry("x", "FP32", X), entry("k", "INT8", K)], parameters={"timeout": -5}), "timeout"),
    (lambda: body([entry("x", "FP32", X), entry("k", "INT8", K)], id=7), "request id"),
])
def test_bad_requests_are_one_line_bad_request_errors(make, words):
    with pytest.raises(BadRequest) as info:
        decode_http(MODEL, *make())
    msg = str(info.value)
    assert words in msg and "\n" not in msg, msg
