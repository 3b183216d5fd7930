"""Model diff core: matching by name and by structure, change details, weights, bodies, group roll-up, scale."""
from __future__ import annotations

import copy
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.viewer import samples
from kiln.viewer.diff import diff_models, rollup, weight_stats
from kiln.viewer.formats.onnx import read_proto


def _model(nodes, inits=(), shape=(2, 3), opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _diff(a: onnx.ModelProto, b: onnx.ModelProto, **kw):
    return diff_models(read_proto(a), read_proto(b), **kw)


def _by_op(d) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in d.nodes:
        out.setdefault(n.node.op_type, []).append(n.status)
    return out


def test_identical_models_are_equal():
    m = samples.mini_yolo()
    d = _diff(m, copy.deepcopy(m))
    assert not d.differs and d.counts() == {"added": 0, "removed": 0, "changed": 0, "unchanged": len(m.graph.node)}


def test_one_weight_changed_gives_its_max_and_mean_difference():
    a = samples.mini_yolo()
    b = copy.deepcopy(a)
    init = next(t for t in b.graph.initializer if t.name == "model.1.conv.weight")
    before = numpy_helper.to_array(init)
    after = before.copy()
    after[0, 0] += np.float32(0.25)
    after[3, 1, 2, 2] -= np.float32(2.0)
    init.CopyFrom(numpy_helper.from_array(after, init.name))
    d = _diff(a, b)
    changes = d.changes()
    assert [c.node.name for c in changes] == ["/model.1/conv/Conv"]
    (w,) = changes[0].details
    assert (w.kind, w.a, w.b) == ("weight", {"shape": list(before.shape), "dtype": "float"},
                                  {"shape": list(before.shape), "dtype": "float"})
    ref = np.abs(before.astype(np.float64) - after.astype(np.float64))
    assert w.stats["max_abs"] == pytest.approx(ref.max(), rel=1e-12)
    assert w.stats["mean_abs"] == pytest.approx(ref.mean(), rel=1e-12)
    assert d.groups("a")[("model.1",)] == "changed" and d.groups("b")[("model.0",)] == "unchanged"
    assert not _diff(a, b, weights=False).differs          # without values only shapes and dtypes count


def _chain(ops: list[tuple[str, dict]]) -> onnx.ModelProto:
    """x → op0 → op1 → … → y, every node unnamed, tensors named by position."""
    nodes, prev = [], "x"
    for i, (op, attrs) in enumerate(ops):
        out = "y" if i == len(ops) - 1 else f"t{i}"
        nodes.append(helper.make_node(op, [prev], [out], **attrs))
        prev = out
    return _model(nodes)


def test_unnamed_insertion_leaves_the_rest_matched():
    a = _chain([("Relu", {}), ("Sigmoid", {}), ("Tanh", {}), ("Neg", {})])
    b = _chain([("Relu", {}), ("Abs", {}), ("Sigmoid", {}), ("Tanh", {}), ("Neg", {})])
    d = _diff(a, b)
    assert _by_op(d) == {"Relu": ["unchanged"], "Sigmoid": ["changed"], "Tanh": ["unchanged"],
                         "Neg": ["unchanged"], "Abs": ["added"]}
    sig = next(n for n in d.nodes if n.node.op_type == "Sigmoid")
    assert [(x.kind, x.b) for x in sig.details] == [("input", "t1 (from Abs)")]


def test_unnamed_deletion_and_replacement():
    a = _chain([("Relu", {}), ("Abs", {}), ("Sigmoid", {}), ("Neg", {})])
    b = _chain([("Relu", {}), ("Sigmoid", {}), ("Neg", {})])
    assert _by_op(_diff(a, b)) == {"Relu": ["unchanged"], "Abs": ["removed"], "Sigmoid": ["changed"],
                                   "Neg": ["unchanged"]}
    a = _chain([("Relu", {}), ("Sigmoid", {}), ("Neg", {})])
    b = _chain([("Relu", {}), ("Tanh", {}), ("Neg", {})])
    d = _diff(a, b)
    assert _by_op(d) == {"Relu": ["unchanged"], "Sigmoid": ["removed"], "Neg": ["changed"], "Tanh": ["added"]}


def test_unnamed_attribute_change_is_one_changed_node():
    a = _chain([("Relu", {}), ("LeakyRelu", {"alpha": 0.1}), ("Neg", {}), ("Tanh", {})])
    b = _chain([("Relu", {}), ("LeakyRelu", {"alpha": 0.2}), ("Neg", {}), ("Tanh", {})])
    d = _diff(a, b)
    assert _by_op(d) == {"Relu": ["unchanged"], "LeakyRelu": ["changed"], "Neg": ["unchanged"],
                         "Tanh": ["unchanged"]}
    (x,) = d.changes()[0].details
    assert (x.kind, x.name) == ("attribute", "alpha") and x.a == pytest.approx(0.1) and x.b == pytest.approx(0.2)


def test_parallel_identical_branches_pair_one_to_one():
    nodes = [helper.make_node("Relu", ["x"], ["r1"]), helper.make_node("Relu", ["x"], ["r2"]),
             helper.make_node("Add", ["r1", "r2"], ["y"])]
    d = _diff(_model(nodes), _model(copy.deepcopy(nodes)))
    assert not d.differs and len(d.nodes) == 3


def test_names_match_first_and_renamed_nodes_match_by_structure():
    w = numpy_helper.from_array(np.ones((3, 3), np.float32), "w")
    a = _model([helper.make_node("MatMul", ["x", "w"], ["m"], name="/fc/MatMul"),
                helper.make_node("Relu", ["m"], ["y"], name="/act/Relu")], [w])
    b = _model([helper.make_node("MatMul", ["x", "w"], ["m"], name="/dense/MatMul"),
                helper.make_node("Relu", ["m"], ["y"], name="/act/Relu")], [w])
    d = _diff(a, b)
    assert d.counts() == {"added": 0, "removed": 0, "changed": 0, "unchanged": 2}
    pair = next(n for n in d.nodes if n.node.op_type == "MatMul")
    assert (pair.a.name, pair.b.name) == ("/fc/MatMul", "/dense/MatMul")


def test_graph_input_and_output_shape_changes_are_model_level():
    a = _model([helper.make_node("Relu", ["x"], ["y"])], shape=(2, 3))
    b = _model([helper.make_node("Relu", ["x"], ["y"])], shape=(4, 3))
    d = _diff(a, b)
    assert d.differs
    assert [(x.kind, x.name, x.a["shape"], x.b["shape"]) for x in d.model] == [
        ("input", "x", [2, 3], [4, 3]), ("output", "y", [2, 3], [4, 3])]
    (relu,) = d.changes()
    assert [(x.kind, x.a["shape"], x.b["shape"]) for x in relu.details] == [("output", [2, 3], [4, 3])]


def test_changes_inside_an_if_branch_are_reported_with_their_scope():
    a = samples.control_flow()
    b = copy.deepcopy(a)
    if_node = next(n for n in b.graph.node if n.op_type == "If")
    then_g = next(at for at in if_node.attribute if at.name == "then_branch").g
    then_g.node[0].op_type = "Sigmoid"
    then_g.node[0].name = "then/Sigmoid"
    d = _diff(a, b)
    inner = {(n.scope, n.node.name, n.status) for n in d.nodes if n.scope}
    assert (("If", "then_branch"), "then/Relu", "removed") in inner
    assert (("If", "then_branch"), "then/Sigmoid", "added") in inner
    assert (("If", "else_branch"), "else/Neg", "unchanged") in inner
    top = {n.node.name: n for n in d.nodes if not n.scope}
    assert top["If"].status == "changed" and top["Loop"].status == "unchanged"
    assert [(x.kind, x.name, x.stats["changed nodes"]) for x in top["If"].details] == [("subgraph", "then_branch", 2)]


def test_groups_roll_up_children():
    a = _model([helper.make_node("Relu", ["x"], ["r"], name="/old/Relu"),
                helper.make_node("Neg", ["r"], ["n"], name="/blk/Neg"),
                helper.make_node("Abs", ["n"], ["y"], name="/blk/Abs")])
    b = _model([helper.make_node("Relu", ["x"], ["r"], name="/new/Relu"),
                helper.make_node("Neg", ["r"], ["n"], name="/blk/Neg"),
                helper.make_node("Abs", ["n"], ["y"], name="/blk/Abs")])
    # the renamed Relu matches by structure: nothing is added or removed
    assert not _diff(a, b).differs
    b.graph.node[0].op_type = "Sigmoid"
    d = _diff(a, b)
    assert d.groups("a") == {("old",): "removed", ("blk",): "changed"}
    assert d.groups("b") == {("new",): "added", ("blk",): "changed"}
    assert rollup([]) == "unchanged" and rollup(["added", "added"]) == "added"


def test_weight_stats_against_numpy():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 5)).astype(np.float32)
    b = a + rng.standard_normal((4, 5)).astype(np.float32)
    ref = np.abs(a.astype(np.float64) - b.astype(np.float64))
    s = weight_stats(a, b)
    assert s["max_abs"] == pytest.approx(ref.max(), rel=1e-12) and s["mean_abs"] == pytest.approx(ref.mean(), rel=1e-12)
    h = a.astype(np.float16)                                  # across dtypes: compared in float64
    ref = np.abs(a.astype(np.float64) - h.astype(np.float64))
    assert weight_stats(a, h)["max_abs"] == pytest.approx(ref.max(), rel=1e-12)
    n = np.array([np.nan, 1.0, np.inf], np.float32)
    assert weight_stats(n, n.copy()) == {"max_abs": 0.0, "mean_abs": 0.0}
    assert weight_stats(np.array([1, 5], np.int8), np.array([1, -5], np.int8))["max_abs"] == 10.0
    assert weight_stats(np.ones(3), np.ones(4)) is None
    assert weight_stats(np.array(["a", "b"]), np.array(["a", "c"])) == {"max_abs": 1.0, "mean_abs": 0.5}


