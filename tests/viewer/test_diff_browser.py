"""The diff page in headless Chromium: two torch exports with one layer changed, an ONNX model beside its FP16
engine, two opset versions of one model; status colours, group roll-up, next/previous change by button and key,
before/after in the sidebar, the change list, and headless export of the same picture."""
from __future__ import annotations

import copy

import onnx
import pytest
from onnx import numpy_helper, version_converter
from test_diff_models import exports, export_net, fp16_engine  # noqa: F401  (module fixtures, the same files)
from viewer_testing import settle, wait_ready

from kiln.cli import main as kiln_main
from kiln.viewer import samples, serve

pytestmark = pytest.mark.browser

AMBER, GREEN = "rgb(180, 83, 9)", "rgb(21, 128, 61)"


def open_diff(page, a, b):
    s = serve((a, b), open_browser=False)
    page.goto(s.url)
    wait_ready(page)
    page.wait_for_selector("#diff-counts", state="attached")
    assert page.errors == []
    return s


def head_fill(page, selector: str) -> str:
    return page.evaluate(f"getComputedStyle(document.querySelector({selector!r} + ' .head')).fill")


def selected(page) -> dict:
    sel = page.evaluate("kilnApp.selection")
    return page.evaluate(f"kilnApp.panes[{sel['pane']}].pane.nodes[{sel['id']}]")


def test_two_exports_one_layer_changed(page, exports):  # noqa: F811
    d, _, _ = exports
    s = open_diff(page, d / "a.onnx", d / "b.onnx")
    try:
        assert page.locator(".pane").count() == 1
        assert page.inner_text("#diff-counts").split() == ["1", "changed"]
        page.evaluate("kilnApp.panes[0].view.fit(); kilnApp.panes[0].view.renderNow()")
        assert page.locator(".kg .node.df-changed").count() == 1
        assert page.locator(".kg .node.df-unchanged").count() == len(onnx.load(d / "a.onnx").graph.node) - 1
        assert head_fill(page, ".kg .node.df-changed") == AMBER
        page.keyboard.press("n")
        settle(page)
        assert selected(page)["name"] == "/c2/Conv" and page.inner_text("#diff-pos") == "1 / 1"
        side = page.inner_text("#side-body")
        assert "attribute kernel_shape" in side and "[3, 3]" in side and "[5, 5]" in side
        assert "weight W" in side and "float 8×8×3×3" in side and "float 8×8×5×5" in side
        assert "weight B" in side and "max |a-b| " in side
        page.fill("#find", "n")                       # typing n in the search box does not navigate
        page.keyboard.press("Escape")
        page.click("#diff-list")
        assert page.locator("#side-body .diff-item").count() == 1
        page.click("#side-body .diff-item")
        settle(page)
        assert selected(page)["name"] == "/c2/Conv"
    finally:
        s.stop()


def test_groups_roll_up_and_collapsed_groups_show_it(page, tmp_path):
    a = samples.mini_yolo()
    b = copy.deepcopy(a)
    init = next(t for t in b.graph.initializer if t.name == "model.2.cv1.conv.weight")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2, init.name))
    onnx.save(a, tmp_path / "a.onnx")
    onnx.save(b, tmp_path / "b.onnx")
    s = open_diff(page, tmp_path / "a.onnx", tmp_path / "b.onnx")
    try:
        page.click("#b-collapse")
        settle(page)
        page.evaluate("kilnApp.panes[0].view.fit(); kilnApp.panes[0].view.renderNow()")
        changed = page.evaluate("Array.from(document.querySelectorAll('.kg .group.df-changed')).map(g => "
                                "kilnApp.panes[0].pane.clusters[+g.dataset.cluster].name)")
        assert changed == ["model.2"]
        assert page.locator(".kg .group.df-unchanged").count() >= 10
        stroke = page.evaluate("getComputedStyle(document.querySelector('.kg .group.df-changed .box')).stroke")
        assert stroke == AMBER
        page.keyboard.press("n")                     # navigating opens the groups around the change
        settle(page)
        assert selected(page)["name"] == "/model.2/cv1/conv/Conv"
        assert page.locator(".kg .node.df-changed.sel").count() == 1
    finally:
        s.stop()


