"""Screenshot of the mini YOLO detector in the viewer, for docs/viewer-yolo.png.

    python benchmarks/viewer_screenshot.py [docs/viewer-yolo.png]
Needs Playwright and Debian's chromium.
"""
from __future__ import annotations

import os
import sys
import tempfile

import onnx

from kiln.viewer import samples, serve
from kiln.viewer.export import CHROMIUM_ARGS, find_chromium


def main(argv: list[str]) -> int:
    from playwright.sync_api import sync_playwright
    out = argv[0] if argv else os.path.join(os.path.dirname(__file__), "..", "docs", "viewer-yolo.png")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "yolov5-mini.onnx")
        onnx.save(samples.mini_yolo(), path)
        server = serve(path, open_browser=False)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000}, device_scale_factor=1)
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']", state="attached")
            # the detection head: three 1x1 convolutions decoded into boxes
            idx = page.evaluate("kilnApp.panes[0].pane.nodes.findIndex(n => n.name === '/model.24/m.1/Conv')")
            page.evaluate(f"kilnApp.goToNode(0, {idx})")
            page.wait_for_timeout(500)
            page.evaluate("""() => { const v = kilnApp.panes[0].view, s = kilnApp.panes[0].scene;
                const b = s.boxes[v.nodeBox.get(%d)], end = s.boxes[s.boxes.length - 1]; v.k = 0.8;
                v.tx = v.size()[0] / 2 - (b.x + b.w / 2) * v.k; v.ty = v.size()[1] - 40 - (end.y + end.h) * v.k;
                v.apply(); v.renderNow(); }""" % idx)
            page.fill("#find", "Concat")
            page.wait_for_timeout(300)
            page.evaluate("document.getElementById('find').blur()")
            page.wait_for_timeout(300)
            page.screenshot(path=out)
            browser.close()
        server.stop()
    print(f"wrote {os.path.normpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
