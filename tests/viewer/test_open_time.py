"""`kiln view small.onnx`: the page is drawn from the file's own shapes before onnx is imported (the server
process never imports onnx, ml_dtypes or torch: shape inference runs in a child process), then the inferred
shapes fill in; the served document and the long poll that delivers the final one."""
from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from viewer_testing import get, wait_ready

from kiln.viewer import serve
from kiln.viewer.server import _LONG_POLL_S, Document, Source

HEAVY = ("onnx", "ml_dtypes", "torch")


def small_model(path, nodes: int = 20) -> None:
    """A chain of ``nodes`` Conv/Relu/Add nodes whose intermediate shapes only shape inference knows."""
    inits, graph_nodes, prev = [], [], "x"
    for i in range(nodes):
        out = "y" if i == nodes - 1 else f"t{i}"
        kind = ("Conv", "Relu", "Add")[i % 3]
        if kind == "Conv":
            inits.append(numpy_helper.from_array(np.full((4, 4, 3, 3), 0.01, np.float32), f"w{i}"))
            graph_nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [out], name=f"/b{i // 3}/Conv",
                                                pads=[1, 1, 1, 1]))
        elif kind == "Relu":
            graph_nodes.append(helper.make_node("Relu", [prev], [out], name=f"/b{i // 3}/Relu"))
        else:
            graph_nodes.append(helper.make_node("Add", [prev, prev], [out], name=f"/b{i // 3}/Add"))
        prev = out
    g = helper.make_graph(graph_nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def _imported(importtime_stderr: str) -> set[str]:
    """Top-level packages named in ``python -X importtime`` output."""
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)\s*$", importtime_stderr, re.M)
    assert names, "no -X importtime output"
    return {n.split(".")[0] for n in names}


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)


@pytest.mark.browser
def test_kiln_view_draws_a_small_model_before_importing_onnx(page, tmp_path):
    small_model(tmp_path / "small.onnx")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "kiln.cli", "view", str(tmp_path / "small.onnx"),
                             "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: queue.Queue = queue.Queue()
    reading = threading.Thread(target=_lines, args=(proc.stderr, err), daemon=True)
    reading.start()
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        assert url, line
        served = time.perf_counter() - start
        page.goto(url.group(1))
        page.wait_for_selector(".kg .nodes .node", state="attached", timeout=60_000)
        drawn = time.perf_counter() - start
        wait_ready(page, 60_000)
        done = time.perf_counter() - start
        assert page.errors == []
        tensors = {t[0]: t[1] for t in page.evaluate("kilnApp.panes[0].pane.tensors")}
        assert tensors["t0"] == "1×4×8×8" and tensors["t18"] == "1×4×8×8"       # inferred, not in the file
        assert page.evaluate("kilnApp.panes[0].pane.nodes.find((n) => n.op === 'Conv').in.map((a) => a[0])") == ["X", "W"]
        labels = page.evaluate("Array.from(document.querySelectorAll('.kg .edges text'), (t) => t.textContent)")
        assert "1×4×8×8" in labels
    finally:
        proc.terminate()
        proc.wait(10)
    reading.join(10)
    stderr = "".join(err.queue)
    assert not _imported(stderr) & set(HEAVY)                   # the server process never imports them
    print(f"\nkiln view small.onnx: URL printed after {served:.2f} s, nodes drawn after {drawn:.2f} s, "
          f"inferred shapes shown after {done:.2f} s")


def test_served_document_is_completed_in_the_background(yolo_path):
    server = serve(yolo_path, open_browser=False)
    try:
        first = json.loads(get(server, "/api/model")[2])
        conv_out = "/model.0/conv/Conv_output_0"
        final = first
        for _ in range(60):
            if not final["pending"]:
                break
            # a long poll: the server answers within its own limit (_LONG_POLL_S), so the client waits longer
            status, _, body = get(server, f"/api/model?after={final['revision']}", timeout=_LONG_POLL_S + 10)
            assert status == 200
            final = json.loads(body)
        assert final["pending"] is False and final["revision"] >= first["revision"]
        shapes = {t[0]: t[1] for t in final["panes"][0]["tensors"]}
        assert shapes[conv_out] == "1×16×320×320"
        if first["pending"]:                                   # the first document: the file's own shapes
            assert final["revision"] > first["revision"]
            assert {t[0]: t[1] for t in first["panes"][0]["tensors"]}[conv_out] == ""
        assert get(server, "/api/model?after=x")[0] == 404
    finally:
        server.stop()


def test_long_poll_waits_for_the_completed_document():
    release = threading.Event()

    def final() -> Document:
        release.wait(10)
        return Document(page={"panes": [], "which": "final"})

    source = Source(lambda: Document(page={"panes": [], "which": "first"}, complete=final))
    first = source.get()
    assert first.page["pending"] is True and first.page["revision"] == 1
    t0 = time.perf_counter()
    assert source.after(1, 0.2) is first and time.perf_counter() - t0 >= 0.2   # nothing newer yet: waits
    release.set()
    done = source.after(1, 10)
    assert done.page == {"panes": [], "which": "final", "revision": 2, "pending": False}
    assert source.after(2, 10) is done                         # final: answered at once


def test_a_completion_that_raises_keeps_the_first_document(capsys):
    def broken() -> Document:
        raise RuntimeError("boom")

    source = Source(lambda: Document(page={"panes": [], "which": "first"}, complete=broken))
    source.get()
    done = source.after(1, 10)
    assert done.page["which"] == "first" and done.page["pending"] is False and done.page["revision"] == 2
    assert "RuntimeError: boom" in capsys.readouterr().err
