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


def test_merged_pane_statuses_groups_and_changes():
    a, b = _changed_yolo()
    doc = build_diff_document(read_proto(a), read_proto(b))
    (pane,) = doc.page["panes"]
    nodes = pane["nodes"]
    real = [n for n in nodes if not n.get("pseudo")]
    assert len(real) == len(b.graph.node) + 1                      # b's nodes and the removed Sigmoid
    by_name = {n["name"]: n for n in real}
    assert by_name["/model.2/cv1/conv/Conv"]["df"] == "changed"
    assert by_name["/model.24/Sigmoid"]["df"] == "removed" and by_name["/model.24/HardSigmoid"]["df"] == "added"
    assert by_name["/model.0/conv/Conv"]["df"] == "unchanged"
    # the removed node reads what the added one reads, and feeds its old consumer through a "(removed)" input
    tensor = lambda ids: [pane["tensors"][t][0] for t in ids]      # noqa: E731
    assert tensor(by_name["/model.24/Sigmoid"]["in"][0][1]) == tensor(by_name["/model.24/HardSigmoid"]["in"][0][1])
    sig_out = next(n for n in a.graph.node if n.name == "/model.24/Sigmoid").output[0]
    consumer = next(n.name for n in a.graph.node if sig_out in n.input)
    extra = [ids for slot, ids in by_name[consumer]["in"] if slot == "(removed)"]
    assert extra and tensor(extra[0]) == tensor(by_name["/model.24/Sigmoid"]["out"][0][1])
    groups = {c["path"]: c["df"] for c in pane["clusters"] if c["kind"] == "group"}
    assert groups["model.2/cv1"] == "changed" and groups["model.0"] == "unchanged"
    assert pane["clusters"][0]["df"] == "changed"
    info = doc.page["diff"]
    # the replaced node's consumer now reads another node's output: changed too
    assert info["counts"] == {"added": 1, "removed": 1, "changed": 2, "unchanged": len(a.graph.node) - 3}
    titles = [(c["s"], c["title"]) for c in info["changes"]]
    assert ("changed", "/model.2/cv1/conv/Conv (Conv)") == titles[0]
    assert {("removed", "/model.24/Sigmoid (Sigmoid)"), ("added", "/model.24/HardSigmoid (HardSigmoid)")} <= set(titles)
    wiring = next(c for c in info["changes"] if c["title"].startswith(consumer + " "))
    assert wiring["s"] == "changed" and wiring["rows"][0][0].startswith("input ")
    row = info["changes"][0]["rows"][0]
    assert row[0] == "weight W" and row[2] is None and row[3].startswith("max |a-b| ")
    assert [c["at"][0][1] for c in info["changes"]] == sorted(c["at"][0][1] for c in info["changes"])
    for c in info["changes"]:
        (pi, ni), = c["at"]
        assert pi == 0 and nodes[ni]["df"] == c["s"] and c["title"].startswith(nodes[ni]["name"])


def test_body_changes_roll_up_to_the_owner_and_its_body_cluster():
    a = samples.control_flow()
    b = copy.deepcopy(a)
    loop = next(n for n in b.graph.node if n.op_type == "Loop")
    body = next(at for at in loop.attribute if at.name == "body").g
    body.node[0].op_type = "Sub"
    doc = build_diff_document(read_proto(a), read_proto(b))
    (pane,) = doc.page["panes"]
    bodies = {c["name"]: c for c in pane["clusters"] if c["kind"] == "body"}
    assert {k: c["df"] for k, c in bodies.items()} == {"then_branch": "unchanged", "else_branch": "unchanged",
                                                      "body": "changed"}
    inside = sorted((n["op"], n["df"]) for n in pane["nodes"] if n["name"].startswith("body/"))
    assert inside == [("Add", "removed"), ("Identity", "unchanged"), ("Sub", "added")]
    assert {n["name"]: n["df"] for n in pane["nodes"] if not n.get("pseudo")}["Loop"] == "changed"


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
    inputs = [n for n in doc.page["panes"][0]["nodes"] if n.get("pseudo") == "input"]
    assert [n["df"] for n in inputs] == ["changed"]
    assert doc.page["diff"]["model"][0][:3] == ["input images", "float 1×3×640×640", "float 1×3×320×640"]


