"""Navigating into If/Loop bodies in Chromium: double-click or the sidebar's "enter", the breadcrumb, Backspace."""
from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper
from viewer_testing import open_offline, overlaps

from kiln.viewer.formats import open_model
from kiln.viewer.page import build_pane, page_json

pytestmark = pytest.mark.browser


def nested_model() -> onnx.ModelProto:
    """An If (outer_if) whose then-branch holds another If (inner_if) with a two-node then-branch (deep_then)."""
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])

    def branch(name, nodes):
        return helper.make_graph(nodes, name, [], [y])

    inner = helper.make_node("If", ["c"], ["y"], name="inner_if",
                             then_branch=branch("deep_then", [helper.make_node("Neg", ["x"], ["n"], name="deep_neg"),
                                                              helper.make_node("Abs", ["n"], ["y"], name="deep_abs")]),
                             else_branch=branch("deep_else", [helper.make_node("Identity", ["x"], ["y"], name="deep_id")]))
    outer = helper.make_node("If", ["c"], ["y"], name="outer_if",
                             then_branch=branch("then_branch", [inner]),
                             else_branch=branch("else_branch", [helper.make_node("Relu", ["x"], ["y"], name="relu")]))
    g = helper.make_graph([helper.make_node("Cast", ["x"], ["c"], name="cast", to=TensorProto.BOOL), outer], "nested",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def nested_page(tmp_path_factory):
    p = tmp_path_factory.mktemp("nested") / "nested.onnx"
    onnx.save(nested_model(), p)
    return page_json([build_pane(open_model(p))])


def drawn(pg) -> set[str]:
    return set(pg.evaluate("kilnApp.panes[0].scene.boxes.filter(b => b.kind === 'node')"
                           ".map(b => kilnApp.panes[0].pane.nodes[b.id].name)"))


def body(pg, node: int, name: str) -> int:
    return pg.evaluate(f"kilnApp.panes[0].pane.nodes[{node}].sub.find(c => kilnApp.panes[0].pane.clusters[c].name === {name!r})")


def crumbs(pg) -> str:
    return pg.evaluate("(() => { const e = document.querySelector('.crumbs'); return e.hidden ? '' : e.textContent; })()")


def test_enter_bodies_breadcrumb_and_back(page, nested_page):
    open_offline(page, nested_page)
    nodes = nested_page["panes"][0]["nodes"]
    idx = {n["name"]: i for i, n in enumerate(nodes) if not n.get("pseudo")}
    assert crumbs(page) == "" and {"cast", "outer_if"} <= drawn(page) and "deep_neg" not in drawn(page)

    page.dblclick(f".kg .node[data-node='{idx['outer_if']}']")          # double-click: into its first body
    page.wait_for_function("document.querySelector('.crumbs').hidden === false")
    assert crumbs(page) == "nested.onnx › outer_if › else_branch"
    assert "relu" in drawn(page) and not drawn(page) & {"cast", "outer_if", "inner_if"}
    page.click(".crumbs [data-level='0']")                                # the model crumb: back to the top
    page.wait_for_function("document.querySelector('.crumbs').hidden")
    assert {"cast", "outer_if"} <= drawn(page) and page.evaluate("kilnApp.panes[0].root") == 0

    page.evaluate(f"kilnApp.select(0, {{kind: 'node', id: {idx['outer_if']}}})")    # the sidebar's "enter ›"
    page.click(f"#side-body [data-enter='{body(page, idx['outer_if'], 'then_branch')}']")
    page.wait_for_function("document.querySelector('.crumbs').textContent.endsWith('then_branch')")
    assert crumbs(page) == "nested.onnx › outer_if › then_branch"
    body_nodes = drawn(page)
    assert "inner_if" in body_nodes and not body_nodes & {"cast", "outer_if", "relu", "deep_neg"}
    scene = page.evaluate("kilnApp.panes[0].scene")
    assert overlaps(scene["boxes"]) == []
    assert all(0 <= b["x"] and b["x"] + b["w"] <= scene["width"] + 1e-6 and 0 <= b["y"]
               and b["y"] + b["h"] <= scene["height"] + 1e-6 for b in scene["boxes"])

    page.evaluate(f"kilnApp.select(0, {{kind: 'node', id: {idx['inner_if']}}})")    # the sidebar's "enter ›"
    page.click(f"#side-body [data-enter='{body(page, idx['inner_if'], 'then_branch')}']")
    page.wait_for_function("document.querySelector('.crumbs').textContent.endsWith('inner_if › then_branch')")
    assert crumbs(page) == "nested.onnx › outer_if › then_branch › inner_if › then_branch"
    assert drawn(page) >= {"deep_neg", "deep_abs"} and "deep_id" not in drawn(page) and "inner_if" not in drawn(page)

    page.keyboard.press("Backspace")                                      # one level up, the If selected
    page.wait_for_function("document.querySelector('.crumbs').textContent.endsWith('outer_if › then_branch')")
    assert "inner_if" in drawn(page) and page.evaluate("kilnApp.selection.id") == idx["inner_if"]

    page.click(".crumbs [data-focus]")                                    # outer_if's crumb: the top, it selected
    page.wait_for_function("document.querySelector('.crumbs').hidden")
    assert page.evaluate("kilnApp.selection.id") == idx["outer_if"]

    page.dblclick(f".kg .node[data-node='{idx['outer_if']}']")
    page.wait_for_function("document.querySelector('.crumbs').hidden === false")
    page.keyboard.press("Backspace")
    page.wait_for_function("document.querySelector('.crumbs').hidden")
    assert page.evaluate("kilnApp.selection.id") == idx["outer_if"]
    page.keyboard.press("Backspace")                                      # at the top: nothing to leave
    assert page.evaluate("kilnApp.panes[0].root") == 0 and page.errors == []


def test_going_to_a_node_outside_the_entered_body_leaves_it(page, nested_page):
    open_offline(page, nested_page)
    nodes = nested_page["panes"][0]["nodes"]
    idx = {n["name"]: i for i, n in enumerate(nodes) if not n.get("pseudo")}
    page.evaluate(f"kilnApp.enter(0, {body(page, idx['outer_if'], 'else_branch')})")
    page.wait_for_function("document.querySelector('.crumbs').hidden === false")
    assert crumbs(page).endswith("outer_if › else_branch") and "relu" in drawn(page)
    page.evaluate(f"kilnApp.goToNode(0, {idx['deep_abs']})")        # e.g. a search result in another body
    page.wait_for_function("document.querySelector('.crumbs').hidden")
    assert "deep_abs" in drawn(page) and page.evaluate("kilnApp.selection.id") == idx["deep_abs"]
    assert page.errors == []
