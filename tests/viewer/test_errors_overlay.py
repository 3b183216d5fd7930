"""`kiln view --errors`: per-tensor accuracy errors (kiln compare --per-layer) coloured onto the graph.

The model and its error report are written by hand here, independent of kiln.compare."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from viewer_testing import wait_ready

from kiln.viewer import accuracy, command, documents, serve
from kiln.viewer.export import picture, svg_text

RED_END, GREEN_END = "#af1d1d", "#189518"          # accuracy.color(1) and color(0)


def tiny_model() -> onnx.ModelProto:
    """x → MatMul → Add → Relu (scope "enc", a group) → Exp → Mul(Exp, Relu) → y."""
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    b = numpy_helper.from_array(np.ones(4, dtype=np.float32), "B")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["t0"], name="/enc/MatMul"),
             helper.make_node("Add", ["t0", "B"], ["t1"], name="/enc/Add"),
             helper.make_node("Relu", ["t1"], ["t2"], name="/enc/Relu"),
             helper.make_node("Exp", ["t2"], ["t3"], name="/head/Exp"),
             helper.make_node("Mul", ["t3", "t2"], ["y"], name="/head/Mul")]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w, b])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def record(tensor, node, op, rel_l2, passed, **extra) -> dict:
    rec = {"tensor": tensor, "node": node, "op": op, "max_abs": rel_l2 * 10, "mean_abs": rel_l2, "max_rel": rel_l2 * 5,
           "rel_l2": rel_l2, "growth": 1.0, "passed": passed, "ref_range": [-1.0, 1.0], "kiln_range": [-1.0, 1.0]}
    rec.update(extra)
    return rec


def tiny_report(**over) -> dict:
    rep = {"format": "kiln-compare-errors", "version": 1, "model": "models/tiny.onnx", "metric": "rel_l2",
           "atol": 1e-5, "rtol": 1e-4, "first_bad": {"tensor": "t3", "node": "/head/Exp"},
           "tensors": [record("t0", "/enc/MatMul", "MatMul", 1e-7, True),
                       record("t1", "/enc/Add", "Add", 2e-5, True),
                       record("t2", "renamed_by_an_optimizer", "Relu", 1e-3, True),     # matched by its tensor
                       record("t3", "/head/Exp", "Exp", 1e-1, False, max_abs=math.inf, growth=120.0,
                              ref_range=[-3.0, 88.0], kiln_range=[-3.0, math.inf]),
                       record("gone", "not_in_this_model", "Neg", 0.5, False)]}          # partial match is fine
    rep.update(over)
    return rep


@pytest.fixture
def files(tmp_path):
    onnx.save(tiny_model(), tmp_path / "tiny.onnx")
    (tmp_path / "errs.json").write_text(json.dumps(tiny_report()))      # Python's json: Infinity literals
    assert "Infinity" in (tmp_path / "errs.json").read_text()
    return tmp_path / "tiny.onnx", tmp_path / "errs.json"


def node_index(pane: dict, name: str) -> int:
    return next(i for i, n in enumerate(pane["nodes"]) if n["name"] == name)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = command.main(["view", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# ---- the scale ----

def test_scale_ends_are_green_and_red():
    assert accuracy.position(1e-1, False) == 1.0 and accuracy.color(1.0) == RED_END
    assert accuracy.position(1e-7, False) == 0.0 and accuracy.color(0.0) == GREEN_END
    assert accuracy.position(1e-6, False) == 0.0
    assert accuracy.position(1e-3, False) == pytest.approx(0.6)          # 3 of 5 decades up
    assert accuracy.position(5.0, False) == 1.0
    r, g, b = (int(RED_END[i:i + 2], 16) for i in (1, 3, 5))
    assert r > 150 and g < 50 and b < 50
    r, g, b = (int(GREEN_END[i:i + 2], 16) for i in (1, 3, 5))
    assert g > 130 and r < 40 and b < 40


def test_failed_is_never_green_and_non_finite_is_red():
    assert accuracy.position(1e-9, True) == accuracy.FAILED_FLOOR == 0.75         # orange at least
    r, g, _ = (int(accuracy.color(0.75)[i:i + 2], 16) for i in (1, 3, 5))
    assert r > g
    assert accuracy.position(math.inf, False) == accuracy.position(math.nan, False) == 1.0
    assert accuracy.position(None, True) == 1.0 and accuracy.position(None, False) == 0.0


# ---- matching and the page data ----

def test_nodes_match_by_name_then_output_tensor(files):
    model, errs = files
    page = documents.build_document(model, errors=errs).page
    pane = page["panes"][0]
    nodes = {n["name"]: n for n in pane["nodes"]}
    assert nodes["/enc/MatMul"]["err"]["color"] == GREEN_END and nodes["/enc/MatMul"]["err"]["failed"] is False
    assert nodes["/enc/Relu"]["err"]["recs"][0]["node"] == "renamed_by_an_optimizer"     # found through "t2"
    assert nodes["/enc/Relu"]["err"]["t"] == pytest.approx(0.6)
    exp = nodes["/head/Exp"]["err"]
    assert exp["color"] == RED_END and exp["failed"] and exp["first"]
    assert "err" not in nodes["/head/Mul"] and "err" not in nodes["x"]
    s = page["errors"]
    assert (s["tensors"], s["matched"], s["nodes"], s["failed"]) == (5, 4, 4, 1)
    assert s["first"] == {"node": node_index(pane, "/head/Exp"), "tensor": "t3", "name": "/head/Exp"}
    assert s["metric"] == "rel_l2" and s["model"] == "tiny.onnx" and s["pane"] == 0


def test_non_finite_numbers_reach_the_page_as_strings(files):
    from kiln.viewer.page import dumps
    model, errs = files
    page = documents.build_document(model, errors=errs).page
    rec = next(n for n in page["panes"][0]["nodes"] if n["name"] == "/head/Exp")["err"]["recs"][0]
    assert rec["kiln_range"] == [-3.0, "inf"] and rec["ref_range"] == [-3.0, 88.0] and rec["max_abs"] == "inf"
    assert rec["growth"] == 120.0 and rec["passed"] is False
    text = dumps(page)                                # refuses NaN/Infinity (allow_nan=False)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_group_takes_the_worst_of_its_members(files):
    model, errs = files
    pane = documents.build_document(model, errors=errs).page["panes"][0]
    enc = next(c for c in pane["clusters"] if c["kind"] == "group" and c["name"] == "enc")
    assert enc["err"]["node"] == node_index(pane, "/enc/Relu")
    assert enc["err"]["color"] == accuracy.color(0.6)
    assert (enc["err"]["matched"], enc["err"]["failed"], enc["err"]["first"]) == (3, 0, False)
    root = pane["clusters"][0]["err"]
    assert root["node"] == node_index(pane, "/head/Exp") and root["failed"] == 1 and root["first"]


def test_several_records_on_one_node_show_the_worst(tmp_path):
    g = helper.make_graph([helper.make_node("Split", ["x"], ["a", "b"], name="split", axis=0, num_outputs=2),
                           helper.make_node("Relu", ["a"], ["ya"], name="ra"),
                           helper.make_node("Neg", ["b"], ["yb"], name="nb")], "multi",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("ya", TensorProto.FLOAT, [2]),
                           helper.make_tensor_value_info("yb", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "multi.onnx")
    rep = tiny_report(first_bad=None, tensors=[{"tensor": "a", "rel_l2": 1e-7, "passed": True},
                                               {"tensor": "b", "rel_l2": 1e-2, "passed": True},
                                               {"node": "nb", "rel_l2": 1e-6, "passed": True}])
    (tmp_path / "e.json").write_text(json.dumps(rep))
    page = documents.build_document(tmp_path / "multi.onnx", errors=tmp_path / "e.json").page
    split = next(n for n in page["panes"][0]["nodes"] if n["name"] == "split")["err"]
    assert [r["tensor"] for r in split["recs"]] == ["b", "a"]            # worst first
    assert split["t"] == pytest.approx(0.8) and split["color"] == accuracy.color(0.8)
    assert page["errors"]["first"] is None


# ---- bad input: one line, exit 2, the file named and the fix ----

@pytest.mark.parametrize("content,pattern", [
    (None, r"errors file 'errs\.json' does not exist; write one with kiln compare <model> --per-layer"),
    ("{not json", r"errors file 'errs\.json' is not valid JSON .*kiln compare"),
    (json.dumps({"device": "cpu", "total_ms": 1.0, "layers": [{"name": "a", "ms": 1.0}]}),
     r"'errs\.json' is a profile .*pass it with --profile"),
    (json.dumps({"format": "something-else", "tensors": []}), r"'errs\.json' is not a per-layer error report"),
    (json.dumps(tiny_report(version=2)), r"'errs\.json' has format version 2, but this Kiln reads version 1"),
    (json.dumps(tiny_report(tensors=[{"rel_l2": 1.0}])), r"'errs\.json' has no list of tensors"),
    (json.dumps(tiny_report(tensors=[])), r"'errs\.json' lists no tensors"),
    (json.dumps(tiny_report(model="resnet50.onnx", tensors=[record("conv1", "Conv_0", "Conv", 1e-3, True)])),
     (r"none of the 1 tensors in errors file 'errs\.json' matches a node or tensor of 'tiny\.onnx'; it was written "
      r"for 'resnet50\.onnx'; run kiln compare tiny\.onnx --per-layer on this model\.")),
])
def test_bad_errors_files_are_one_line_errors(capsys, tmp_path, content, pattern):
    onnx.save(tiny_model(), tmp_path / "tiny.onnx")
    if content is not None:
        (tmp_path / "errs.json").write_text(content)
    code, out, err = run(capsys, tmp_path / "tiny.onnx", "--errors", tmp_path / "errs.json",
                         "--export", tmp_path / "x.svg")
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("kiln: error: ")
    assert re.search(pattern, err), err
    assert not (tmp_path / "x.svg").exists()
    code, _, err = run(capsys, tmp_path / "tiny.onnx", "--errors", tmp_path / "errs.json", "--no-browser")
    assert code == 2 and err.count("\n") == 1 and re.search(pattern, err)          # the server refuses too


# ---- export ----

def node_element(svg: str, idx: int) -> str:
    return re.search(rf'<g class="node [^"]*" data-node="{idx}".*?</g>', svg, re.DOTALL).group(0)


def test_export_svg_colours_nodes_and_draws_the_legend(capsys, files, tmp_path):
    model, errs = files
    out = tmp_path / "tiny.svg"
    code, stdout, _ = run(capsys, model, "--errors", errs, "--export", out)
    assert code == 0 and "wrote" in stdout
    svg = out.read_text()
    pane = documents.build_document(model, errors=errs).page["panes"][0]
    exp = node_element(svg, node_index(pane, "/head/Exp"))
    assert f'style="fill:{RED_END}"' in exp and "err-first" in exp and 'class="err-ring"' in exp
    assert "error 0.1 · failed · first failing" in exp                           # the tooltip
    assert f'style="fill:{GREEN_END}"' in node_element(svg, node_index(pane, "/enc/MatMul"))
    mul = node_element(svg, node_index(pane, "/head/Mul"))
    assert f'style="fill:{accuracy.NO_RECORD}"' in mul and "err-ring" not in mul
    assert "style=" not in node_element(svg, node_index(pane, "x"))               # graph inputs keep their look
    legend = re.search(r'<g class="err-legend".*?</g>', svg, re.DOTALL).group(0)
    assert "rel_l2" in legend and "errs.json" in legend and "first failing: /head/Exp" in legend
    assert "≤1e-6" in legend and "≥1e-1" in legend and "4 of 5 tensors" in legend
    for c in accuracy.scale()["colors"]:
        assert f'fill="{c}"' in legend


def test_export_collapsed_group_shows_its_worst_member(files):
    model, errs = files
    page = documents.build_document(model, errors=errs).page
    pane = page["panes"][0]
    svg = picture(page, "svg", expanded=set())
    enc = next(i for i, c in enumerate(pane["clusters"]) if c["name"] == "enc")
    group = re.search(rf'<g class="group[^"]*" data-cluster="{enc}".*?</g>', svg, re.DOTALL).group(0)
    relu = accuracy.color(0.6)
    assert f'style="fill:{relu};stroke:{relu}"' in group and 'class="err-bar"' in group
    assert "worst: /enc/Relu" in group and "0 of 3 compared nodes failed" in group


def test_profile_still_works_beside_errors(files, tmp_path):
    model, errs = files
    prof = {"device": "cpu", "total_ms": 2.0, "layers": [{"name": "/head/Exp", "ms": 1.5}]}
    (tmp_path / "prof.json").write_text(json.dumps(prof))
    doc = documents.build_document(model, errors=errs, profile=tmp_path / "prof.json")
    assert doc.page["profile"]["matched"] == 1 and doc.page["errors"]["matched"] == 4
    svg = svg_text(doc.page)
    assert 'class="heat"' in svg and f'style="fill:{RED_END}"' in svg


def test_without_errors_nothing_changes(files):
    model, _ = files
    page = documents.build_document(model).page
    assert page["errors"] is None and "errors" not in page["panes"][0]
    svg = svg_text(page)
    assert "err-legend" not in svg.split("</style>")[1] and "style=\"fill" not in svg


def test_exported_html_carries_the_report(files, tmp_path):
    model, errs = files
    out = tmp_path / "tiny.html"
    run_code = command.main(["view", str(model), "--errors", str(errs), "--export", str(out)])
    html = out.read_text()
    data = json.loads(re.search(r'<script id="kiln-data" type="application/json">(.*?)</script>', html, re.DOTALL).group(1),
                      parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert run_code == 0 and data["errors"]["first"]["name"] == "/head/Exp"


# ---- in the browser ----

@pytest.mark.browser
def test_page_colours_nodes_shows_legend_and_error_details(page, files):
    model, errs = files
    s = serve(model, errors=errs, open_browser=False)
    try:
        page.goto(s.url)
        wait_ready(page)
        assert page.errors == []
        exp = page.evaluate("kilnApp.panes[0].pane.nodes.findIndex(n => n.name === '/head/Exp')")
        assert page.evaluate("kilnApp.selection") == {"pane": 0, "kind": "node", "id": exp}   # opened on it
        fill = page.eval_on_selector(f".kg .nodes .node[data-node='{exp}'] .head", "el => getComputedStyle(el).fill")
        assert fill == "rgb(175, 29, 29)"                                            # RED_END
        assert page.locator(f".kg .node[data-node='{exp}'] .err-ring").count() == 1
        legend = page.inner_text(".err-legend-box")
        assert "rel_l2" in legend and "first failing: /head/Exp" in legend
        page.keyboard.press("Escape")
        assert page.is_hidden("#side")
        page.click(f".kg .node[data-node='{exp}']")
        side = page.inner_text("#side-body")
        for fact in ("ACCURACY", "FIRST FAILING", "FAIL", "max abs", "inf", "mean abs", "rel L2", "0.1", "growth",
                     "120×", "reference range", "[-3, 88]", "Kiln range", "[-3, inf]"):
            assert fact in side, fact
        page.click("#b-collapse")                                                   # grouped view
        enc = page.evaluate("kilnApp.panes[0].pane.clusters.findIndex(c => c.name === 'enc')")
        stack = page.eval_on_selector(f".kg .group[data-cluster='{enc}'] .stack", "el => getComputedStyle(el).fill")
        assert stack == "rgb(165, 137, 27)"                                         # the colour of /enc/Relu
        page.click(".err-legend-box")
        assert "Nodes by error" in page.inner_text("#side-body") or "NODES BY ERROR" in page.inner_text("#side-body")
        assert page.locator("#side-body .rank tr").count() == 4
        assert page.errors == []
    finally:
        s.stop()
