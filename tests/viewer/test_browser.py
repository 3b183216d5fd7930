"""The page in headless Chromium (Debian's chromium, driven by Playwright): drawing, sidebar, search, groups,
subgraphs, keyboard, export (the page's own and headless, which must be the same picture), the offline HTML file
and the error page."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from viewer_testing import settle, wait_ready

from kiln.viewer import serve, view

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def yolo_server(yolo_path):
    s = serve(yolo_path, open_browser=False)
    yield s
    s.stop()


def open_page(page, url):
    page.goto(url)
    wait_ready(page)
    assert page.errors == []


def drawn_nodes(page) -> int:
    return page.locator(".kg .nodes .node").count()


def test_opens_model_and_draws_every_node(page, yolo_server, tmp_path):
    open_page(page, yolo_server.url)
    assert page.title().startswith("yolo.onnx")
    page.evaluate("kilnApp.panes[0].view.fit(); kilnApp.panes[0].view.renderNow()")
    assert drawn_nodes(page) == 217                     # 215 nodes + the input and output
    assert page.locator(".kg .frames .frame").count() > 50
    page.screenshot(path=str(tmp_path / "yolo.png"))
    assert (tmp_path / "yolo.png").stat().st_size > 10_000


def test_click_node_shows_sidebar(page, yolo_server):
    open_page(page, yolo_server.url)
    idx = page.evaluate("kilnApp.panes[0].pane.nodes.findIndex(n => n.name === '/model.24/m.0/Conv')")
    page.evaluate(f"kilnApp.goToNode(0, {idx})")
    page.wait_for_timeout(400)
    page.click(f".kg .node[data-node='{idx}']")
    side = page.inner_text("#side-body")
    assert "Conv" in side and "/model.24/m.0/Conv" in side and "model.24.m.0.weight" in side
    assert "kernel_shape" in side and "DOCUMENTATION" in side.upper()
    assert "1×255×80×80" in side                         # output shape
    page.click("#side-body [data-weight]")
    page.wait_for_selector("#side-body .stats")
    side = page.inner_text("#side-body")
    assert "MIN" in side.upper() and "STD" in side.upper() and "255×64×1×1" in side
    href = page.get_attribute("#side-body a.button", "href")
    assert href.startswith("api/weight.npy?pane=0&index=")


def test_search_by_op_name_and_tensor(page, yolo_server):
    open_page(page, yolo_server.url)
    page.fill("#find", "MaxPool")
    page.wait_for_selector("#results .r")
    assert page.locator("#results .r").count() == 3
    page.press("#find", "Enter")
    page.wait_for_timeout(300)
    sel = page.evaluate("kilnApp.selection")
    assert page.evaluate(f"kilnApp.panes[0].pane.nodes[{sel['id']}].op") == "MaxPool"
    assert page.locator(".kg .node.sel").count() == 1
    page.fill("#find", "output0")
    page.wait_for_selector("#results .r")
    page.press("#find", "Enter")
    page.wait_for_timeout(300)
    sel = page.evaluate("kilnApp.selection")
    assert page.evaluate(f"kilnApp.panes[0].pane.nodes[{sel['id']}].name") in ("/model.24/Concat_3", "output0")


def test_keyboard_follows_edges(page, yolo_server):
    open_page(page, yolo_server.url)
    page.evaluate("kilnApp.goToNode(0, 1)")                 # /model.0/conv/Conv
    page.keyboard.press("ArrowDown")
    page.wait_for_timeout(200)
    op = page.evaluate("kilnApp.panes[0].pane.nodes[kilnApp.selection.id].op")
    assert op in ("Sigmoid", "Mul")
    page.keyboard.press("ArrowUp")
    page.wait_for_timeout(200)
    assert page.evaluate("kilnApp.selection.id") == 1
    page.keyboard.press("Escape")
    assert page.evaluate("kilnApp.selection") is None


def test_toggles_and_direction_relayout(page, yolo_server):
    open_page(page, yolo_server.url)
    h0 = page.evaluate("kilnApp.panes[0].scene.height")
    page.check("#t-attributes")
    h1 = page.evaluate("kilnApp.panes[0].scene.height")
    assert h1 > h0
    page.select_option("#rankdir", "LR")
    w, h = page.evaluate("[kilnApp.panes[0].scene.width, kilnApp.panes[0].scene.height]")
    assert w > h


def test_export_svg_from_page_is_the_headless_export(page, yolo_server, yolo_path, tmp_path):
    """The page's Export menu and `kiln view --export x.svg` draw the same picture, byte for byte."""
    open_page(page, yolo_server.url)
    page.click("#b-export")
    with page.expect_download() as dl:
        page.click("#export-menu [data-fmt='svg']")
    text = open(dl.value.path(), encoding="utf-8").read()
    assert text.startswith("<svg") and text.count('class="node ') == 217
    headless = view(yolo_path, export=tmp_path / "yolo.svg").read_text(encoding="utf-8")
    assert headless == text