def test_onnx_model_and_its_fp16_engine(page, exports, fp16_engine):  # noqa: F811
    d, _, _ = exports
    s = open_diff(page, d / "a.onnx", fp16_engine)
    try:
        assert page.locator(".pane").count() == 2
        counts = page.inner_text("#diff-counts")
        assert "nodes fused" in counts and "inserted" in counts
        for pi in (0, 1):
            page.evaluate(f"kilnApp.panes[{pi}].view.fit(); kilnApp.panes[{pi}].view.renderNow()")
        assert page.locator(".pane:nth-child(1) .kg .node.df-fused").count() >= 1
        assert page.locator(".pane:nth-child(1) .kg .node.df-inserted").count() >= 1
        assert page.locator(".pane:nth-child(2) .kg .node.df-fused").count() >= 2
        page.keyboard.press("n")
        settle(page)
        first = selected(page)
        assert first["df"] == "inserted" and "inserted by the build" in page.inner_text("#side-body")
        for _ in range(6):                           # to the layer /c1/Conv was fused into
            if selected(page)["name"] == "/c1/Conv":
                break
            page.click("#diff-next")
            settle(page)
        layer = selected(page)
        assert layer["name"] == "/c1/Conv" and layer["df"] == "fused"
        side = page.inner_text("#side-body")
        assert "built from" in side and "/Relu (Relu)" in side and "precision fp16" in side
        page.wait_for_timeout(400)
        linked = page.evaluate("Array.from(kilnApp.panes[1].view.marks.linked).map(i => kilnApp.panes[1].pane.nodes[i].name)")
        assert {"/c1/Conv", "/Relu"} <= set(linked)
        page.keyboard.press("p")
        settle(page)
        assert selected(page)["name"] != "/c1/Conv"
    finally:
        s.stop()


def test_two_opset_versions(page, exports, tmp_path):  # noqa: F811
    _, a, _ = exports
    export_net(a, tmp_path / "o11.onnx", opset=11)
    onnx.save(version_converter.convert_version(onnx.load(tmp_path / "o11.onnx"), 18), tmp_path / "o18.onnx")
    s = open_diff(page, tmp_path / "o11.onnx", tmp_path / "o18.onnx")
    try:
        page.evaluate("kilnApp.panes[0].view.fit(); kilnApp.panes[0].view.renderNow()")
        added = page.evaluate("Array.from(document.querySelectorAll('.kg .node.df-added')).map(g => "
                              "kilnApp.panes[0].pane.nodes[+g.dataset.node].op)")
        assert added == ["Constant"] * 3
        assert head_fill(page, ".kg .node.df-added") == GREEN
        page.click("#diff-list")
        side = page.inner_text("#side-body")
        assert "version" in side and "opset 11" in side and "opset 18" in side
        idx = page.evaluate("kilnApp.panes[0].pane.nodes.findIndex(n => n.name === '/Squeeze')")
        page.click(f".kg .node[data-node='{idx}']")
        side = page.inner_text("#side-body")
        assert "attribute axes" in side and "input axes" in side
    finally:
        s.stop()


def test_kiln_diff_exports_the_picture(exports, tmp_path, browser, capsys):  # noqa: F811
    d, _, _ = exports
    out = tmp_path / "diff.svg"
    assert kiln_main(["diff", str(d / "a.onnx"), str(d / "b.onnx"), "--export", str(out)]) == 1
    svg = out.read_text()
    nodes = len(onnx.load(d / "a.onnx").graph.node)
    assert svg.count('class="node ') == nodes + 2 and svg.count("node cat-conv df-changed") == 1
    assert svg.count(" df-unchanged") == nodes - 1
    assert ".df-changed .head" in svg                      # the colours travel with the file
    assert kiln_main(["diff", str(d / "a.onnx"), str(d / "b.onnx"), "--export", str(tmp_path / "diff.png")]) == 1
    assert (tmp_path / "diff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert kiln_main(["diff", str(d / "a.onnx"), str(d / "a.onnx"), "--export", str(tmp_path / "same.html")]) == 0
    html = (tmp_path / "same.html").read_text()
    assert '"diff":' in html and "diff-nav" in html
    capsys.readouterr()


def test_ten_thousand_node_diff_opens_grouped_and_colours_the_overview(page, big_path, tmp_path):
    a = onnx.load(big_path)
    b = copy.deepcopy(a)
    w = next(t for t in b.graph.initializer if t.name.startswith("/encoder/layer.150/output/LayerNorm.g"))
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) + 1, w.name))
    onnx.save(b, tmp_path / "b.onnx")
    s = open_diff(page, big_path, tmp_path / "b.onnx")
    try:
        assert page.inner_text("#diff-counts").split() == ["1", "changed"]
        groups = page.evaluate("kilnApp.panes[0].pane.clusters.filter(c => c.kind === 'group' && c.df === 'changed')"
                               ".map(c => c.path)")
        assert "encoder/layer.150" in groups and "encoder/layer.149" not in groups
        page.keyboard.press("n")
        settle(page)
        assert selected(page)["name"] == "/encoder/layer.150/output/LayerNorm/LayerNormalization"
        page.click("#b-expand")
        settle(page)
        page.evaluate("kilnApp.panes[0].view.fit(); kilnApp.panes[0].view.renderNow()")
        assert page.evaluate("kilnApp.panes[0].view.lod") is True
        assert page.locator(".kg .lod .cat-df-changed").count() == 1
        assert page.locator(".kg .lod .cat-df-unchanged").count() == 1
    finally:
        s.stop()


