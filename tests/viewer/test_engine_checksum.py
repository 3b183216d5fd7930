"""A Kiln engine whose weights section fails its CRC-32 opens with a warning, never with silently wrong weights."""
from __future__ import annotations

import json
import shutil
import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from viewer_testing import get, wait_ready

import kiln
from kiln.engine.format import read_prelude
from kiln.errors import ViewerError
from kiln.viewer import ViewerWarning, command, serve, view
from kiln.viewer.formats import open_model

WEIGHT = np.arange(144, dtype=np.float32).reshape(4, 4, 3, 3)


@pytest.fixture(scope="module")
def engine_path(tmp_path_factory):
    """A real engine, built on the CPU from a Conv+Relu model whose weight values are known."""
    d = tmp_path_factory.mktemp("engine")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="/block/conv/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="/block/act/Relu")]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [numpy_helper.from_array(WEIGHT, "w"), numpy_helper.from_array(np.ones(4, np.float32), "b")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), d / "tiny.onnx")
    engine = kiln.build(kiln.onnx.parse(str(d / "tiny.onnx")), kiln.BuildConfig(device="cpu"))
    engine.save(str(d / "tiny.kiln"))
    return d / "tiny.kiln"


@pytest.fixture
def corrupt(engine_path, tmp_path):
    """A copy with one bit flipped inside the stored Conv weight: header intact, weights CRC wrong."""
    bad = tmp_path / "corrupt.kiln"
    shutil.copy(engine_path, bad)
    header, w_off, w_len, crc = read_prelude(str(bad))
    data = bytearray(bad.read_bytes())
    key = header["plan"]["weights"]["w"]
    pos = w_off + header["weights"][key]["offset"] + 5 * 4          # the float holding 5.0
    data[pos + 3] ^= 0x40
    bad.write_bytes(bytes(data))
    assert zlib.crc32(bytes(data[w_off:w_off + w_len])) != crc    # the premise: only the weights CRC fails
    return bad


def test_intact_engine_shows_its_weights_without_warning(engine_path):
    model = open_model(engine_path)
    assert model.warnings == []
    by_name = model.graph.weights
    conv = next(n for n in by_name if by_name[n].shape == [4, 4, 3, 3])
    np.testing.assert_array_equal(by_name[conv].load(), WEIGHT)


def test_corrupt_weights_warn_and_show_no_values(corrupt, tmp_path):
    model = open_model(corrupt)                          # the plan is intact: the graph still opens
    assert model.graph.nodes
    assert len(model.warnings) == 1 and "checksum" in model.warnings[0] and "\n" not in model.warnings[0]
    assert "corrupt.kiln" in model.warnings[0] and "kiln build" in model.warnings[0]
    for w in model.graph.weights.values():
        with pytest.raises(ViewerError, match="checksum"):
            w.load()
    out = tmp_path / "corrupt.html"
    with pytest.warns(ViewerWarning, match="checksum"):
        view(corrupt, export=out)
    page = json.loads(_embedded(out.read_text(encoding="utf-8")))
    assert any("checksum" in w for w in page["panes"][0]["model"]["warnings"])
    assert all("checksum" in w["stats"]["error"] for w in page["panes"][0]["weights"])


def test_corrupt_weights_over_the_server(corrupt):
    with pytest.warns(ViewerWarning, match="checksum"):
        server = serve(corrupt, open_browser=False)
    try:
        status, _, body = get(server, "/api/model")
        assert status == 200 and "checksum" in json.loads(body)["panes"][0]["model"]["warnings"][0]
        status, _, body = get(server, "/api/weight.npy?pane=0&index=0")
        assert status == 422 and "checksum" in json.loads(body)["error"]
    finally:
        server.stop()


def test_kiln_view_prints_one_warning_line(corrupt, tmp_path, capsys):
    assert command.main(["view", str(corrupt), "--export", str(tmp_path / "out.svg")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kiln: warning: The weights of 'corrupt.kiln' fail their checksum")


@pytest.mark.browser
def test_banner_in_the_page(page, corrupt, tmp_path):
    with pytest.warns(ViewerWarning):
        out = view(corrupt, export=tmp_path / "corrupt.html")
    page.goto(out.as_uri())
    wait_ready(page)
    assert page.errors == [] and page.locator(".kg .nodes .node").count() > 0
    banner = page.locator("#warnings")
    assert banner.is_visible() and "fail their checksum" in banner.inner_text()
    banner.locator("button").click()
    assert not banner.is_visible()


def _embedded(html: str) -> str:
    start = html.index('<script id="kiln-data" type="application/json">') + len(
        '<script id="kiln-data" type="application/json">')
    return html[start:html.index("</script>", start)]