def test_expand_and_collapse_group_in_place(page, big_path):
    s = serve(big_path, open_browser=False)
    try:
        open_page(page, s.url)
        app = "kilnApp.panes[0]"
        collapsed = page.evaluate(f"{app}.pane.clusters.findIndex((c, i) => c.kind === 'group' && !{app}.expanded.has(i))")
        assert collapsed > 0
        boxes = page.evaluate(f"{app}.scene.boxes.length")
        page.evaluate(f"{app}.view.reveal('cluster', {collapsed})")
        page.evaluate(f"{app}.view.renderNow()")
        assert page.evaluate(f"{app}.pane.clusters[{collapsed}].s") is None      # laid out when it opens
        page.click(f".kg .group[data-cluster='{collapsed}'] .toggle")
        settle(page)
        assert page.evaluate(f"{app}.expanded.has({collapsed})")
        assert page.evaluate(f"{app}.scene.boxes.length") > boxes
        assert page.locator(f".kg .frame[data-cluster='{collapsed}']").count() == 1
        page.click(f".kg .frame[data-cluster='{collapsed}'] .toggle")
        assert page.evaluate(f"{app}.scene.boxes.length") == boxes
        assert page.errors == []
    finally:
        s.stop()


def test_large_graph_is_virtualised_and_pans_quickly(page, big_path):
    s = serve(big_path, open_browser=False)
    try:
        open_page(page, s.url)
        page.click("#b-expand")                              # every one of the ~10,000 nodes laid out
        settle(page)
        stats = page.evaluate("""() => {
            const ps = kilnApp.panes[0], v = ps.view;
            v.k = 0.8; v.apply(); v.renderNow();
            const t0 = performance.now();
            for (let i = 0; i < 40; i++) { v.ty -= 300; v.apply(); v.renderNow(); }
            const pan = (performance.now() - t0) / 40;
            return {pan, layout: ps.layoutMs, drawn: document.querySelectorAll('.kg .nodes .node').length,
                    boxes: ps.scene.boxes.length};
        }""")
        assert stats["boxes"] > 10_000 and stats["drawn"] < 600
        assert stats["pan"] < 60, stats
        assert stats["layout"] < 3000, stats
    finally:
        s.stop()


def test_subgraphs_open_in_place(page, control_flow_path):
    s = serve(control_flow_path, open_browser=False)
    try:
        open_page(page, s.url)
        idx = page.evaluate("kilnApp.panes[0].pane.nodes.findIndex(n => n.op === 'If')")
        page.click(f".kg .node[data-node='{idx}'] .more")
        settle(page)                                         # the server lays the bodies out when they open
        assert page.locator(".kg .frame.body").count() == 2
        assert {"Relu", "Neg", "Sigmoid"} <= set(page.eval_on_selector_all(".kg .node .op", "els => els.map(e => e.textContent)"))
    finally:
        s.stop()


def test_exported_html_works_offline_from_disk(browser, yolo_path, tmp_path):
    out = view(yolo_path, export=tmp_path / "yolo.html")
    ctx = browser.new_context(offline=True, viewport={"width": 1200, "height": 800})
    requests = []
    ctx.route("**/*", lambda route: (requests.append(route.request.url),
                                     route.continue_() if route.request.url.startswith("file:") else route.abort()))
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(out.as_uri())
    wait_ready(pg)
    assert errors == [] and all(u.startswith(("file:", "data:", "blob:")) for u in requests), requests
    pg.evaluate("kilnApp.panes[0].view.fit(); kilnApp.panes[0].view.renderNow()")
    assert pg.locator(".kg .nodes .node").count() == 217
    pg.evaluate("kilnApp.goToNode(0, 1)")
    pg.click("#side-body [data-weight]")
    assert "MAX" in pg.inner_text("#side-body").upper()
    ctx.close()


