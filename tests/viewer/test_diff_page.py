"""The diff page's data: statuses on both panes' nodes and groups, links between matched nodes, the change list."""
from __future__ import annotations

import copy

import onnx
from onnx import numpy_helper

from kiln.viewer import grouping, samples
from kiln.viewer.diff_page import _pane_order, build_diff_document
from kiln.viewer.formats.onnx import read_proto


def _changed_yolo():
    a = samples.mini_yolo()
    b = copy.deepcopy(a)
    init = next(t for t in b.graph.initializer if t.name == "model.2.cv1.conv.weight")
    arr = numpy_helper.to_array(init) * 2
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    relu = next(n for n in b.graph.node if n.name == "/model.24/Sigmoid")
    relu.op_type, relu.name = "HardSigmoid", "/model.24/HardSigmoid"
    return a, b


def test_pane_statuses_groups_links_and_changes():
    a, b = _changed_yolo()
    doc = build_diff_document(read_proto(a), read_proto(b))
    pa, pb = doc.page["panes"]
    by_name = [{n["name"]: n for n in p["nodes"] if not n.get("pseudo")} for p in (pa, pb)]
    assert by_name[0]["/model.2/cv1/conv/Conv"]["df"] == "changed" == by_name[1]["/model.2/cv1/conv/Conv"]["df"]
    assert by_name[0]["/model.24/Sigmoid"]["df"] == "removed" and by_name[1]["/model.24/HardSigmoid"]["df"] == "added"
    assert by_name[1]["/model.0/conv/Conv"]["df"] == "unchanged"
    groups = {c["path"]: c["df"] for c in pb["clusters"] if c["kind"] == "group"}
    assert groups["model.2/cv1"] == "changed" and groups["model.0"] == "unchanged"
    assert pb["clusters"][0]["df"] == "changed"
    # every matched pair is linked, pane a → pane b, by the same name here
    links = doc.page["links"]
    assert len(links) == len(a.graph.node) - 1
    assert all(pa["nodes"][i]["name"] == pb["nodes"][j]["name"] for i, (j,) in links)
    info = doc.page["diff"]
    # the replaced node's consumer now reads another node's output: changed too
    sig_out = next(n for n in a.graph.node if n.name == "/model.24/Sigmoid").output[0]
    consumer = next(n.name for n in a.graph.node if sig_out in n.input)
    assert info["counts"] == {"added": 1, "removed": 1, "changed": 2, "unchanged": len(a.graph.node) - 3}
    titles = [(c["s"], c["title"]) for c in info["changes"]]
    wiring = next(c for c in info["changes"] if c["title"].startswith(consumer + " "))
    assert wiring["s"] == "changed" and wiring["rows"][0][0].startswith("input ")
    assert ("changed", "/model.2/cv1/conv/Conv (Conv)") == titles[0]
    assert {("removed", "/model.24/Sigmoid (Sigmoid)"), ("added", "/model.24/HardSigmoid (HardSigmoid)")} <= set(titles)
    row = info["changes"][0]["rows"][0]
    assert row[0] == "weight W" and row[2] is None and row[3].startswith("max |a-b| ")
    for c in info["changes"]:
        for side, pane in (("a", pa), ("b", pb)):
            if c[side] is not None:
                assert pane["nodes"][c[side]]["df"] == c["s"]


def test_body_changes_roll_up_to_the_owner_and_its_body_cluster():
    a = samples.control_flow()
    b = copy.deepcopy(a)
    loop = next(n for n in b.graph.node if n.op_type == "Loop")
    body = next(at for at in loop.attribute if at.name == "body").g
    body.node[0].op_type = "Sub"
    doc = build_diff_document(read_proto(a), read_proto(b))
    pb = doc.page["panes"][1]
    bodies = {c["name"]: c["df"] for c in pb["clusters"] if c["kind"] == "body"}
    assert bodies == {"then_branch": "unchanged", "else_branch": "unchanged", "body": "changed"}
    assert {n["name"]: n["df"] for n in pb["nodes"] if not n.get("pseudo")}["Loop"] == "changed"


def test_pane_order_is_grouping_order_with_bodies():
    m = read_proto(samples.control_flow())
    doc = build_diff_document(m, read_proto(samples.control_flow()))
    nodes = doc.page["panes"][0]["nodes"]
    expect = [None if n.properties.get("pseudo") else n for n in grouping.build(m.graph).nodes]
    assert _pane_order(m, nodes) == expect
    assert not doc.page["diff"]["differs"]


def test_model_level_input_change_marks_the_input_node(tmp_path):
    a = samples.mini_yolo()
    b = copy.deepcopy(a)
    b.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 320
    onnx.save(a, tmp_path / "a.onnx")
    onnx.save(b, tmp_path / "b.onnx")
    doc = build_diff_document(tmp_path / "a.onnx", tmp_path / "b.onnx")
    inputs = [n for n in doc.page["panes"][1]["nodes"] if n.get("pseudo") == "input"]
    assert [n["df"] for n in inputs] == ["changed"]
    assert doc.page["diff"]["model"][0][:3] == ["input images", "float 1×3×640×640", "float 1×3×320×640"]
