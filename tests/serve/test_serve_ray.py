"""kiln.serve.ray on a local Ray cluster: two CPU replicas behind Ray Serve's proxy, v2 JSON and binary."""
from __future__ import annotations

import http.client
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="needs Ray Serve: pip install 'kiln[ray]' (ray[serve])")
serve = pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install 'kiln[ray]' (ray[serve])")
from _serve import triton_client  # noqa: E402
httpclient = triton_client("tritonclient.http")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_app(repo):
    from kiln.serve.model import ModelOptions
    from kiln.serve.ray import deployment
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(str(repo[0] / "mlp.kiln"), num_replicas=2, ray_actor_options={"num_cpus": 0},
                         options=ModelOptions(max_queue_delay_us=2000))
        serve.run(app, route_prefix="/", name="kiln-test")
        yield f"127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(at: str, x: np.ndarray) -> tuple[int, dict, str]:
    host, port = at.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.reshape(-1).tolist()}]})
    conn.request("POST", "/v2/models/mlp/infer", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, json.loads(r.read()), r.getheader("X-Kiln-Replica")
    conn.close()
    return out


def test_two_replicas_answer_v2_requests(ray_app, repo):
    mlp = repo[1]
    rng = np.random.default_rng(31)
    xs = [rng.standard_normal((1 + i % 3, 8)).astype(np.float32) for i in range(60)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda x: _post(ray_app, x), xs))
    replicas = set()
    for x, (status, body, replica) in zip(xs, answers):
        assert status == 200, body
        out = body["outputs"][0]
        assert out["name"] == "y" and out["shape"] == [x.shape[0], 4]
        mlp.check(x, np.asarray(out["data"], np.float32).reshape(out["shape"]))
        replicas.add(replica)
    assert len(replicas) == 2, replicas                   # both replicas served


def test_tritonclient_binary_tensors_and_errors(ray_app, repo):
    c = httpclient.InferenceServerClient(ray_app)
    assert c.is_server_live() and c.is_model_ready("mlp")
    assert c.get_model_metadata("mlp")["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]
    x = np.random.default_rng(32).standard_normal((4, 8)).astype(np.float32)
    i = httpclient.InferInput("x", [4, 8], "FP32")
    i.set_data_from_numpy(x, binary_data=True)
    r = c.infer("mlp", [i], outputs=[httpclient.InferRequestedOutput("y", binary_data=True)])
    repo[1].check(x, r.as_numpy("y"))
    bad = httpclient.InferInput("x", [4, 7], "FP32")
    bad.set_data_from_numpy(x[:, :7].copy())
    from tritonclient.utils import InferenceServerException
    with pytest.raises(InferenceServerException, match="must have shape"):
        c.infer("mlp", [bad])
    with pytest.raises(InferenceServerException, match="not served here"):
        c.infer("other", [i])
    c.close()
