"""`kiln serve --frontends 2`: two front-end processes on the same ports in front of one engine process,
checked with the real tritonclient (HTTP and gRPC, binary and JSON, system shared memory)."""
from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest
from _serve import ServerProcess, triton_client

httpclient = triton_client("tritonclient.http")
grpcclient = triton_client("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def frontend_counts(http_at: str) -> dict[str, int]:
    import urllib.request
    text = urllib.request.urlopen(f"http://{http_at}/metrics", timeout=30).read().decode()
    return {m.group(1): int(m.group(2)) for m in re.finditer(r'kiln_frontend_requests_total\{frontend="(\d+)"\} (\d+)',
                                                             text)}


def shm_names() -> set[str]:
    return set(os.listdir("/dev/shm"))


@pytest.fixture(scope="module")
def fe_server(repo):
    before = shm_names()
    proc = ServerProcess(repo[0], "--frontends", "2", "--max-queue-delay-us", "20000")
    kids = children(proc.proc.pid)
    yield proc, kids, before
    proc.stop()


def grpc_x(x: np.ndarray, name: str = "x", datatype: str = "FP32"):
    i = grpcclient.InferInput(name, list(x.shape), datatype)
    i.set_data_from_numpy(x)
    return i


def http_x(x: np.ndarray, binary: bool, name: str = "x", datatype: str = "FP32"):
    i = httpclient.InferInput(name, list(x.shape), datatype)
    i.set_data_from_numpy(x, binary_data=binary)
    return i


def test_two_frontend_processes_answer_http_and_grpc_like_numpy(fe_server, repo):
    server, kids, _ = fe_server
    _, mlp = repo
    assert len(kids) == 2 and all(Path(f"/proc/{k}").exists() for k in kids)
    rng = np.random.default_rng(5)
    for k in range(16):                         # a new connection each time: the kernel spreads them
        x = rng.standard_normal((1 + k % 5, 8)).astype(np.float32)
        if k % 2:
            c = grpcclient.InferenceServerClient(server.grpc)
            mlp.check(x, c.infer("mlp", [grpc_x(x)]).as_numpy("y"))
        else:
            c = httpclient.InferenceServerClient(server.http)
            out = httpclient.InferRequestedOutput("y", binary_data=k % 4 == 0)
            mlp.check(x, c.infer("mlp", [http_x(x, binary=k % 4 == 0)], outputs=[out]).as_numpy("y"))
        c.close()
    x = rng.standard_normal((3, 5)).astype(np.float32)
    kk = rng.integers(-4, 5, (3, 5))
    c = grpcclient.InferenceServerClient(server.grpc)
    got = c.infer("scale", [grpc_x(x), grpc_x(kk, "k", "INT64")]).as_numpy("out")
    np.testing.assert_array_equal(got, x * kk.astype(np.float32))
    c.close()
    counts = frontend_counts(server.http)
    assert set(counts) == {"0", "1"} and sum(counts.values()) >= 17, counts
    if min(counts.values()) == 0:               # the kernel hashed every connection to one process: go on
        for _ in range(64):
            c = httpclient.InferenceServerClient(server.http)
            c.infer("mlp", [http_x(np.ones((1, 8), np.float32), True)])
            c.close()
            if min(frontend_counts(server.http).values()):
                break
    assert min(frontend_counts(server.http).values()) > 0


def test_errors_stay_with_their_own_requests(fe_server, repo):
    server, _, _ = fe_server
    _, mlp = repo

    def one(k: int):
        c = grpcclient.InferenceServerClient(server.grpc)
        try:
            if k % 3 == 2:
                x = np.ones((2, 9), np.float32)                  # the wrong width
                with pytest.raises(InferenceServerException) as info:
                    c.infer("mlp", [grpc_x(x)])
                return "bad", info.value.status(), info.value.message()
            x = np.full((2, 8), k, np.float32)
            y = c.infer("mlp", [grpc_x(x)]).as_numpy("y")
            mlp.check(x, y)
            return "good", None, None
        finally:
            c.close()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(24)))
    assert sum(r[0] == "good" for r in results) == 16
    bad = [r for r in results if r[0] == "bad"]
    assert len(bad) == 8 and all(r[1] == "StatusCode.INVALID_ARGUMENT" and "[2, 9]" in r[2] for r in bad), bad
    c = httpclient.InferenceServerClient(server.http)
    with pytest.raises(InferenceServerException, match="not loaded"):
        c.infer("nope", [http_x(np.ones((1, 8), np.float32), True)])
    c.close()


