"""`kiln serve` over gRPC, driven by tritonclient.grpc (raw tensors) and its own stubs (typed contents)."""
from __future__ import annotations

import numpy as np
import pytest

from _serve import triton_client  # noqa: E402
grpcclient = triton_client("tritonclient.grpc")
import grpc  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc)
    yield c
    c.close()


def mlp_input(x: np.ndarray):
    i = grpcclient.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "kiln" and "binary_tensor_data" in meta["extensions"]
    mlp = client.get_model_metadata("mlp", as_json=True)
    assert mlp["versions"] == ["1"] and mlp["platform"] == "kiln_engine"
    assert mlp["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "8"]}]
    assert mlp["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("mlp", "9")
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        client.get_model_metadata("nope")


def test_infer_raw_tensors(client, repo):
    x = np.random.default_rng(11).standard_normal((4, 8)).astype(np.float32)
    r = client.infer("mlp", [mlp_input(x)], outputs=[grpcclient.InferRequestedOutput("y")], request_id="g1")
    repo[1].check(x, r.as_numpy("y"))
    assert r.get_response().id == "g1"


def test_infer_typed_contents(server, repo):
    """The protocol's other encoding: values in InferTensorContents (fp32_contents, int64_contents)."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    k = rng.integers(-4, 4, (2, 3))
    req = service_pb2.ModelInferRequest(model_name="scale")
    tx = req.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    tx.contents.fp32_contents.extend(x.reshape(-1).tolist())
    tk = req.inputs.add(name="k", datatype="INT64", shape=[2, 3])
    tk.contents.int64_contents.extend(k.reshape(-1).tolist())
    with grpc.insecure_channel(server.grpc) as channel:
        resp = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=60)
    assert [tuple(o.shape) for o in resp.outputs] == [(2, 3)] and resp.outputs[0].datatype == "FP32"
    out = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 3)
    np.testing.assert_array_equal(out, x * k.astype(np.float32))


def test_concurrent_requests(client, repo):
    rng = np.random.default_rng(13)
    xs = [rng.standard_normal((1 + i % 4, 8)).astype(np.float32) for i in range(32)]
    results: dict[int, object] = {}

    def done(i):
        return lambda result, error: results.__setitem__(i, error or result)
    for i, x in enumerate(xs):
        client.async_infer("mlp", [mlp_input(x)], done(i))
    import time
    deadline = time.monotonic() + 60
    while len(results) < len(xs) and time.monotonic() < deadline:
        time.sleep(0.01)
    for i, x in enumerate(xs):
        repo[1].check(x, results[i].as_numpy("y"))


@pytest.mark.parametrize("make, code, words", [
    (lambda: ("nope", [mlp_input(np.ones((1, 8), np.float32))]), "NOT_FOUND", "'nope' is not loaded"),
    (lambda: ("mlp", [mlp_input(np.ones((1, 7), np.float32))]), "INVALID_ARGUMENT", "must have shape [-1, 8]"),
    (lambda: ("mlp", [mlp_input(np.ones((20, 8), np.float32))]), "INVALID_ARGUMENT", "outside every optimization"),
    (lambda: ("mlp", [grpcclient.InferInput("x", [1, 8], "FP64").set_data_from_numpy(np.ones((1, 8)))]),
     "INVALID_ARGUMENT", "is FP32, got datatype 'FP64'"),
    (lambda: ("mlp", [grpcclient.InferInput("z", [1, 8], "FP32").set_data_from_numpy(np.ones((1, 8), np.float32))]),
     "INVALID_ARGUMENT", "'z' is not an input"),
    (lambda: ("mlp", [grpcclient.InferInput("x", [40000, 8], "FP32").set_data_from_numpy(
        np.ones((40000, 8), np.float32))]), "RESOURCE_EXHAUSTED", ""),
])
def test_bad_requests_get_grpc_status_codes(client, repo, make, code, words):
    model, inputs = make()
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs)
    assert info.value.status() == f"StatusCode.{code}", (info.value.status(), info.value.message())
    assert words in info.value.message() and "\n" not in info.value.message()
    x = np.full((16, 8), 0.25, np.float32)               # the server answers the next request as before
    repo[1].check(x, client.infer("mlp", [mlp_input(x)]).as_numpy("y"))


def test_raw_contents_count_must_match_inputs(server):
    req = service_pb2.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 8])
    req.raw_input_contents.extend([bytes(32), bytes(32)])
    with grpc.insecure_channel(server.grpc) as channel, pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "2 entries for 1 inputs" in info.value.details()
    del req.raw_input_contents[:]
    req.raw_input_contents.append(bytes(20))                  # a truncated tensor
    with grpc.insecure_channel(server.grpc) as channel, pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 32 bytes" in info.value.details()