def test_unreadable_weight_is_reported_not_raised():
    a = samples.mini_yolo()
    va, vb = read_proto(a), read_proto(copy.deepcopy(a))

    def broken():
        raise OSError("disk gone")
    vb.graph.weights["model.0.conv.weight"].load = broken
    d = diff_models(va, vb)
    (c,) = d.changes()
    assert "disk gone" in c.details[0].stats["unreadable"]


def test_ten_thousand_nodes_diff_quickly(big_path):
    """The benchmark's case (benchmarks/diff_scale.py) with a generous bound for a loaded 2-core CI machine."""
    a = onnx.load(big_path)
    b = copy.deepcopy(a)
    node = next(n for n in b.graph.node if n.name == "/encoder/layer.100/attention/output/LayerNorm/LayerNormalization")
    node.attribute.append(helper.make_attribute("epsilon", 1e-3))
    va, vb = read_proto(a), read_proto(b)
    start = time.process_time()          # CPU seconds: other jobs on a shared machine do not count
    d = diff_models(va, vb)
    seconds = time.process_time() - start
    assert [c.node.name for c in d.changes()] == [node.name]
    assert d.counts()["unchanged"] == len(a.graph.node) - 1
    assert seconds < 10, f"diff of two {len(a.graph.node)}-node models took {seconds:.1f} s"


