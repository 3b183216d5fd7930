"""Wide graphs: a run of ranks with hundreds of parallel branches is folded into stacked bands (layout.WRAP
items each), so the picture stays readable — checked on the layout structure and, for a synthetic
300-branch TensorFlow GraphDef, on the page's own layout in Chromium."""
from __future__ import annotations

import pytest
from formats._pbwrite import f, msg
from viewer_testing import open_offline, overlaps, placed

from kiln.viewer import layout
from kiln.viewer.formats import open_model
from kiln.viewer.page import build_pane, page_json

BRANCHES = 300


def _branches(n: int, depth: int = 2) -> tuple[int, list[tuple[int, int, str]]]:
    """Item 0 feeds ``n`` chains of ``depth`` items that all end in one join (the last item)."""
    edges, join = [], 1 + n * depth
    for i in range(n):
        prev, value = 0, "x"
        for k in range(depth):
            item = 1 + k * n + i
            edges.append((prev, item, value))
            prev, value = item, f"t{k}_{i}"
        edges.append((prev, join, value))
    return join + 1, edges


def test_wide_runs_fold_into_bands_that_keep_branches_whole():
    n, edges = _branches(BRANCHES)
    s = layout.build(n, edges)
    real = [[e for e in layer if e < n] for layer in s.layers]
    assert max(len(layer) for layer in real) == layout.WRAP
    assert len(s.layers) == 2 + 2 * -(-BRANCHES // layout.WRAP)        # source, 13 bands of 2 ranks, join
    for a, b, _ in edges:
        assert s.rank[a] < s.rank[b]                                    # every edge still points down
    for i in range(BRANCHES):                                           # a branch stays in one band
        assert s.rank[1 + BRANCHES + i] == s.rank[1 + i] + 1


def test_ranks_up_to_the_limit_are_not_folded():
    n, edges = _branches(layout.WRAP)
    s = layout.build(n, edges)
    assert [len(layer) for layer in s.layers] == [1, layout.WRAP, layout.WRAP, 1]


def _node(name: str, op: str, *inputs: str) -> bytes:
    return msg(f(1, name), f(2, op), *[f(3, i) for i in inputs])


def wide_graph_def(branches: int) -> bytes:
    """x -> branch_i/{Conv2D, Relu} for each i -> ConcatV2: an inception-like TensorFlow GraphDef."""
    nodes = [_node("x", "Placeholder"), _node("w", "Const")]
    for i in range(branches):
        nodes.append(_node(f"branch_{i}/Conv2D", "Conv2D", "x", "w"))
        nodes.append(_node(f"branch_{i}/Relu", "Relu", f"branch_{i}/Conv2D"))
    nodes.append(_node("concat", "ConcatV2", *[f"branch_{i}/Relu" for i in range(branches)]))
    return msg(*[f(1, n) for n in nodes], f(4, msg(f(1, 1087))))


@pytest.mark.browser
def test_a_300_branch_tensorflow_graph_keeps_a_readable_shape(page, tmp_path):
    path = tmp_path / "wide.pb"
    path.write_bytes(wide_graph_def(BRANCHES))
    model = open_model(path)
    assert model.format == "TensorFlow" and len(model.graph.nodes) == 2 * BRANCHES + 2   # x is the graph input
    open_offline(page, page_json([build_pane(model)]))
    assert page.errors == []
    for expanded in ("all", "none"):                  # each branch a group: open, or 300 group boxes in a row
        scene = placed(page, expanded=expanded)
        w, h = scene["width"], scene["height"]
        assert w <= 6000 and w <= 4 * h, (expanded, w, h)   # unfolded: 300 boxes side by side, over 25,000 px
        assert not overlaps([b for b in scene["boxes"] if b["kind"] in ("node", "group")])
    lr = placed(page, expanded="all", rankdir="LR")
    assert lr["height"] <= 6000 and lr["height"] <= 4 * lr["width"]
