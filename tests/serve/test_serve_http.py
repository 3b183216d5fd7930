"""`kiln serve` over HTTP, driven by NVIDIA's tritonclient (the reference KServe v2 client) and raw sockets."""
from __future__ import annotations

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from _serve import triton_client  # noqa: E402
httpclient = triton_client("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(server.http, concurrency=16)
    yield c
    c.close()


def mlp_input(x: np.ndarray, binary: bool = True):
    i = httpclient.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=binary)
    return i


def raw(server, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, bytes]:
    host, port = server.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def metric(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_health_and_metadata(client, server):
    assert server.http.startswith("127.0.0.1:") and server.grpc.startswith("127.0.0.1:")     # the default bind
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "kiln" and {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    mlp = client.get_model_metadata("mlp")
    assert mlp["versions"] == ["1"]
    assert mlp["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]
    assert mlp["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]
    scale = client.get_model_metadata("scale", "1")
    assert [(t["name"], t["datatype"], t["shape"]) for t in scale["inputs"]] == [("x", "FP32", [-1, -1]),
                                                                                 ("k", "INT64", [-1, -1])]
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("mlp", "2")
    with pytest.raises(InferenceServerException, match="no version '2'"):
        client.get_model_metadata("mlp", "2")
    with pytest.raises(InferenceServerException, match="'nope' is not loaded"):
        client.get_model_metadata("nope")


@pytest.mark.parametrize("binary", [False, True])
def test_infer_json_and_binary(client, repo, binary):
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    out = httpclient.InferRequestedOutput("y", binary_data=binary)
    r = client.infer("mlp", [mlp_input(x, binary)], outputs=[out], request_id="req-7")
    repo[1].check(x, r.as_numpy("y"))
    assert r.get_response()["id"] == "req-7"
    assert ("parameters" in r.get_response()["outputs"][0]) == binary


def test_compressed_request_body(client, repo):
    x = np.random.default_rng(6).standard_normal((2, 8)).astype(np.float32)
    for algorithm in ("gzip", "deflate"):
        r = client.infer("mlp", [mlp_input(x)], request_compression_algorithm=algorithm)
        repo[1].check(x, r.as_numpy("y"))


def test_two_inputs_with_an_integer_one(client):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5)).astype(np.float32)
    k = rng.integers(-9, 9, (2, 5))
    ix, ik = httpclient.InferInput("x", [2, 5], "FP32"), httpclient.InferInput("k", [2, 5], "INT64")
    ix.set_data_from_numpy(x, binary_data=False)
    ik.set_data_from_numpy(k, binary_data=True)
    r = client.infer("scale", [ix, ik])
    np.testing.assert_array_equal(r.as_numpy("out"), x * k.astype(np.float32))   # one float32 multiply each


def test_concurrent_requests_merge_into_batches_and_get_their_own_rows(client, server, repo):
    before = raw(server, "GET", "/metrics")[1].decode()
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1 + i % 3, 8)).astype(np.float32) for i in range(48)]
    pending = [client.async_infer("mlp", [mlp_input(x)]) for x in xs]
    for x, p in zip(xs, pending):
        repo[1].check(x, p.get_result(timeout=60).as_numpy("y"))
    after = raw(server, "GET", "/metrics")[1].decode()
    batches = metric(after, 'kiln_batch_size_count{model="mlp"') - metric(before, 'kiln_batch_size_count{model="mlp"')
    rows = metric(after, 'kiln_batch_size_sum{model="mlp"') - metric(before, 'kiln_batch_size_sum{model="mlp"')
    assert rows == sum(x.shape[0] for x in xs)
    assert batches < len(xs)                     # some requests shared a batch
    assert metric(after, 'kiln_requests_total{model="mlp",protocol="http"}') >= 48


def test_requests_of_different_shapes_are_not_mixed(client):
    rng = np.random.default_rng(4)
    cases = []
    for i in range(24):
        n, L = 1 + i % 4, 1 + (i * 5) % 16
        x = rng.standard_normal((n, L)).astype(np.float32)
        k = rng.integers(-5, 5, (n, L))
        ix, ik = httpclient.InferInput("x", [n, L], "FP32"), httpclient.InferInput("k", [n, L], "INT64")
        ix.set_data_from_numpy(x)
        ik.set_data_from_numpy(k)
        cases.append((x, k, client.async_infer("scale", [ix, ik])))
    for x, k, p in cases:
        np.testing.assert_array_equal(p.get_result(timeout=60).as_numpy("out"), x * k.astype(np.float32))


