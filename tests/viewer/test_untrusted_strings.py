"""Strings from a model file reach the page as text, whatever they hold (issue 15).

Invalid UTF-8 in ONNX names (protobuf hands such fields over as ``bytes``) is shown with
``\\x`` escapes instead of breaking the JSON; names that would end or re-mode the inline
``<script>`` of an exported HTML file (``</script>``, ``<!--<script>``, U+2028) leave the page
drawing the graph.
"""
from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper
from viewer_testing import get, wait_ready

from kiln.viewer import command, page as pagemod, serve, view
from kiln.viewer.formats import open_model

HOSTILE = ["<!--<script>", "</script>", "a\u2028b\u2029c", "--><!--", "<script>window.pwned=1</script>", "&lt;&amp;"]


def _bad_utf8_model(path) -> None:
    """Relu -> Neg, with a node name, an op type, a tensor name and the graph name patched to invalid UTF-8."""
    nodes = [helper.make_node("Relu", ["x"], ["TENSORxx"], name="/blk/NODExx"),
             helper.make_node("Neg", ["TENSORxx"], ["y"], name="n2"),
             helper.make_node("OPTYPExx", ["y"], ["z"], name="custom", domain="my.domain")]
    g = helper.make_graph(nodes, "GRAPHxx", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])
    data = m.SerializeToString()
    for word in (b"TENSORxx", b"NODExx", b"OPTYPExx", b"GRAPHxx"):
        data = data.replace(word, word[:-2] + b"\xff\xfe")
    path.write_bytes(data)


def test_onnx_hands_invalid_utf8_over_as_bytes(tmp_path):
    """The premise of the tests below: this is what the viewer's reader receives."""
    _bad_utf8_model(tmp_path / "bad.onnx")
    m = onnx.load(str(tmp_path / "bad.onnx"), load_external_data=False)
    assert m.graph.node[0].name == b"/blk/NODE\xff\xfe" and isinstance(m.graph.node[2].op_type, bytes)


def test_invalid_utf8_names_are_shown_escaped(tmp_path):
    _bad_utf8_model(tmp_path / "bad.onnx")
    model = open_model(tmp_path / "bad.onnx")
    g = model.graph
    assert [n.name for n in g.nodes] == ["/blk/NODE\\xff\\xfe", "n2", "custom"]
    assert g.nodes[2].op_type == "OPTYPE\\xff\\xfe" and g.name == "GRAPH\\xff\\xfe"
    assert g.nodes[0].group == ("blk",)
    assert g.nodes[0].outputs[0].values == g.nodes[1].inputs[0].values == ["TENSOR\\xff\\xfe"]   # still joined


def test_invalid_utf8_names_export_and_serve(tmp_path, capsys):
    _bad_utf8_model(tmp_path / "bad.onnx")
    assert command.main(["view", str(tmp_path / "bad.onnx"), "--export", str(tmp_path / "bad.html")]) == 0
    assert capsys.readouterr().err == ""
    html = (tmp_path / "bad.html").read_text(encoding="utf-8")
    assert "NODE\\\\xff\\\\xfe" in html                 # the escape itself, JSON-encoded
    server = serve(tmp_path / "bad.onnx", open_browser=False)
    try:
        status, _, body = get(server, "/api/model")
        assert status == 200
        names = {n["name"] for n in json.loads(body)["panes"][0]["nodes"]}
        assert "/blk/NODE\\xff\\xfe" in names
        status, _, body = get(server, "/api/weight?pane=0&index=0")
        assert status == 404                               # no weights: a clean 404, not a 500
    finally:
        server.stop()


def test_embedded_json_has_no_markup_characters():
    page = {"names": HOSTILE, "nested": {"</script>": ["<!--", "-->"]}, "raw": b"\xff<"}
    text = pagemod.dumps(page)
    assert not any(c in text for c in "<>&\u2028\u2029")
    assert json.loads(text) == {"names": HOSTILE, "nested": {"</script>": ["<!--", "-->"]}, "raw": "\\xff<"}


def _hostile_model(path) -> None:
    """A chain x -> n0 -> n1 -> ... -> y whose node names, op types and tensor names are the hostile strings."""
    nodes, prev = [], "x"
    for i, s in enumerate(HOSTILE):
        out = "y" if i == len(HOSTILE) - 1 else f"{s}:{i}"
        nodes.append(helper.make_node("Relu" if i % 2 else "Neg", [prev], [out], name=s, doc_string=s))
        prev = out
    g = helper.make_graph(nodes, "<!--<script>", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, producer_name="</script><!--<script>")
    onnx.save(m, path)


@pytest.mark.browser
def test_script_breaking_names_still_draw_in_the_browser(page, tmp_path):
    _hostile_model(tmp_path / "hostile.onnx")
    out = view(tmp_path / "hostile.onnx", export=tmp_path / "hostile.html")
    page.goto(out.as_uri())
    wait_ready(page)
    assert page.errors == [] and page.evaluate("window.pwned") is None
    assert page.evaluate("!!window.kilnApp && kilnApp.ready") is True
    page.evaluate("kilnApp.panes[0].view.fit(); kilnApp.panes[0].view.renderNow()")
    assert page.locator(".kg .nodes .node").count() == len(HOSTILE) + 2          # the nodes, the input, the output
    assert page.evaluate("kilnApp.panes[0].pane.nodes.filter(n => !n.pseudo).map(n => n.name)") == HOSTILE
    page.click("#b-model")
    assert "</script><!--<script>" in page.inner_text("#side-body")


def test_page_json_holds_non_finite_numbers_and_lone_surrogates():
    """NaN/Infinity (JSON has none) and lone surrogates (a file's invalid \\u escape) still make a page."""
    text = pagemod.dumps({"a": float("nan"), "b": [float("inf"), -float("inf")], "c": "x\udcffy</script>", "d": 1.5})
    text.encode("utf-8")
    assert json.loads(text) == {"a": "NaN", "b": ["Infinity", "-Infinity"], "c": "x\udcffy</script>", "d": 1.5}


def test_engine_with_lone_surrogate_and_nan_exports(tmp_path, capsys):
    """A Kiln engine header is JSON: a name with a lone surrogate and a NaN value export as HTML."""
    import numpy as np

    import kiln
    from kiln.engine.format import read_engine, write_engine
    net = kiln.Network("s")
    x = net.add_input("x", "float32", (1, 4))
    net.mark_output(net.add_activation(x, "relu").output, "y")
    path = tmp_path / "e.kiln"
    kiln.build(net, kiln.BuildConfig(device="cpu")).save(str(path))
    header, weights = read_engine(str(path))
    header["name"] = "bad\udcffname"
    header.setdefault("build", {})["note"] = float("nan")
    write_engine(str(path), {k: v for k, v in header.items() if k != "weights"},
                 {k: np.array(v) for k, v in weights.items()})
    out = tmp_path / "e.html"
    assert command.main(["view", str(path), "--export", str(out)]) == 0, capsys.readouterr().err
    html = out.read_text(encoding="utf-8")
    assert "bad\\udcffname" in html