def test_exported_html_expands_collapses_and_toggles_offline(browser, yolo_path, tmp_path):
    """The layout runs in the page, so the file from disk relays out with no server and no network."""
    out = view(yolo_path, export=tmp_path / "yolo.html")
    ctx = browser.new_context(offline=True, viewport={"width": 1200, "height": 800})
    ctx.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort())
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(out.as_uri())
    wait_ready(pg)
    app = "kilnApp.panes[0]"
    group = pg.evaluate(f"{app}.pane.clusters.findIndex((c) => c.kind === 'group' && c.size === 3)")   # a conv block
    boxes, height = pg.evaluate(f"[{app}.scene.boxes.length, {app}.scene.height]")
    pg.evaluate(f"{app}.view.reveal('cluster', {group}); {app}.view.renderNow()")
    pg.click(f".kg .frame[data-cluster='{group}'] .toggle")                   # collapse
    assert pg.locator(f".kg .group[data-cluster='{group}']").count() == 1
    assert pg.evaluate(f"{app}.scene.boxes.length") < boxes
    pg.click(f".kg .group[data-cluster='{group}'] .toggle")                   # and open again
    assert pg.evaluate(f"[{app}.scene.boxes.length, {app}.scene.height]") == [boxes, height]
    pg.check("#t-attributes")
    assert pg.evaluate(f"{app}.scene.height") > height
    pg.select_option("#rankdir", "LR")
    w, h = pg.evaluate(f"[{app}.scene.width, {app}.scene.height]")
    assert w > h and errors == []
    ctx.close()


def test_error_page_for_a_file_that_broke(page, yolo_path, tmp_path):
    path = tmp_path / "model.onnx"
    shutil.copy(yolo_path, path)
    s = serve(path, open_browser=False)
    try:
        path.write_bytes(np.random.default_rng(0).bytes(5000))
        page.goto(s.url)
        wait_ready(page)
        assert page.is_visible("#error")
        text = page.inner_text("#error")
        assert "model.onnx" in text and "Traceback" not in text and page.errors == []
    finally:
        s.stop()


def test_engine_and_model_side_by_side(page, yolo_path, tmp_path):
    import kiln
    try:
        engine = kiln.build(kiln.onnx.parse(str(yolo_path)), kiln.BuildConfig(device="cpu"))
        engine.save(str(tmp_path / "yolo.kiln"))
    except Exception as exc:
        pytest.skip(f"kiln.build is not usable here: {exc}")
    prof = {"device": "cpu", "total_ms": 10.0, "layers": [{"name": "/model.0/conv/Conv", "kind": "Convolution",
                                                          "tactic": "torch", "precision": "fp32", "ms": 4.0}]}
    (tmp_path / "prof.json").write_text(json.dumps(prof))
    s = serve(yolo_path, open_browser=False, engine=tmp_path / "yolo.kiln", profile=tmp_path / "prof.json")
    try:
        open_page(page, s.url)
        assert page.locator(".pane").count() == 2
        idx = page.evaluate("kilnApp.panes[0].pane.nodes.findIndex(n => n.name === '/model.0/conv/Conv')")
        page.evaluate(f"kilnApp.goToNode(0, {idx})")
        settle(page)
        page.wait_for_timeout(500)
        linked = page.evaluate("Array.from(kilnApp.panes[1].view.marks.linked).map(i => kilnApp.panes[1].pane.nodes[i].name)")
        assert sorted(linked) == ["/model.0/act/Mul", "/model.0/act/Sigmoid", "/model.0/conv/Conv"]
        assert page.locator(".pane:nth-child(2) .kg .node.linked").count() == 3
        page.click("#b-profile")
        assert page.locator("#side-body .rank tr").count() == 1
        assert page.locator(".kg .node .heat").count() >= 1
    finally:
        s.stop()


def test_png_export(yolo_path, tmp_path, browser):
    out = view(yolo_path, export=tmp_path / "yolo.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_names_are_text_never_markup(page, tmp_path):
    import onnx
    from onnx import TensorProto, helper
    evil = '<img src=x onerror="window.pwned=1">'
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["</script><script>window.pwned=2</script>"], name=evil),
         helper.make_node("Neg", ["</script><script>window.pwned=2</script>"], ["y"], name="n2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(g), tmp_path / "evil.onnx")
    out = view(tmp_path / "evil.onnx", export=tmp_path / "evil.html")
    page.goto(out.as_uri())
    wait_ready(page)
    page.evaluate("kilnApp.goToNode(0, 1)")
    page.click("#b-model")
    page.evaluate("kilnApp.select(0, {kind: 'node', id: 1})")
    assert evil in page.inner_text("#side-body")
    assert page.evaluate("window.pwned") is None and page.errors == []


def test_model_properties_panel(page, yolo_server):
    open_page(page, yolo_server.url)
    page.click("#b-model")
    text = page.inner_text("#side-body")
    for fact in ("ONNX", "pytorch 2.4.0", "opset 17", "images", "output0", "1×3×640×640", "215"):
        assert fact in text, fact
    assert "parameters" in text and (" M" in text or " K" in text)
