"""PNG export of a big picture: readable (never below 1× while it fits), long or wide pictures cut between boxes into
strips laid side by side, and the page's Export menu and `kiln view --export x.png` make the same file."""
from __future__ import annotations

import base64
import struct

import pytest
from viewer_testing import open_offline

from kiln.viewer import documents, view

pytestmark = pytest.mark.browser


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def inked(page, data: bytes, plan: dict) -> list[int]:
    """Non-white pixels of each strip of a PNG, counted by the browser's own decoder."""
    return page.evaluate("""async ([src, plan]) => {
        const img = new Image(); img.src = src; await img.decode();
        const c = document.createElement("canvas"); c.width = img.width; c.height = img.height;
        const ctx = c.getContext("2d"); ctx.drawImage(img, 0, 0);
        const s = plan.scale, lr = plan.rows, across = (lr ? plan.height : plan.width), n = plan.strips.length;
        const size = (across - (n - 1) * 32 * s) / n;
        return plan.strips.map(([a, b], i) => {
            const off = Math.round(i * (size + 32 * s)), len = Math.floor((b - a) * s);
            const px = lr ? ctx.getImageData(0, off, len, Math.floor(size)).data : ctx.getImageData(off, 0, Math.floor(size), len).data;
            let ink = 0;
            for (let k = 0; k < px.length; k += 4) if (px[k] < 200 || px[k + 1] < 200 || px[k + 2] < 200) ink++;
            return ink;
        });
    }""", ["data:image/png;base64," + base64.b64encode(data).decode(), plan])


@pytest.mark.parametrize("rankdir", ["TB", "LR"])
def test_long_picture_is_cut_into_readable_strips(page, yolo_path, tmp_path, rankdir):
    """The mini YOLO's first view is 15,000 px long: one 16,000-px sliver below 1.1× before; now strips at 2×."""
    doc = documents.build_document(yolo_path, rankdir=rankdir)
    data = view(yolo_path, export=tmp_path / "yolo.png", rankdir=rankdir).read_bytes()
    open_offline(page, doc.page)
    lr = rankdir == "LR"
    plan, boxes = page.evaluate("""async () => {
        const svg = await kilnApp.picture("svg", 0), m = svg.match(/width="([\\d.]+)" height="([\\d.]+)"/);
        const scene = kilnApp.panes[0].scene;
        const pane = kilnApp.panes[0].pane, L = Kiln.layout;
        const labels = scene.edges.filter((e) => e.label).map((e) => {
            const w = L.labelWidth(L.labelText(pane, e.t)), [x, y, anchor] = e.label;
            return {x: anchor === "end" ? x - w : x, y: y - 6, w, h: 12};
        });
        return [Kiln.draw.pngPlan(scene, +m[1], +m[2], pane), scene.boxes.filter((b) => b.kind === "node").concat(labels)];
    }""")
    assert png_size(data) == (plan["width"], plan["height"])
    assert plan["scale"] >= 1 and len(plan["strips"]) >= 3 and plan["rows"] == lr
    assert max(plan["width"], plan["height"]) <= 16000
    assert max(plan["width"], plan["height"]) / min(plan["width"], plan["height"]) <= 3
    for a, b in plan["strips"][1:]:                       # no node and no label is cut in two
        for box in boxes:
            lo, hi = (box["x"], box["x"] + box["w"]) if lr else (box["y"], box["y"] + box["h"])
            assert not lo + 24 < a < hi + 24, (a, box)
    assert all(ink > 1000 for ink in inked(page, data, plan))        # every strip holds part of the drawing


def test_plan_scales_below_1x_only_when_nothing_else_fits(page, yolo_path):
    open_offline(page, documents.build_document(yolo_path).page)
    plans = page.evaluate("""() => {
        const column = {boxes: Array.from({length: 2000}, (_, i) => ({kind: "node", x: 0, y: i * 60, w: 100, h: 30})),
                        width: 100, height: 120000};
        const wide = {boxes: [{kind: "node", x: 0, y: 0, w: 40000, h: 500}], width: 40000, height: 500};
        const broad = {boxes: Array.from({length: 400}, (_, i) => ({kind: "node", x: i * 120, y: 0, w: 100, h: 30})),
                       width: 47980, height: 30};          // one rank of 400 branches, top to bottom
        const small = {boxes: [{kind: "node", x: 0, y: 0, w: 300, h: 200}], width: 300, height: 200};
        const strip = {boxes: Array.from({length: 12}, (_, i) => ({kind: "node", x: i * 150, y: 0, w: 100, h: 30})),
                       width: 1750, height: 30};          // small, if long: left whole
        return [Kiln.draw.pngPlan(column, 148, 120048), Kiln.draw.pngPlan(wide, 40048, 548),
                Kiln.draw.pngPlan(small, 348, 248), Kiln.draw.pngPlan(broad, 48028, 78),
                Kiln.draw.pngPlan(strip, 1798, 78)];
    }""")
    column, wide, small, broad, strip = plans
    assert not column["rows"] and column["scale"] >= 1 and 20 <= len(column["strips"]) <= 40  # ~sqrt(120048 / 148)
    assert max(column["width"], column["height"]) / min(column["width"], column["height"]) < 1.5
    assert all((a - 24) % 60 >= 30 or (a - 24) % 60 == 0 for a, _ in column["strips"][1:])  # cuts between boxes
    assert len(wide["strips"]) == 1 and wide["scale"] == pytest.approx(16000 / 40048) and wide["width"] <= 16000
    assert small == {"scale": 2, "rows": True, "strips": [[0, 348]], "width": 696, "height": 496}
    assert broad["rows"] and broad["scale"] >= 1 and len(broad["strips"]) >= 10
    assert all((a - 24) % 120 >= 100 or (a - 24) % 120 == 0 for a, _ in broad["strips"][1:])
    assert strip == {"scale": 2, "rows": True, "strips": [[0, 1798]], "width": 3596, "height": 156}


def test_page_png_is_the_headless_png(page, yolo_path, tmp_path):
    from kiln.viewer import serve
    s = serve(yolo_path, open_browser=False)
    try:
        page.goto(s.url)
        page.wait_for_selector("body[data-ready='1']", state="attached")
        page.click("#b-export")
        with page.expect_download() as dl:
            page.click("#export-menu [data-fmt='png']")
        mine = open(dl.value.path(), "rb").read()
    finally:
        s.stop()
    assert mine == view(yolo_path, export=tmp_path / "yolo.png").read_bytes()
