"""Time to an interactive page in headless Chromium, the way PERF.md's viewer anchor measures Netron.

For each size (BERT-like encoders from kiln.viewer.samples) it starts `kiln view`'s server, opens the page
and reports seconds from starting the server (file read + layout structure in Python) until every visible
box is laid out and drawn:
  grouped   the view that opens first (name-scope groups collapsed when the graph is large)
  expanded  grouped, then "Expand all" (every node laid out and drawn at 80% zoom)
  flat      the same graph with its name scopes stripped: one layer graph, everything laid out at once
and the mean time of one 300 px pan of the expanded view (virtualised rendering).

    python benchmarks/viewer_page.py [--sizes 1000,5000,10000,50000]
Needs Playwright and Debian's chromium (set KILN_CHROMIUM for another path).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import onnx

from kiln.viewer import page as pagemod
from kiln.viewer import samples, serve
from kiln.viewer.export import CHROMIUM_ARGS, find_chromium

PAN = """() => { const v = kilnApp.panes[0].view; v.k = 0.8; v.apply(); v.renderNow();
  const t0 = performance.now(); for (let i = 0; i < 20; i++) { v.ty -= 300; v.apply(); v.renderNow(); }
  return (performance.now() - t0) / 20; }"""


def open_timed(browser, path: str) -> tuple[float, object, object]:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    t0 = time.perf_counter()
    server = serve(path, open_browser=False)
    page.goto(server.url)
    page.wait_for_selector("body[data-ready='1']", state="attached", timeout=600_000)
    return time.perf_counter() - t0, server, page


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import sync_playwright
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,5000,10000,50000")
    args = ap.parse_args(argv)
    pagemod.FREEZE_AFTER_BUILD = True        # as `kiln view` does
    print(f"{'nodes':>7} {'grouped s':>9} {'expanded s':>10} {'flat s':>7} {'pan ms':>7}")
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
        for n in (int(s) for s in args.sizes.split(",")):
            model = samples.transformer(n)
            path = os.path.join(tmp, f"m{n}.onnx")
            onnx.save(model, path)
            for node in model.graph.node:
                node.name = node.name.rsplit("/", 1)[-1] + f"_{id(node) % 100000}"
            flat_path = os.path.join(tmp, f"flat{n}.onnx")
            onnx.save(model, flat_path)
            grouped, server, page = open_timed(browser, path)
            t0 = time.perf_counter()
            page.click("#b-expand")
            while not page.evaluate("kilnApp.busy === 0"):
                page.wait_for_timeout(20)
            page.evaluate("kilnApp.panes[0].view.renderNow()")
            expanded = grouped + time.perf_counter() - t0
            pan = page.evaluate(PAN)
            page.close()
            server.stop()
            flat, server, page = open_timed(browser, flat_path)
            page.close()
            server.stop()
            print(f"{len(model.graph.node):>7} {grouped:>9.2f} {expanded:>10.2f} {flat:>7.2f} {pan:>7.1f}", flush=True)
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
