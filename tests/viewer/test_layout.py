"""The layered layout: structure (ranks, dummies, order) in Python, and the coordinates the page computes from it
(no overlaps, forward edges, straight long edges, deterministic), measured in headless Chromium."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from viewer_testing import open_offline, overlaps, placed

from kiln.viewer import documents, layout


@pytest.fixture(scope="module")
def yolo_page(browser, yolo_path):
    """The mini YOLO's page, loaded once for the coordinate tests; (page data of pane 0, Playwright page)."""
    ctx = browser.new_context(viewport={"width": 1200, "height": 800}, offline=True)
    pg = ctx.new_page()
    doc = documents.build_document(yolo_path)
    open_offline(pg, doc.page)
    yield doc.page["panes"][0], pg
    ctx.close()


def test_chain_with_skip_edge_gets_one_dummy_per_rank():
    # 0 → 1 → 2 → 3 and 0 → 3: the long edge gets two dummies in ranks 1 and 2
    s = layout.build(4, [(0, 1, "a"), (1, 2, "b"), (2, 3, "c"), (0, 3, "a")])
    assert s.rank[:4] == [0, 1, 2, 3]
    trunks = [h.trunk for h in s.edges if h.trunk]
    assert len(trunks) == 1 and [s.rank[d] for d in trunks[0]] == [1, 2]
    assert all(len(layer) <= 2 for layer in s.layers)


def test_value_read_by_many_consumers_shares_one_trunk():
    # a mask read by 20 layers of a chain: one trunk, not 20 parallel dummy chains
    n = 22
    edges = [(i, i + 1, f"x{i}") for i in range(1, n - 1)] + [(0, i, "mask") for i in range(2, n)]
    s = layout.build(n, edges)
    mask = [h for h in s.edges if h.tensor == "mask"]
    assert len(mask) == 1
    assert len(s.rank) - n == len(mask[0].trunk) <= n


def test_sources_sink_next_to_their_consumer():
    # input 0 feeds only node 5, far down a chain 1..5: it should sit just above 5, not at the top
    s = layout.build(6, [(1, 2, "a"), (2, 3, "b"), (3, 4, "c"), (4, 5, "d"), (0, 5, "in")])
    assert s.rank[0] == s.rank[5] - 1


def test_cycles_are_broken_and_flagged():
    s = layout.build(3, [(0, 1, "a"), (1, 2, "b"), (2, 0, "c")])
    assert sorted(s.rank[:3]) == [0, 1, 2]
    assert sum(h.flip for h in s.edges) == 1


def test_ports_take_the_first_and_last_rank():
    edges = [(3, 0, "in"), (0, 1, "a"), (1, 2, "b"), (2, 4, "out"), (3, 2, "in")]
    s = layout.build(5, edges, top={3}, bottom={4})
    assert s.rank[3] == 0 and s.rank[4] == max(s.rank[:5])
    assert all(s.rank[i] > 0 for i in (0, 1, 2))


def test_tree_is_drawn_without_crossings():
    # a binary tree whose children are listed in scrambled order
    edges = [(0, 2, "t"), (0, 1, "t"), (1, 4, "u"), (2, 5, "v"), (1, 3, "u"), (2, 6, "v")]
    s = layout.build(7, edges)
    _, down = s.neighbours()
    assert layout.crossings(s.layers, down) == 0


@pytest.mark.browser
@pytest.mark.parametrize("expanded", ["all", "none", "default"])
@pytest.mark.parametrize("rankdir", ["TB", "LR"])
def test_no_boxes_overlap(yolo_page, expanded, rankdir):
    pane, pg = yolo_page
    sc = placed(pg, expanded=expanded, rankdir=rankdir)
    solid = [b for b in sc["boxes"] if b["kind"] in ("node", "group")]
    assert solid and overlaps(solid) == []
    for b in sc["boxes"]:                  # everything inside the drawing
        assert b["x"] >= -1e-6 and b["y"] >= -1e-6
        assert b["x"] + b["w"] <= sc["width"] + 1e-6 and b["y"] + b["h"] <= sc["height"] + 1e-6


@pytest.mark.browser
def test_frames_contain_their_members(yolo_page):
    pane, pg = yolo_page
    sc = placed(pg, expanded="all")
    frames = {b["id"]: b for b in sc["boxes"] if b["kind"] == "frame"}
    for b in sc["boxes"]:
        if b["kind"] != "node":
            continue
        c = pane["nodes"][b["id"]]["c"]
        while c in frames:
            f = frames[c]
            assert f["x"] <= b["x"] and b["x"] + b["w"] <= f["x"] + f["w"]
            assert f["y"] <= b["y"] and b["y"] + b["h"] <= f["y"] + f["h"]
            c = pane["clusters"][c]["parent"]