def test_names_in_the_diff_are_text_never_markup(page, tmp_path):
    from onnx import TensorProto, helper
    evil = '<img src=x onerror="window.pwned=1">'

    def model(op):
        g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="/ok/Relu"),
                               helper.make_node(op, ["r"], ["y"], name=evil + op)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model("Neg"), tmp_path / "a.onnx")
    onnx.save(model("Abs"), tmp_path / "b.onnx")
    s = open_diff(page, tmp_path / "a.onnx", tmp_path / "b.onnx")
    try:
        page.keyboard.press("n")
        settle(page)
        page.click("#diff-list")
        assert evil in page.inner_text("#side-body")
        assert page.evaluate("window.pwned") is None and page.locator("#side-body img").count() == 0
    finally:
        s.stop()


def test_next_change_opens_the_body_it_is_in(page, tmp_path):
    a = samples.control_flow()
    b = copy.deepcopy(a)
    if_node = next(n for n in b.graph.node if n.op_type == "If")
    then_g = next(at for at in if_node.attribute if at.name == "then_branch").g
    then_g.node[0].op_type, then_g.node[0].name = "Sigmoid", "then/Sigmoid"
    onnx.save(a, tmp_path / "a.onnx")
    onnx.save(b, tmp_path / "b.onnx")
    s = open_diff(page, tmp_path / "a.onnx", tmp_path / "b.onnx")
    try:
        seen = []
        for _ in range(3):
            page.keyboard.press("n")
            settle(page)
            seen.append((selected(page)["name"], selected(page)["df"]))
        assert seen == [("If", "changed"), ("then/Relu", "removed"), ("then/Sigmoid", "added")]
        assert "then_branch" in page.inner_text("#side-body")        # where the change sits
        owner = page.evaluate("kilnApp.panes[0].pane.nodes.findIndex(n => n.op === 'If')")
        assert page.evaluate(f"kilnApp.panes[0].opened.has({owner})") is True
        assert page.locator(".kg .frame.body.df-changed").count() == 1
        assert page.locator(".kg .node.df-removed").count() == 1 and page.locator(".kg .node.df-added").count() == 1
    finally:
        s.stop()


def _constant_model(value: float) -> onnx.ModelProto:
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Constant", [], ["k"], name="/blk/two", value=helper.make_tensor("v", TensorProto.FLOAT,
                                                                                                 [], [value])),
             helper.make_node("Add", ["x", "k"], ["s"], name="/blk/add"),
             helper.make_node("Relu", ["s"], ["y"], name="/blk/relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_changed_constant_with_compact_on_is_one_row_marked_changed(page, tmp_path):
    onnx.save(_constant_model(2.0), tmp_path / "a.onnx")
    onnx.save(_constant_model(3.0), tmp_path / "b.onnx")
    s = open_diff(page, tmp_path / "a.onnx", tmp_path / "b.onnx")
    try:
        nodes = page.evaluate("kilnApp.panes[0].pane.nodes")
        const = next(i for i, n in enumerate(nodes) if n["name"] == "/blk/two")
        add = next(i for i, n in enumerate(nodes) if n["name"] == "/blk/add")
        assert nodes[const]["df"] == "changed" and nodes[const]["fold"] == add and nodes[add]["kdf"] == ["changed"]
        draw = "kilnApp.panes[0].view.fit(); kilnApp.panes[0].view.renderNow()"
        page.evaluate(draw)                               # a diff opens with Compact off: the constant is a box
        assert page.locator(f".kg .node[data-node='{const}'].df-changed").count() == 1
        assert page.locator(".kg .row.df-changed").count() == 0
        page.click("#t-compact")
        settle(page)
        page.evaluate(draw)
        assert page.locator(f".kg .node[data-node='{const}']").count() == 0        # no box of its own ...
        rows = page.locator(f".kg .node[data-node='{add}'] .row.df-changed")
        assert rows.count() == 1 and rows.text_content().startswith("B = ")        # ... one row, marked
        assert page.evaluate("getComputedStyle(document.querySelector('.kg .row.df-changed')).fill") == AMBER
        assert page.locator(".kg .node.df-changed").count() == 0
        page.evaluate("document.activeElement.blur()")    # keys typed into the checkbox do not navigate
        page.keyboard.press("n")                          # next change: the reader, with the constant's change
        settle(page)
        assert selected(page)["name"] == "/blk/add"
        side = page.inner_text("#side-body")
        assert "changed /blk/two (Constant)\nattribute value\t2.0\t3.0" in side
    finally:
        s.stop()