def test_shared_memory_regions_are_known_to_every_frontend(fe_server, repo):
    server, _, _ = fe_server
    _, mlp = repo
    x = np.random.default_rng(9).standard_normal((4, 8)).astype(np.float32)
    obj = shared_memory.SharedMemory(f"kiln-fe-test-{os.getpid()}", create=True, size=x.nbytes + 4 * 4 * 4)
    try:
        np.ndarray(x.shape, x.dtype, buffer=obj.buf)[...] = x
        c = httpclient.InferenceServerClient(server.http)
        c.register_system_shared_memory("io", "/" + obj.name, obj.size)
        c.close()
        for k in range(8):                      # new connections, through either process
            c = grpcclient.InferenceServerClient(server.grpc) if k % 2 else httpclient.InferenceServerClient(server.http)
            tc = grpcclient if k % 2 else httpclient
            status = c.get_system_shared_memory_status(as_json=True) if k % 2 else c.get_system_shared_memory_status()
            assert "io" in str(status), status
            i = tc.InferInput("x", [4, 8], "FP32")
            i.set_shared_memory("io", x.nbytes)
            o = tc.InferRequestedOutput("y")
            o.set_shared_memory("io", 4 * 4 * 4, offset=x.nbytes)
            np.ndarray(4 * 4, np.float32, buffer=obj.buf, offset=x.nbytes)[...] = np.nan
            c.infer("mlp", [i], outputs=[o])
            mlp.check(x, np.ndarray((4, 4), np.float32, buffer=obj.buf, offset=x.nbytes).copy())
            c.close()
        c = httpclient.InferenceServerClient(server.http)
        c.unregister_system_shared_memory("io")
        c.close()
        for _ in range(4):
            c = grpcclient.InferenceServerClient(server.grpc)
            assert "io" not in str(c.get_system_shared_memory_status(as_json=True))
            c.close()
    finally:
        obj.close()
        obj.unlink()


def test_unload_and_load_are_seen_by_every_frontend(fe_server, repo):
    server, _, _ = fe_server
    c = httpclient.InferenceServerClient(server.http)
    c.unload_model("scale")
    c.close()
    for k in range(6):
        c = grpcclient.InferenceServerClient(server.grpc) if k % 2 else httpclient.InferenceServerClient(server.http)
        assert not c.is_model_ready("scale") and c.is_model_ready("mlp")
        c.close()
    c = httpclient.InferenceServerClient(server.http)
    rows = {r["name"]: r["state"] for r in c.get_model_repository_index()}
    assert rows == {"mlp": "READY", "scale": "UNAVAILABLE"}
    c.load_model("scale")
    c.close()
    for k in range(6):
        c = grpcclient.InferenceServerClient(server.grpc) if k % 2 else httpclient.InferenceServerClient(server.http)
        assert c.is_model_ready("scale")
        c.close()