def _bad_requests(server) -> list[tuple[str, dict, bytes, int, str]]:
    x = np.ones((1, 8), np.float32)
    good = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": x.reshape(-1).tolist()}]}
    binary_head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8],
                                          "parameters": {"binary_data_size": 32}}]}).encode()
    with_shape = lambda s: {"inputs": [{**good["inputs"][0], "shape": s}]}
    return [
        ("/v2/models/nope/infer", {}, json.dumps(good).encode(), 404, "'nope' is not loaded"),
        ("/v2/models/mlp/versions/3/infer", {}, json.dumps(good).encode(), 404, "no version '3'"),
        ("/v2/models/mlp/infer", {}, json.dumps({"inputs": [{**good["inputs"][0], "name": "q"}]}).encode(), 400,
         "'q' is not an input"),
        ("/v2/models/mlp/infer", {}, json.dumps({"inputs": [{**good["inputs"][0], "datatype": "INT32"}]}).encode(),
         400, "is FP32"),
        ("/v2/models/mlp/infer", {}, json.dumps(with_shape([1, 9])).encode(), 400, "must have shape [-1, 8]"),
        ("/v2/models/mlp/infer", {}, json.dumps({"inputs": [{**good["inputs"][0], "shape": [17, 8],
                                                            "data": [0.5] * 136}]}).encode(), 400,
         "outside every optimization"),
        ("/v2/models/mlp/infer", {}, b'{"inputs": [', 400, "not valid JSON"),
        ("/v2/models/mlp/infer", {"Inference-Header-Content-Length": str(len(binary_head))},
         binary_head + x.tobytes()[:20], 400, "truncated"),
        ("/v2/models/mlp/infer", {}, b"{" + b" " * (1 << 20) + b"}", 413, "--max-request-mb"),
    ]


def test_bad_requests_get_protocol_errors_and_do_not_disturb_good_ones(server, client, repo):
    bad = _bad_requests(server)
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((2, 8)).astype(np.float32) for _ in range(16)]

    def good(x: np.ndarray) -> np.ndarray:
        c = httpclient.InferenceServerClient(server.http)
        try:
            return c.infer("mlp", [mlp_input(x)]).as_numpy("y")
        finally:
            c.close()
    with ThreadPoolExecutor(len(xs) + len(bad)) as pool:          # good and bad ones at once, batched together
        goods = [pool.submit(good, x) for x in xs]
        bads = [pool.submit(raw, server, "POST", path, body, headers) for path, headers, body, _, _ in bad]
        for (path, _, _, status, words), f in zip(bad, bads):
            got, payload = f.result(timeout=60)
            assert got == status, (path, got, payload[:300])
            msg = json.loads(payload)["error"]
            assert words in msg and "\n" not in msg, (words, msg)
        for x, f in zip(xs, goods):
            repo[1].check(x, f.result(timeout=60))
    assert client.is_server_ready()


def test_a_client_that_disconnects_mid_request_does_not_hurt_the_server(server, client, repo):
    host, port = server.http.rsplit(":", 1)
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 8],
                                   "parameters": {"binary_data_size": 64}}]}).encode()
    for cut in (10, len(head) + 5):            # inside the JSON, inside the binary tensor
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                  b"Inference-Header-Content-Length: " + str(len(head)).encode() + b"\r\n"
                  b"Content-Length: " + str(len(head) + 64).encode() + b"\r\n\r\n" + (head + bytes(64))[:cut])
        time.sleep(0.2)
        s.close()
    x = np.ones((2, 8), np.float32)            # a full request whose client leaves before the answer
    s = socket.create_connection((host, int(port)), timeout=10)
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 8],
                                   "data": x.reshape(-1).tolist()}]}).encode()
    s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode() +
              b"\r\n\r\n" + body)
    s.close()
    time.sleep(0.3)
    r = client.infer("mlp", [mlp_input(x)])
    repo[1].check(x, r.as_numpy("y"))
    assert client.is_server_live() and client.is_server_ready()


def test_metrics_are_prometheus_text_per_model(server, client):
    status, text = raw(server, "GET", "/metrics")
    text = text.decode()
    assert status == 200
    for name, kind in (("kiln_requests_total", "counter"), ("kiln_request_failures_total", "counter"),
                       ("kiln_queue_seconds", "histogram"), ("kiln_compute_seconds", "histogram"),
                       ("kiln_batch_size", "histogram")):
        assert f"# TYPE {name} {kind}" in text
    assert 'kiln_batch_size_bucket{model="mlp",le="+Inf"}' in text
    assert 'kiln_queue_seconds_count{model="scale"}' in text
    assert metric(text, 'kiln_request_failures_total{model="mlp",reason="bad_request"}') >= 1
    for line in text.splitlines():             # every sample line is NAME{labels} NUMBER
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
    assert raw(server, "GET", "/v2/nothing")[0] == 404


def test_server_log_has_no_tracebacks(server, client):
    """Everything above (bad input, disconnects) was a user's doing: nothing is logged as a server failure."""
    assert client.is_server_live()
    log = server.stderr()
    assert "Traceback" not in log and "failed" not in log, log[-3000:]
