"""The system shared-memory extension driven by tritonclient (HTTP and gRPC) against `kiln serve`.

Inputs and outputs live in POSIX shared-memory objects that the test makes with the standard library
(``multiprocessing.shared_memory``: shm_open, as tritonclient.utils.shared_memory does; that module needs
setuptools' pkg_resources, which setuptools 81+ no longer has). Answers are checked against the float64
reference and against the same request sent in the body.
"""
from __future__ import annotations

import os
import uuid
from multiprocessing import shared_memory

import numpy as np
import pytest

from _serve import triton_client  # noqa: E402
httpclient = triton_client("tritonclient.http")
grpcclient = triton_client("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

if not os.path.isdir("/dev/shm"):
    pytest.skip("needs POSIX shared memory (/dev/shm)", allow_module_level=True)


@pytest.fixture(scope="module")
def http(server):
    c = httpclient.InferenceServerClient(server.http, concurrency=8)
    yield c
    c.unregister_system_shared_memory()
    c.close()


@pytest.fixture(scope="module")
def grpc_(server):
    c = grpcclient.InferenceServerClient(server.grpc)
    yield c
    c.close()


class Objects:
    """Shared-memory objects made for one test, destroyed after it (each key unique to this run)."""

    def __init__(self) -> None:
        self.handles: dict[str, shared_memory.SharedMemory] = {}

    def make(self, name: str, nbytes: int) -> tuple[str, shared_memory.SharedMemory]:
        obj = shared_memory.SharedMemory(f"kiln-test-{uuid.uuid4().hex[:12]}-{name}", create=True, size=nbytes)
        self.handles["/" + obj.name] = obj
        return "/" + obj.name, obj

    def destroy(self, key: str) -> None:
        obj = self.handles.pop(key)
        obj.close()
        obj.unlink()


def put(obj: shared_memory.SharedMemory, x: np.ndarray, offset: int = 0) -> None:
    np.ndarray(x.shape, x.dtype, buffer=obj.buf, offset=offset)[...] = x


def get(obj: shared_memory.SharedMemory, shape: list[int], offset: int = 0) -> np.ndarray:
    return np.ndarray(shape, np.float32, buffer=obj.buf, offset=offset).copy()


@pytest.fixture
def objects():
    made = Objects()
    yield made
    for key in list(made.handles):
        made.destroy(key)


@pytest.fixture(scope="module")
def mlp_context(repo):
    """An execution context of the served mlp.kiln, in this process."""
    import kiln
    return kiln.load(str(repo[0] / "mlp.kiln")).context()


def _in(module, name: str, x: np.ndarray, region: str, offset: int = 0, nbytes: int | None = None):
    i = module.InferInput(name, list(x.shape), {np.float32: "FP32", np.int64: "INT64"}[x.dtype.type])
    i.set_shared_memory(region, x.nbytes if nbytes is None else nbytes, offset)
    return i


def _out(module, name: str, region: str, nbytes: int, offset: int = 0):
    o = module.InferRequestedOutput(name)
    o.set_shared_memory(region, nbytes, offset)
    return o


def _error(call) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    msg = info.value.message()
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_register_infer_status_unregister(protocol, http, grpc_, repo, objects, mlp_context):
    client, module = (http, httpclient) if protocol == "http" else (grpc_, grpcclient)
    x = np.random.default_rng(31).standard_normal((3, 8)).astype(np.float32)
    in_key, in_handle = objects.make("in", 256)
    out_key, out_handle = objects.make("out", 128)
    put(in_handle, x, 64)
    client.register_system_shared_memory(f"{protocol}-in", in_key, 192, offset=64)
    client.register_system_shared_memory(f"{protocol}-out", out_key, 128)
    try:
        r = client.infer("mlp", [_in(module, "x", x, f"{protocol}-in")],
                         outputs=[_out(module, "y", f"{protocol}-out", 64, offset=16)])
        y = get(out_handle, [3, 4], offset=16)
        repo[1].check(x, y)
        plain = client.infer("mlp", [module.InferInput("x", [3, 8], "FP32").set_data_from_numpy(x)])
        np.testing.assert_array_equal(y, plain.as_numpy("y"))         # the same engine run as the body path
        np.testing.assert_array_equal(y, mlp_context.run({"x": x})["y"])   # and as the engine run here
        out = r.get_output("y")
        shape = out["shape"] if protocol == "http" else list(out.shape)
        assert shape == [3, 4]
        if protocol == "http":
            assert "data" not in out and out["parameters"]["shared_memory_region"] == "http-out"
            rows = client.get_system_shared_memory_status()
            by_name = {row["name"]: row for row in rows}
        else:
            assert r.get_response().raw_output_contents == [b""]
            by_name = client.get_system_shared_memory_status(as_json=True)["regions"]
        assert by_name[f"{protocol}-in"]["key"] == in_key
        assert int(by_name[f"{protocol}-in"]["offset"]) == 64 and int(by_name[f"{protocol}-in"]["byte_size"]) == 192
        assert int(by_name[f"{protocol}-out"]["byte_size"]) == 128
    finally:
        client.unregister_system_shared_memory(f"{protocol}-in")
    msg = _error(lambda: client.infer("mlp", [_in(module, "x", x, f"{protocol}-in")]))
    assert f"No shared-memory region named '{protocol}-in'" in msg
    client.unregister_system_shared_memory()
    status = client.get_system_shared_memory_status()
    assert (status if protocol == "http" else client.get_system_shared_memory_status(as_json=True).get("regions",
                                                                                                      {})) in ([], {})


def test_mixed_inputs_over_grpc(grpc_, objects):
    """One input in shared memory, one in raw_input_contents: the raw entries belong to the others, in order."""
    rng = np.random.default_rng(32)
    x = rng.standard_normal((2, 5)).astype(np.float32)
    k = rng.integers(-3, 4, (2, 5))
    key, handle = objects.make("mixed", x.nbytes)
    put(handle, x)
    grpc_.register_system_shared_memory("mixed", key, x.nbytes)
    try:
        kin = grpcclient.InferInput("k", [2, 5], "INT64").set_data_from_numpy(k)
        r = grpc_.infer("scale", [_in(grpcclient, "x", x, "mixed"), kin])
        np.testing.assert_array_equal(r.as_numpy("out"), x * k.astype(np.float32))
    finally:
        grpc_.unregister_system_shared_memory("mixed")


def test_concurrent_requests_batch_from_shared_memory(server, http, repo, objects):
    """Requests at different offsets of one region merge into batches; each answer lands in its own slot."""
    rng = np.random.default_rng(33)
    xs = [rng.standard_normal((1 + i % 3, 8)).astype(np.float32) for i in range(12)]
    in_key, in_handle = objects.make("bin", 12 * 3 * 32)
    out_key, out_handle = objects.make("bout", 12 * 3 * 16)
    for i, x in enumerate(xs):
        put(in_handle, x, i * 96)
    http.register_system_shared_memory("bin", in_key, 12 * 96)
    http.register_system_shared_memory("bout", out_key, 12 * 48)
    before = _batches(http, server)
    try:
        pending = [http.async_infer("mlp", [_in(httpclient, "x", x, "bin", offset=i * 96)],
                                    outputs=[_out(httpclient, "y", "bout", 48, offset=i * 48)])
                   for i, x in enumerate(xs)]
        for p in pending:
            p.get_result()
        for i, x in enumerate(xs):
            repo[1].check(x, get(out_handle, [len(x), 4], offset=i * 48))
    finally:
        http.unregister_system_shared_memory()
    after = _batches(http, server)
    assert after[1] - before[1] < after[0] - before[0], (before, after)   # fewer batches than requests: merged


def _batches(http, server) -> tuple[float, float]:
    """(requests, batches) the mlp model has seen, from /metrics."""
    import http.client as hc
    host, port = server.http.rsplit(":", 1)
    conn = hc.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    req = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith('kiln_requests_total{model="mlp"'))
    batches = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith('kiln_batch_size_count{model="mlp"'))
    return req, batches


