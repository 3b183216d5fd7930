"""The local server: only the page, its assets and the opened model's data; 127.0.0.1; no traversal."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from viewer_testing import get

from kiln.errors import ViewerError
from kiln.viewer import serve
from kiln.viewer.export import STATIC


@pytest.fixture(scope="module")
def server(yolo_path):
    s = serve(yolo_path, open_browser=False)
    yield s
    s.stop()


def test_binds_loopback_on_a_free_port(server):
    host, port = server.server_address[:2]
    assert host == "127.0.0.1" and port > 0
    assert server.url == f"http://127.0.0.1:{port}/"


def test_serves_page_assets_and_model(server):
    status, headers, body = get(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b'id="kiln-data"' in body
    for name in STATIC:
        status, headers, body = get(server, f"/static/{name}")
        assert status == 200 and body and headers["Cache-Control"] == "no-store"
    status, headers, body = get(server, "/api/model")
    page = json.loads(body)
    assert status == 200 and page["server"] is True
    nodes = page["panes"][0]["nodes"]
    assert any(n["name"] == "/model.24/m.0/Conv" for n in nodes)


def test_weight_stats_and_npy_download(server):
    page = json.loads(get(server, "/api/model")[2])
    weights = page["panes"][0]["weights"]
    wi = next(i for i, w in enumerate(weights) if w["name"] == "model.0.conv.weight")
    status, _, body = get(server, f"/api/weight?pane=0&index={wi}")
    stats = json.loads(body)
    assert status == 200 and stats["min"] < stats["mean"] < stats["max"] and stats["std"] > 0
    assert "[[[[" in stats["preview"]
    status, headers, body = get(server, f"/api/weight.npy?pane=0&index={wi}")
    assert status == 200 and "attachment" in headers["Content-Disposition"]
    arr = np.load(io.BytesIO(body), allow_pickle=False)
    assert arr.shape == (16, 3, 6, 6) and arr.dtype == np.float32
    for bad in ("index=99999", "index=-1", "index=abc", "pane=7&index=0"):
        assert get(server, f"/api/weight?{bad}")[0] == 404


@pytest.mark.parametrize("path", [
    "/../etc/passwd", "/static/../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd",
    "/etc/passwd", "/static/../server.py", "/static/graph.css/../../__init__.py", "/static/", "/static",
    "/static/index.html/..", "/yolo.onnx", "/api/../static/app.js/../../../../etc/passwd", "/%2fetc%2fpasswd",
    "/static/..%2f..%2fserver.py", "/api/model/../../etc/passwd", "http://127.0.0.1/etc/passwd",
    "/api/weight.npy/../../../../etc/passwd",
])
def test_anything_else_is_not_found(server, path):
    status, _, body = get(server, path)
    assert status in (400, 403, 404)
    assert b"root:" not in body and b"import" not in body


def test_opened_file_itself_is_not_served(server, yolo_path):
    assert get(server, "/" + str(yolo_path).lstrip("/"))[0] == 404
    assert get(server, str(yolo_path))[0] == 404


def test_foreign_host_header_is_refused(server):
    assert get(server, "/api/model", host="evil.example:80")[0] == 403
    port = server.server_address[1]
    assert get(server, "/api/model", host=f"localhost:{port}")[0] == 200


def test_only_get_and_head(server):
    assert get(server, "/api/model", method="POST")[0] == 405
    assert get(server, "/", method="HEAD")[0] == 200


def test_unreadable_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07" + b"\xff" * 64)
    with pytest.raises(ViewerError) as info:
        serve(bad, open_browser=False)
    assert "bad.onnx" in str(info.value)


def test_model_that_breaks_on_disk_gives_an_error_page_not_a_traceback(tmp_path, yolo_path):
    path = tmp_path / "model.onnx"
    shutil.copy(yolo_path, path)
    s = serve(path, open_browser=False)
    try:
        assert "panes" in json.loads(get(s, "/api/model")[2])
        path.write_bytes(b"this is no longer a model")
        status, _, body = get(s, "/api/model")
        err = json.loads(body)
        assert status == 200 and "model.onnx" in err["error"] and "Traceback" not in err["error"]
        assert get(s, "/")[0] == 200                     # the page loads and shows the error
    finally:
        s.stop()


def test_clusters_are_laid_out_on_request(big_path):
    s = serve(big_path, open_browser=False)
    try:
        page = json.loads(get(s, "/api/model")[2])
        clusters = page["panes"][0]["clusters"]
        missing = [i for i, c in enumerate(clusters) if c["s"] is None]
        assert clusters[0]["s"] is not None and missing                  # only the first view is laid out
        status, _, body = get(s, f"/api/clusters?pane=0&ids={missing[0]},{missing[1]}")
        got = json.loads(body)
        assert status == 200 and set(got) == {str(missing[0]), str(missing[1])} and got[str(missing[0])]["layers"]
        for bad in ("ids=", f"ids={len(clusters)}", "ids=x", "pane=3&ids=1"):
            assert get(s, f"/api/clusters?{bad}")[0] == 404
    finally:
        s.stop()


def test_a_client_that_resets_its_connection_prints_no_traceback(server, capfd):
    import socket
    import struct
    import time
    host, port = server.server_address[:2]
    for _ in range(3):
        sock = socket.create_connection((host, port), timeout=5)
        sock.sendall(b"GET / HTT")                                    # half a request line, then a reset
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    time.sleep(0.5)
    assert get(server, "/")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ConnectionResetError" not in err