def test_merged_graph_is_topological_with_removed_chains():
    """Three removed nodes in a row between kept ones: each node comes after the producers of its inputs."""
    def chain(ops):
        nodes, prev = [], "x"
        for i, op in enumerate(ops):
            out = "y" if i == len(ops) - 1 else f"t{i}"
            nodes.append(onnx.helper.make_node(op, [prev], [out]))
            prev = out
        g = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", 1, [2])],
                                   [onnx.helper.make_tensor_value_info("y", 1, [2])])
        return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
    a = read_proto(chain(["Relu", "Abs", "Neg", "Sigmoid", "Tanh", "Exp"]))
    b = read_proto(chain(["Relu", "Tanh", "Exp"]))
    from kiln.viewer.diff import diff_models
    from kiln.viewer.diff_merge import merge
    merged = merge(diff_models(a, b))
    g = merged.model.graph
    seen = {t.name for t in g.inputs} | set(g.weights)
    for n in g.nodes:
        assert all(v in seen for arg in n.inputs for v in arg.values), n
        seen.update(v for arg in n.outputs for v in arg.values)
    assert [(n.op_type, merged.status[id(n)]) for n in g.nodes] == [
        ("Relu", "unchanged"), ("Abs", "removed"), ("Neg", "removed"), ("Sigmoid", "removed"), ("Tanh", "changed"),
        ("Exp", "unchanged")]
    tanh = g.nodes[4]
    assert [a.name for a in tanh.inputs][-1] == "(removed)"


def test_model_beside_its_engine_page(tmp_path):
    import numpy as np
    import kiln
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="/blk/conv/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="/blk/act/Relu"),
             helper.make_node("Shape", ["r"], ["s"], name="/blk/Shape"),
             helper.make_node("Reshape", ["r", "s"], ["q"], name="/blk/Reshape"),
             helper.make_node("Add", ["q", "x"], ["y"], name="/blk/Add")]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [numpy_helper.from_array(np.full((4, 4, 3, 3), 0.1, np.float32), "w"),
                           numpy_helper.from_array(np.ones(4, np.float32), "b")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    engine = kiln.build(kiln.onnx.parse(str(tmp_path / "m.onnx")), kiln.BuildConfig(device="cpu", precision="fp16"))
    engine.save(str(tmp_path / "m.kiln"))
    header = kiln.engine.read_header(str(tmp_path / "m.kiln"))
    doc = build_diff_document(tmp_path / "m.onnx", tmp_path / "m.kiln")
    pe, pm = doc.page["panes"]
    layers = [n for n in pe["nodes"] if not n.get("pseudo")]
    expect = ["inserted" if not l["origin"] else "kept" if len(l["origin"]) == 1 else "fused" for l in header["layers"]]
    assert [n["df"] for n in layers] == expect
    built = {o for l in header["layers"] for o in l["origin"]}
    fused = {o for l in header["layers"] if len(l["origin"]) > 1 for o in l["origin"]}
    for n in pm["nodes"]:
        if not n.get("pseudo"):
            assert n["df"] == ("fused" if n["name"] in fused else "kept" if n["name"] in built else "folded")
    assert {"/blk/Shape"} <= {n["name"] for n in pm["nodes"] if n.get("df") == "folded"}
    assert doc.page["links"] and doc.page["diff"]["mode"] == "build" and not doc.page["diff"]["differs"]
    for c in doc.page["diff"]["changes"]:
        pi, ni = c["at"][0]
        assert doc.page["panes"][pi]["nodes"][ni]["df"] == c["s"]


def test_removed_node_keeps_its_own_weights_under_a_free_name():
    """a: x → MatMul(w) → Relu; b: x → Gemm(w) → Relu with another w: the removed MatMul shows a's w."""
    import numpy as np
    from onnx import TensorProto, helper

    def model(op, scale):
        w = numpy_helper.from_array(np.full((3, 3), scale, np.float32), "w")
        g = helper.make_graph([helper.make_node(op, ["x", "w"], ["m"], name=f"/fc/{op}"),
                               helper.make_node("Relu", ["m"], ["y"], name="/act/Relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w])
        return read_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    from kiln.viewer.diff import diff_models
    from kiln.viewer.diff_merge import merge
    a, b = model("MatMul", 1.0), model("Gemm", 2.0)
    merged = merge(diff_models(a, b)).model.graph
    removed = next(n for n in merged.nodes if n.op_type == "MatMul")
    assert [v for arg in removed.inputs for v in arg.values] == ["x", "w (removed)"]
    assert merged.weights["w (removed)"].load()[0, 0] == 1.0 and merged.weights["w"].load()[0, 0] == 2.0
    assert [v for arg in removed.outputs for v in arg.values] == ["m (removed)"]
    relu = next(n for n in merged.nodes if n.op_type == "Relu")
    assert relu.inputs[-1].name == "(removed)" and relu.inputs[-1].values == ["m (removed)"]
