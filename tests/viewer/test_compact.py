"""Compact view: constants read once are folded into their reader (page data, then the page in Chromium)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from viewer_testing import open_offline, overlaps, placed

from kiln.viewer.page import build_pane, page_json


def _const(name: str, values) -> onnx.NodeProto:
    arr = np.asarray(values, dtype=np.float32)
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(arr, name))


def compact_model() -> onnx.ModelProto:
    """x + 2 (a scalar read once), × a 1×3×1×1 scale read once, reshaped twice by one shared shape constant;
    an If whose then-branch reads an outer constant; one constant that is also a graph output."""
    then_out = helper.make_tensor_value_info("t", TensorProto.FLOAT, None)
    then_g = helper.make_graph([helper.make_node("Identity", ["inner_c"], ["t"], name="then_id")], "then", [],
                               [then_out])
    else_g = helper.make_graph([helper.make_node("Identity", ["m"], ["t"], name="else_id")], "else", [], [then_out])
    nodes = [
        _const("two", 2.0),
        helper.make_node("Add", ["x", "two"], ["a"], name="add"),
        _const("scale", np.arange(3).reshape(1, 3, 1, 1)),
        helper.make_node("Mul", ["a", "scale"], ["m"], name="mul"),
        helper.make_node("Constant", [], ["shape"], name="shape",
                         value=numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape")),
        helper.make_node("Reshape", ["m", "shape"], ["r1"], name="reshape1"),
        helper.make_node("Reshape", ["a", "shape"], ["r2"], name="reshape2"),
        _const("inner_c", [1.0]),
        _const("cond_v", [1.0]),
        helper.make_node("Cast", ["cond_v"], ["cond"], name="cast", to=TensorProto.BOOL),
        helper.make_node("If", ["cond"], ["f"], name="if", then_branch=then_g, else_branch=else_g),
        _const("exported", [5.0]),
        helper.make_node("Neg", ["exported"], ["n"], name="neg"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    outs = [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in ("r1", "r2", "f", "n", "exported")]
    return helper.make_model(helper.make_graph(nodes, "compact", [x], outs),
                             opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def compact_page(tmp_path_factory):
    from kiln.viewer.formats import open_model
    p = tmp_path_factory.mktemp("compact") / "compact.onnx"
    onnx.save(compact_model(), p)
    pane = build_pane(open_model(p))
    return page_json([pane])


def _by_name(pane: dict) -> dict[str, int]:
    return {n["name"]: i for i, n in enumerate(pane["nodes"]) if not n.get("pseudo")}


def test_only_constants_read_once_in_their_cluster_fold(compact_page):
    pane = compact_page["panes"][0]
    idx = _by_name(pane)
    folded = {pane["nodes"][i]["name"]: pane["nodes"][pane["nodes"][i]["fold"]]["name"]
              for i in range(len(pane["nodes"])) if "fold" in pane["nodes"][i]}
    # shape: read twice; inner_c: read from inside a body; exported: also a graph output
    assert folded == {"two": "add", "scale": "mul", "cond_v": "cast"}
    add, mul = pane["nodes"][idx["add"]], pane["nodes"][idx["mul"]]
    assert add["krow"] == ["B = 2"] and add["kin"] == [idx["two"]]
    assert pane["nodes"][idx["cast"]]["krow"] == ["input = [1]"]
    assert mul["krow"] == ["B ⟨1×3×1×1⟩ float"]          # nested values read badly in a row: shape and dtype


def test_constant_rows_show_shape_and_dtype_when_long(tmp_path):
    from kiln.viewer.formats import open_model
    nodes = [_const("big", np.ones((4, 8))), helper.make_node("MatMul", ["x", "big"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    pane = build_pane(open_model(tmp_path / "m.onnx")).data
    mm = pane["nodes"][_by_name(pane)["mm"]]
    assert mm["krow"] == ["B ⟨4×8⟩ float"]


@pytest.mark.browser
def test_compact_toggle_hides_folded_constants(page, compact_page):
    open_offline(page, compact_page)
    pane = compact_page["panes"][0]
    idx = _by_name(pane)
    on = placed(page, toggles={"compact": True})
    off = placed(page, toggles={"compact": False})
    drawn_on = {b["id"] for b in on["boxes"] if b["kind"] == "node"}
    drawn_off = {b["id"] for b in off["boxes"] if b["kind"] == "node"}
    assert drawn_off - drawn_on == {idx["two"], idx["scale"], idx["cond_v"]}
    assert drawn_on < drawn_off
    assert overlaps(on["boxes"]) == [] and overlaps(off["boxes"]) == []
    lr = placed(page, toggles={"compact": True}, rankdir="LR")
    assert {b["id"] for b in lr["boxes"] if b["kind"] == "node"} == drawn_on and overlaps(lr["boxes"]) == []
    names = {pane["tensors"][e["t"]][0] for e in on["edges"]}
    assert not names & {"two", "scale", "cond_v"} and {"shape", "exported", "a", "m"} <= names
    assert {"two", "scale", "cond_v"} <= {pane["tensors"][e["t"]][0] for e in off["edges"]}
    h_on = next(b["h"] for b in on["boxes"] if b["kind"] == "node" and b["id"] == idx["add"])
    h_off = next(b["h"] for b in off["boxes"] if b["kind"] == "node" and b["id"] == idx["add"])
    assert h_on > h_off                                    # the folded constant is a row of the Add
    # the page: compact by default, the row drawn in the box; the checkbox brings the constants back
    assert page.locator(f".kg .node[data-node='{idx['two']}']").count() == 0
    assert "B = 2" in page.text_content(f".kg .node[data-node='{idx['add']}']")
    page.click("#t-compact")
    page.wait_for_selector(f".kg .node[data-node='{idx['two']}']", state="attached")
    page.click("#t-compact")
    page.wait_for_selector(f".kg .node[data-node='{idx['two']}']", state="detached")
    # going to a folded constant (search, links) selects the node it is drawn in
    page.evaluate(f"kilnApp.goToNode(0, {idx['scale']})")
    assert page.evaluate("kilnApp.selection.id") == idx["mul"]
    assert page.errors == []
