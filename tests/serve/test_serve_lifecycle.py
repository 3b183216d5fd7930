"""Repository load/unload, back-pressure, timeouts, draining on Ctrl-C, and refusals at start-up."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
from _serve import ServerProcess, triton_client

httpclient = triton_client("tritonclient.http")
grpcclient = triton_client("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


def http_input(x: np.ndarray):
    i = httpclient.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def grpc_input(x: np.ndarray):
    i = grpcclient.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def test_repository_index_load_and_unload(repo, tmp_path):
    root, mlp = repo
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(root / "mlp.kiln", folder / "mlp.kiln")
    access = tmp_path / "access.log"
    server = ServerProcess(folder, "--grpc-port", "off", "--access-log", str(access))
    try:
        c = httpclient.InferenceServerClient(server.http)
        assert c.get_model_repository_index() == [{"name": "mlp", "version": "1", "state": "READY"}]
        shutil.copy(root / "mlp.kiln", folder / "second.kiln")
        (folder / "broken.kiln").write_bytes(b"KILN" + bytes(100))
        index = {r["name"]: r for r in c.get_model_repository_index()}
        assert index["second"]["state"] == "UNAVAILABLE" and index["mlp"]["state"] == "READY"
        c.load_model("second")
        x = np.random.default_rng(21).standard_normal((2, 8)).astype(np.float32)
        mlp.check(x, c.infer("second", [http_input(x)]).as_numpy("y"))
        c.unload_model("mlp")
        assert not c.is_model_ready("mlp")
        with pytest.raises(InferenceServerException, match="'mlp' is not loaded"):
            c.infer("mlp", [http_input(x)])
        with pytest.raises(InferenceServerException, match="'broken' failed to load"):
            c.load_model("broken")
        broken = {r["name"]: r for r in c.get_model_repository_index()}["broken"]
        assert broken["state"] == "UNAVAILABLE" and "'broken.kiln' is not a Kiln engine" in broken["reason"], broken
        assert str(folder) not in broken["reason"]
        for name in ("../mlp", "..%2Fmlp", "nope", "mlp.kiln"):
            with pytest.raises(InferenceServerException) as info:
                c.load_model(name)
            assert info.value.status() == "404", info.value.message()
        with pytest.raises(InferenceServerException, match="no config or file overrides"):
            c.load_model("mlp", config='{"max_batch_size": 4}')
        c.load_model("mlp")
        mlp.check(x, c.infer("mlp", [http_input(x)]).as_numpy("y"))
        assert c.is_server_ready()
        c.close()
    finally:
        assert server.stop() == 0, server.stderr()[-2000:]
    lines = [json.loads(line) for line in access.read_text().splitlines()]      # one JSON object per request
    infers = [r for r in lines if r["path"] == "/v2/models/second/infer"]
    assert infers and infers[0]["status"] == 200 and infers[0]["protocol"] == "http" and infers[0]["ms"] > 0
    refused = [r for r in lines if r["path"] == "/v2/models/mlp/infer" and r["status"] == 404]
    assert refused and "'mlp' is not loaded" in refused[0]["error"]


@pytest.fixture(scope="module")
def slow_server(repo):
    """A server whose queued requests wait 10 s for company: at most 2 queued per model (warmed up at load)."""
    proc = ServerProcess(repo[0], "--max-queue-delay-us", "10000000", "--max-queue", "2", "--max-batch", "8", "--warmup")
    yield proc
    proc.stop()


def _in_background(server, xs: list[np.ndarray]) -> list[Future]:
    """Each request sent at once from its own thread and client (tritonclient.http's async_infer only
    sends when the caller next blocks in gevent)."""
    def one(x: np.ndarray):
        c = httpclient.InferenceServerClient(server.http, network_timeout=120)
        try:
            return c.infer("mlp", [http_input(x)]).as_numpy("y")
        finally:
            c.close()
    pool = ThreadPoolExecutor(len(xs))
    futures = [pool.submit(one, x) for x in xs]
    pool.shutdown(wait=False)
    return futures


def test_full_queue_answers_503_and_unavailable(slow_server, repo):
    h = httpclient.InferenceServerClient(slow_server.http)
    g = grpcclient.InferenceServerClient(slow_server.grpc)
    x = np.ones((1, 8), np.float32)
    queued = _in_background(slow_server, [x, x])
    _wait_for(slow_server, 'kiln_queue_depth{model="mlp"} 2')
    with pytest.raises(InferenceServerException) as info:
        h.infer("mlp", [http_input(x)])
    assert info.value.status() == "503" and "--max-queue" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        g.infer("mlp", [grpc_input(x)])
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    for q in queued:                                   # the queued ones are answered after the delay
        repo[1].check(x, q.result(timeout=60))
    h.close()
    g.close()


def test_a_cancelled_grpc_call_leaves_the_queue(slow_server):
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    req = service_pb2.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 8])
    req.raw_input_contents.append(np.ones((1, 8), np.float32).tobytes())
    h = httpclient.InferenceServerClient(slow_server.http)
    with grpc.insecure_channel(slow_server.grpc) as channel:
        t0 = time.monotonic()
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(req)
        _wait_for(slow_server, 'kiln_queue_depth{model="mlp"} 1')
        call.cancel()
        _wait_for(slow_server, 'kiln_queue_depth{model="mlp"} 0')
        assert time.monotonic() - t0 < 8                   # removed on cancel, not run after the 10 s delay
    assert h.is_server_ready()
    h.close()


def _metrics(server) -> str:
    import urllib.request
    with urllib.request.urlopen(f"http://{server.http}/metrics", timeout=30) as r:
        return r.read().decode()


def _wait_for(server, line: str, timeout: float = 8.0) -> None:
    """Polls /metrics until it has ``line``."""
    deadline = time.monotonic() + timeout
    while line not in _metrics(server):
        assert time.monotonic() < deadline, (line, [m for m in _metrics(server).splitlines() if "depth" in m])
        time.sleep(0.05)


def test_per_request_timeouts(slow_server):
    h = httpclient.InferenceServerClient(slow_server.http)
    g = grpcclient.InferenceServerClient(slow_server.grpc)
    x = np.ones((1, 8), np.float32)
    t0 = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        h.infer("mlp", [http_input(x)], timeout=200_000)            # microseconds, as the protocol's parameter
    assert info.value.status() == "504" and "200 ms" in info.value.message()
    assert time.monotonic() - t0 < 8                   # answered at its timeout, not after the 10 s delay
    with pytest.raises(InferenceServerException) as info:
        g.infer("mlp", [grpc_input(x)], client_timeout=0.3)        # a gRPC deadline
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert h.is_server_ready()
    h.close()
    g.close()


def test_ctrl_c_drains_requests_in_flight(repo):
    server = ServerProcess(repo[0], "--max-queue-delay-us", "60000000", "--max-batch", "8", "--verbose")
    try:
        xs = [np.full((1, 8), i / 3, np.float32) for i in range(3)]
        queued = _in_background(server, xs)
        _wait_for(server, 'kiln_queue_depth{model="mlp"} 3')      # all three wait in the queue
        t0 = time.monotonic()
        server.interrupt()                             # drains: the queued batch runs now, not after 60 s
        for x, q in zip(xs, queued):
            repo[1].check(x, q.result(timeout=30))
        assert server.proc.wait(30) == 0 and time.monotonic() - t0 < 30
        assert b"stopped" in server.proc.stdout.read()
    finally:
        server.stop()
    log = server.stderr()                        # --verbose: the batch formed, and the access log on stderr
    assert "model mlp: batch of 3 requests, 3 rows" in log, log[-2000:]
    assert '"path":"/v2/models/mlp/infer","model":"mlp","status":200' in log


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.serve", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case, words", [
    ("missing", "does not exist"),
    ("empty", "No engines"),
    ("damaged", "failed to load"),
    ("both_off", "turned off"),
    ("port_in_use", "Cannot listen"),
    ("grpc_port_in_use", "Cannot listen for gRPC"),
])
def test_start_up_refusals_are_one_line(repo, tmp_path, case, words):
    folder = tmp_path / "m"
    folder.mkdir()
    args = [str(folder), "--http-port", "0", "--grpc-port", "0"]
    if case == "missing":
        args[0] = str(tmp_path / "nowhere")
    elif case == "damaged":
        (folder / "bad.kiln").write_bytes(b"not an engine")
    elif case == "both_off":
        shutil.copy(repo[0] / "mlp.kiln", folder)
        args[1:] = ["--http-port", "off", "--grpc-port", "off"]
    elif case in ("port_in_use", "grpc_port_in_use"):
        import socket
        shutil.copy(repo[0] / "mlp.kiln", folder)
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = str(s.getsockname()[1])
        args[1:] = (["--http-port", taken, "--grpc-port", "off"] if case == "port_in_use" else
                    ["--http-port", "off", "--grpc-port", taken])
    r = _serve(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("kiln: error:"), r.stderr[-2000:]