def test_every_attribute_changed_along_a_long_unnamed_chain():
    """Each node pairs through the op+wiring pass as soon as its producer is paired (one pass per offer, not per
    chain link: 3,000 links stay well under a second of CPU)."""
    n = 3000
    a = _chain([("LeakyRelu", {"alpha": 0.1})] * n)
    b = _chain([("LeakyRelu", {"alpha": 0.2})] * n)
    va, vb = read_proto(a), read_proto(b)
    start = time.process_time()
    d = diff_models(va, vb)
    seconds = time.process_time() - start
    assert d.counts() == {"added": 0, "removed": 0, "changed": n, "unchanged": 0}
    assert all(x.details[0].name == "alpha" for x in d.nodes)
    assert seconds < 10, f"{seconds:.1f} s"


def _random_graph(rng: np.random.Generator, n: int) -> "onnx.ModelProto":
    """Nodes reading random earlier values (and now and then a later one, a missing one or their own output),
    some outputs written twice, names often missing or repeated: what a damaged or odd file can hold."""
    ops = ["Relu", "Add", "Mul", "Sigmoid", "Concat"]
    values, nodes = ["x"], []
    for i in range(n):
        op = ops[rng.integers(len(ops))]
        k = 2 if op in ("Add", "Mul", "Concat") else 1
        ins = [values[rng.integers(len(values))] for _ in range(k)]
        if rng.random() < 0.05:
            ins[0] = f"v{i + rng.integers(1, 4)}"            # a value produced later (a cycle or a dangling read)
        out = f"v{i}" if rng.random() > 0.05 else values[-1]  # sometimes a value written twice
        name = "" if rng.random() < 0.4 else f"/blk{rng.integers(3)}/{op}_{rng.integers(5)}"
        attrs = {"axis": int(rng.integers(2))} if op == "Concat" else {}
        nodes.append(helper.make_node(op, ins, [out], name=name, **attrs))
        values.append(out)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info(values[-1], TensorProto.FLOAT, None)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_odd_graphs_diff_without_errors_and_every_node_once():
    from kiln.viewer.diff_merge import merge
    from kiln.viewer.diff_report import as_json, text_lines
    rng = np.random.default_rng(7)
    for trial in range(30):
        a = _random_graph(rng, int(rng.integers(1, 40)))
        b = copy.deepcopy(a) if trial % 3 == 0 else _random_graph(rng, int(rng.integers(1, 40)))
        if trial % 3 == 0 and len(b.graph.node) > 2:                  # a few edits of a copy
            del b.graph.node[int(rng.integers(len(b.graph.node)))]
            b.graph.node[0].op_type = "Neg"
        va, vb = read_proto(a), read_proto(b)
        d = diff_models(va, vb)
        seen_a = [id(n.a) for n in d.nodes if n.a is not None]
        seen_b = [id(n.b) for n in d.nodes if n.b is not None]
        assert sorted(seen_a) == sorted(map(id, va.graph.nodes)) and sorted(seen_b) == sorted(map(id, vb.graph.nodes))
        merged = merge(d)
        removed = sum(n.status == "removed" for n in d.nodes)
        assert len(merged.model.graph.nodes) == len(vb.graph.nodes) + removed
        assert text_lines(d) and as_json(d)["counts"] == d.counts()
        if trial % 5 == 0:
            from kiln.viewer.diff_page import build_diff_document
            page = build_diff_document(va, vb).page
            assert sum(n["df"] == "removed" for n in page["panes"][0]["nodes"]) == removed