@pytest.mark.parametrize("key, words", [
    ("/a/b", "not one POSIX shared-memory object name"),
    ("/..", "not one POSIX shared-memory object name"),
    ("/x\0y", "not one POSIX shared-memory object name"),
    ("", "is the name of a POSIX shared-memory object"),
    ("/kiln-test-no-such-object", "Cannot open shared-memory object"),
])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_keys_are_refused(http, grpc_, protocol, key, words):
    client = http if protocol == "http" else grpc_
    msg = _error(lambda: client.register_system_shared_memory("bad", key, 16))
    assert words in msg, msg


def test_register_checks_size_and_names(http, grpc_, objects):
    key, _ = objects.make("small", 64)
    assert "which has 64" in _error(lambda: http.register_system_shared_memory("big", key, 64, offset=8))
    assert "which has 64" in _error(lambda: grpc_.register_system_shared_memory("big", key, 65))
    http.register_system_shared_memory("small", key, 64)
    try:
        assert "already registered" in _error(lambda: grpc_.register_system_shared_memory("small", key, 8))
        assert "No shared-memory region named 'nope'" in _error(lambda: http.get_system_shared_memory_status("nope"))
    finally:
        http.unregister_system_shared_memory("small")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_tensor_placements(protocol, http, grpc_, repo, objects):
    client, module = (http, httpclient) if protocol == "http" else (grpc_, grpcclient)
    x = np.ones((2, 8), np.float32)
    key, handle = objects.make("place", 128)
    put(handle, x)
    client.register_system_shared_memory("place", key, 128)
    try:
        msg = _error(lambda: client.infer("mlp", [_in(module, "x", x, "place", nbytes=60)]))
        assert "is 64 bytes, but its shared_memory_byte_size is 60" in msg
        msg = _error(lambda: client.infer("mlp", [_in(module, "x", x, "place", offset=96)]))
        assert "lie outside shared-memory region 'place'" in msg
        msg = _error(lambda: client.infer("mlp", [_in(module, "x", x, "place")], outputs=[_out(module, "y", "place", 16)]))
        assert "takes 32 bytes, but its shared-memory byte size is 16" in msg
        msg = _error(lambda: client.infer("mlp", [_in(module, "x", x, "nowhere")]))
        assert "No shared-memory region named 'nowhere'" in msg
    finally:
        client.unregister_system_shared_memory("place")
    x1 = np.full((1, 8), 0.5, np.float32)                  # the server answers as before
    repo[1].check(x1, client.infer("mlp", [module.InferInput("x", [1, 8], "FP32").set_data_from_numpy(x1)])
                  .as_numpy("y"))


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_object_deleted_or_shrunk_after_registering(how, http, grpc_, repo, objects):
    """A client that unlinks its object, or shrinks it (which would SIGBUS a server reading a mapping), gets a
    clean error; the server keeps serving."""
    x = np.ones((2, 8), np.float32)
    key, handle = objects.make("gone", 4096)
    put(handle, x)
    http.register_system_shared_memory("gone", key, 4096)
    try:
        if how == "deleted":
            objects.destroy(key)
        else:
            os.truncate(f"/dev/shm/{key[1:]}", 0)
        for client, module in ((http, httpclient), (grpc_, grpcclient)):
            msg = _error(lambda: client.infer("mlp", [_in(module, "x", x, "gone")]))
            assert ("was deleted" in msg) if how == "deleted" else ("which has 0" in msg), msg
    finally:
        http.unregister_system_shared_memory("gone")
    assert http.is_server_live() and http.is_server_ready()
    repo[1].check(x, http.infer("mlp", [httpclient.InferInput("x", [2, 8], "FP32").set_data_from_numpy(x)])
                  .as_numpy("y"))


def test_extension_is_advertised(http, grpc_):
    assert "system_shared_memory" in http.get_server_metadata()["extensions"]
    assert "system_shared_memory" in grpc_.get_server_metadata(as_json=True)["extensions"]