def test_many_concurrent_requests_and_timed_out_ones_each_get_their_own_answer(fe_server, repo):
    """Requests from 16 clients at once share frames between a front end and the engine process; each answer is
    its own request's. gRPC calls that time out (client deadline 1 ms, server queue delay 20 ms) free their slots:
    more of them than a front end has slots, then every request still answered."""
    from kiln.serve import ipc
    server, _, _ = fe_server
    _, mlp = repo

    def one(k: int) -> int:
        rng = np.random.default_rng(100 + k)
        grpc_c = grpcclient.InferenceServerClient(server.grpc)
        http_c = httpclient.InferenceServerClient(server.http)
        try:
            for i in range(6):
                x = rng.standard_normal((1 + (k + i) % 4, 8)).astype(np.float32)
                if (k + i) % 2:
                    y = grpc_c.infer("mlp", [grpc_x(x)]).as_numpy("y")
                else:
                    y = http_c.infer("mlp", [http_x(x, True)],
                                     outputs=[httpclient.InferRequestedOutput("y", binary_data=True)]).as_numpy("y")
                mlp.check(x, y)
            return 6
        finally:
            grpc_c.close()
            http_c.close()

    def late(k: int) -> str:
        c = grpcclient.InferenceServerClient(server.grpc)
        try:
            c.infer("mlp", [grpc_x(np.ones((1, 8), np.float32))], client_timeout=0.001)
            return "answered"
        except InferenceServerException as exc:
            return str(exc.status())
        finally:
            c.close()

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(one, range(16))) == 96
        outcomes = list(pool.map(late, range(ipc.SLOTS + 16)))
        assert set(outcomes) <= {"StatusCode.DEADLINE_EXCEEDED", "answered"}, set(outcomes)
        assert sum(pool.map(one, range(16))) == 96
    import urllib.request
    metrics = urllib.request.urlopen(f"http://{server.http}/metrics", timeout=30).read().decode()
    assert 'kiln_queue_depth{model="mlp"} 0' in metrics


def test_ctrl_c_stops_every_process_and_leaves_no_shared_memory(fe_server):
    server, kids, before = fe_server
    assert server.stop() == 0, server.stderr()[-2000:]
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{k}").exists() for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{k}").exists() for k in kids)
    # (test_serve_shm's own regions, "kiln-test-*", may come and go meanwhile in a parallel worker)
    assert not {n for n in shm_names() - before if "kiln" in n and not n.startswith("kiln-test-")}
    assert "Traceback" not in server.stderr()


def test_a_frontend_that_dies_stops_the_server_with_one_line(repo):
    server = ServerProcess(repo[0], "--frontends", "2", "--grpc-port", "off")
    try:
        kids = children(server.proc.pid)
        os.kill(kids[1], signal.SIGKILL)
        code = server.proc.wait(60)
    finally:
        server.stop()
    err = server.stderr()
    assert code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if "Front end 1" in line]
    assert len(lines) == 1 and f"pid {kids[1]}" in lines[0] and "stopped" in lines[0], err[-2000:]
    assert "Traceback" not in err
    time.sleep(0.5)
    assert not Path(f"/proc/{kids[0]}").exists()


def test_tensors_larger_than_a_slot_travel_in_the_message(tmp_path):
    """out = 2x for x [N, 80000] float32: 8 rows are 2.56 MB, more than a slab slot, both ways."""
    import onnx
    from _serve import build
    from onnx import TensorProto, helper, numpy_helper

    from kiln.serve import ipc
    g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["out"])], "wide",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 80000])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 80000])],
                          initializer=[numpy_helper.from_array(np.array(2, np.float32), "two")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "wide.onnx"))
    folder = tmp_path / "models"
    folder.mkdir()
    build(tmp_path / "wide.onnx", folder / "wide.kiln", {"x": ((1, 80000), (4, 80000), (8, 80000))})
    server = ServerProcess(folder, "--frontends", "2")
    try:
        x = np.random.default_rng(3).standard_normal((8, 80000)).astype(np.float32)
        assert x.nbytes > ipc.SLOT_BYTES
        for k in range(4):
            if k % 2:
                c = grpcclient.InferenceServerClient(server.grpc)
                got = c.infer("wide", [grpc_x(x)]).as_numpy("out")
            else:
                c = httpclient.InferenceServerClient(server.http)
                got = c.infer("wide", [http_x(x, True)],
                              outputs=[httpclient.InferRequestedOutput("out", binary_data=True)]).as_numpy("out")
            c.close()
            np.testing.assert_array_equal(got, 2 * x)                 # doubling is exact in float32
            small = x[:1]
            c = grpcclient.InferenceServerClient(server.grpc)
            np.testing.assert_array_equal(c.infer("wide", [grpc_x(small)]).as_numpy("out"), 2 * small)
            c.close()
    finally:
        assert server.stop() == 0, server.stderr()[-2000:]
