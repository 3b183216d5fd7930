"""Name-scope clusters: the group tree, dissolved small groups, ports, and edges routed through clusters."""
from __future__ import annotations

from kiln.viewer import grouping
from kiln.viewer.formats.onnx import group_path, read
from kiln.viewer.graph import ViewArgument, ViewGraph, ViewNode, ViewTensor
from kiln.viewer.page import EXPAND_ALL, VISIBLE_BUDGET, build_pane, default_expanded


def test_group_path_from_name_scopes():
    assert group_path("/model.24/m.0/Conv") == ("model.24", "m.0")
    assert group_path("model.24/m.0/Conv_3") == ("model.24", "m.0")
    assert group_path("Conv_0") == ()
    assert group_path("") == ()


def _graph(spec: list[tuple[str, list[str], list[str]]], inputs=("x",), outputs=("y",)) -> ViewGraph:
    g = ViewGraph("g", inputs=[ViewTensor(i) for i in inputs], outputs=[ViewTensor(o) for o in outputs])
    for k, (name, ins, outs) in enumerate(spec):
        g.nodes.append(ViewNode(f"n{k}", name, "Op", group=group_path(name),
                                inputs=[ViewArgument("i", ins)], outputs=[ViewArgument("o", outs)]))
    return g


def test_tree_dissolves_single_member_and_small_groups():
    g = _graph([
        ("/a/b/c/Conv", ["x"], ["t1"]),          # a/b/c holds one node: dissolved
        ("/a/d/Relu", ["t1"], ["t2"]),          # a/d holds two nodes: fewer than MIN_GROUP, dissolved
        ("/a/d/Sigmoid", ["t2"], ["t3"]),
        ("/a/e/Add", ["t3"], ["t4"]),           # a/e holds three: a group
        ("/a/e/Mul", ["t4"], ["t5"]),
        ("/a/e/Neg", ["t5"], ["t6"]),
        ("/z/Exp", ["t6"], ["y"]),
    ])
    h = grouping.build(g)
    names = {c.name: c for c in h.clusters}
    assert set(names) == {"g", "a", "e"}
    a, e = names["a"], names["e"]
    assert a.parent == 0 and e.parent == a.id
    assert a.size == 6 and e.size == 3 and h.root().size == 9          # with the input and output nodes
    kinds_in_a = [k for k, _ in a.items if k in ("n", "c")]
    assert kinds_in_a.count("n") == 3 and kinds_in_a.count("c") == 1


def test_single_child_chains_merge_their_names():
    g = _graph([("/enc/layer.0/att/Add", ["x"], ["t1"]), ("/enc/layer.0/att/Mul", ["t1"], ["t2"]),
                ("/enc/layer.0/att/Neg", ["t2"], ["t3"]), ("/out/Exp", ["t3"], ["y"])])
    h = grouping.build(g)
    assert [c.name for c in h.clusters[1:]] == ["enc/layer.0/att"]


def test_edges_cross_groups_through_ports():
    g = _graph([
        ("/a/p/Conv", ["x"], ["t1"]), ("/a/p/Relu", ["t1"], ["t2"]), ("/a/p/Neg", ["t2"], ["t3"]),
        ("/a/Add", ["t3"], ["t4"]), ("/a/Mul", ["t4"], ["t5"]),
        ("/b/Exp", ["t3"], ["t6"]), ("/b/Log", ["t6"], ["t7"]), ("/b/Abs", ["t7", "t5"], ["y"]),
    ])
    h = grouping.build(g)
    by = {c.name: c for c in h.clusters}
    a, p, b = by["a"], by["p"], by["b"]
    # t3 leaves p (exit port), is used inside a (Add) and leaves a towards b
    assert p.ports_out == ["t3"] and "t3" in a.ports_out
    assert "t3" in b.ports_in and "t5" in b.ports_in
    root_edges = {(h.root().items[s], h.root().items[d], t) for s, d, t in h.root().edges}
    assert (("c", a.id), ("c", b.id), "t3") in root_edges
    assert (("c", a.id), ("c", b.id), "t5") in root_edges
    # every cluster edge joins two different items of that cluster
    for c in h.clusters:
        for s, d, _ in c.edges:
            assert s != d and 0 <= s < len(c.items) and 0 <= d < len(c.items)


def test_every_node_belongs_to_exactly_one_cluster(yolo_path):
    model = read(yolo_path)
    h = grouping.build(model.graph)
    seen = [0] * len(h.nodes)
    for c in h.clusters:
        for kind, i in c.items:
            if kind == "n":
                seen[i] += 1
                assert h.node_cluster[i] == c.id
    assert seen == [1] * len(h.nodes)
    assert sum(1 for n in h.nodes if n.op_type == "Input") == 1
    assert sum(1 for n in h.nodes if n.op_type == "Output") == 1
    names = {c.path for c in h.clusters}
    assert {("model.24",), ("model.2",), ("model.2", "m/m.0")} <= names


def test_small_graphs_open_fully_large_ones_within_a_budget(yolo_path, big_path):
    small = build_pane(read(yolo_path)).data
    groups = {i for i, c in enumerate(small["clusters"]) if c["kind"] == "group"}
    assert small["clusters"][0]["size"] <= EXPAND_ALL and set(small["expanded"]) == groups
    big = build_pane(read(big_path)).data
    exp = default_expanded(big)
    assert exp != {i for i, c in enumerate(big["clusters"]) if c["kind"] == "group"}
    visible = len(big["clusters"][0]["items"]) + sum(
        sum(1 for k, _ in big["clusters"][c]["items"] if k in ("n", "c")) - 1 for c in exp)
    assert visible <= VISIBLE_BUDGET