@pytest.mark.browser
@pytest.mark.parametrize("rankdir", ["TB", "LR"])
def test_edges_point_forward(yolo_page, rankdir):
    """Every producer → consumer pair of the DAG: the consumer starts after the producer ends."""
    pane, pg = yolo_page
    sc = placed(pg, expanded="all", rankdir=rankdir)
    box = {b["id"]: b for b in sc["boxes"] if b["kind"] == "node"}
    producer = {}
    for i, n in enumerate(pane["nodes"]):
        for _, ids in n["out"]:
            for t in ids:
                producer[t] = i
    checked = 0
    for i, n in enumerate(pane["nodes"]):
        for _, ids in n["in"]:
            for t in ids:
                if t in producer:
                    a, b = box[producer[t]], box[i]
                    if rankdir == "TB":
                        assert a["y"] + a["h"] <= b["y"], (pane["nodes"][producer[t]]["name"], n["name"])
                    else:
                        assert a["x"] + a["w"] <= b["x"], (pane["nodes"][producer[t]]["name"], n["name"])
                    checked += 1
    assert checked > 200
    for e in sc["edges"]:                   # and every drawn segment runs down (right)
        if e["arrow"] != "start":
            (x0, y0), (x1, y1) = e["pts"][0], e["pts"][-1]
            assert (y1 >= y0) if rankdir == "TB" else (x1 >= x0)


@pytest.mark.browser
def test_long_edges_are_straight(page, big_path):
    """With name scopes removed the 10k-node encoder is one layer graph; the mask's trunk, which spans
    thousands of ranks, and the residual skips stay on one vertical line almost everywhere."""
    from kiln.viewer.formats.onnx import read
    from kiln.viewer.page import build_pane, page_json
    model = read(big_path)
    for n in model.graph.nodes:
        n.group = ()
    open_offline(page, page_json([build_pane(model)]))
    trunks = page.evaluate("""() => {          // x of every point after the first, per edge with a trunk
        const s = new Kiln.Placer(kilnApp.panes[0].pane, new Set(), new Set(), {weights: true}, "TB").scene(0);
        return s.edges.filter((e) => e.pts.length > 4).map((e) => e.pts.slice(1).map((p) => Math.round(p[0] * 1000) / 1000));
    }""")
    assert trunks
    bends = total = 0
    for xs in trunks:
        total += len(xs) - 1
        bends += sum(1 for a, b in zip(xs, xs[1:]) if a != b)
    assert bends / total < 0.05, (bends, total)
    longest = max(trunks, key=len)
    assert len(longest) > 1000
    assert max(longest) - min(longest) < 1e-6          # the mask's trunk is one straight line


def test_layout_is_deterministic_across_processes(yolo_path):
    """Same file, different hash seeds → the same page data (the page computes the picture from it alone)."""
    code = ("import hashlib,json,sys;from kiln.viewer import documents;"
            "d=documents.build_document(sys.argv[1]);"
            "print(hashlib.sha256(json.dumps(d.page,sort_keys=True).encode()).hexdigest())")
    digests = set()
    for seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code, str(yolo_path)], env=env, capture_output=True, text=True,
                             check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


@pytest.mark.browser
def test_toggles_change_sizes_not_structure(yolo_page):
    _, pg = yolo_page
    plain = placed(pg, expanded="all")
    rich = placed(pg, expanded="all", toggles={"attributes": True, "weights": True, "names": True})
    assert len(plain["boxes"]) == len(rich["boxes"])
    assert rich["height"] > plain["height"]
    assert overlaps([b for b in rich["boxes"] if b["kind"] in ("node", "group")]) == []


@pytest.mark.browser
def test_control_flow_bodies_open_in_place(page, control_flow_path):
    doc = documents.build_document(control_flow_path)
    pane = doc.page["panes"][0]
    owners = sorted(i for i, n in enumerate(pane["nodes"]) if n.get("sub"))
    assert {pane["nodes"][i]["op"] for i in owners} == {"If", "Loop"}
    open_offline(page, doc.page)
    closed = placed(page)
    opened = placed(page, opened=owners)
    bodies = [b for b in opened["boxes"] if b.get("body")]
    assert len(bodies) == 3                        # then, else, loop body
    assert opened["height"] > closed["height"]
    assert overlaps([b for b in opened["boxes"] if b["kind"] in ("node", "group")]) == []
    inner = [b for b in opened["boxes"] if b["kind"] == "node" and pane["nodes"][b["id"]]["g"] > 0]
    assert {pane["nodes"][b["id"]]["op"] for b in inner} >= {"Relu", "Neg", "Sigmoid", "Add"}


def test_structure_json_round_trips(yolo_path):
    doc = documents.build_document(yolo_path)
    text = json.dumps(doc.page)
    assert json.loads(text)["panes"][0]["clusters"][0]["s"]["layers"]
