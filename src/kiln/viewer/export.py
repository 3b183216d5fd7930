"""Headless export: SVG and PNG pictures, and one self-contained interactive HTML file.

The HTML file inlines the page's CSS and scripts and embeds the page data, so it
opens from disk with the network off. PNG rasterizes the SVG in headless
Chromium through Playwright (``pip install playwright`` and a Chromium, e.g.
Debian's ``chromium`` package); nothing else is needed for SVG and HTML.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import threading
from importlib import resources

from kiln.errors import ViewerError
from kiln.viewer import page as pagemod
from kiln.viewer import render, weights
from kiln.viewer.placement import Placer

STATIC = {"index.html": "text/html; charset=utf-8", "graph.css": "text/css; charset=utf-8",
          "app.css": "text/css; charset=utf-8", "coords.js": "text/javascript; charset=utf-8", "layout.js": "text/javascript; charset=utf-8",
          "view.js": "text/javascript; charset=utf-8", "panels.js": "text/javascript; charset=utf-8",
          "app.js": "text/javascript; charset=utf-8"}
FORMATS = (".svg", ".png", ".html", ".htm")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def static_bytes(name: str) -> bytes:
    """One shipped asset, by its exact name (no paths)."""
    if name not in STATIC:
        raise KeyError(name)
    return resources.files("kiln.viewer").joinpath("static", name).read_bytes()


def html_document(page: dict | None = None, *, error: str | None = None, inline: bool = True) -> str:
    """The page; with ``inline`` every asset and the data are inside it (no requests at all)."""
    html = static_bytes("index.html").decode("utf-8")
    if inline:
        def css(m: re.Match) -> str:
            ident = f' id="{m.group(2)}"' if m.group(2) else ""
            return f"<style{ident}>{static_bytes(m.group(1)).decode('utf-8')}</style>"

        def js(m: re.Match) -> str:
            text = static_bytes(m.group(1)).decode("utf-8")
            if "</script" in text.lower():
                raise ViewerError(f"static/{m.group(1)} contains '</script' and cannot be inlined.")
            return f"<script>{text}</script>"

        html = re.sub(r'<link rel="stylesheet" href="static/([\w.]+)"(?: id="([\w-]+)")?>', css, html)
        html = re.sub(r'<script src="static/([\w.]+)"></script>', js, html)
    data = {"error": error} if error is not None else page
    if data is not None:
        html = html.replace('<script id="kiln-data" type="application/json"></script>',
                            '<script id="kiln-data" type="application/json">' + pagemod.dumps(data) + "</script>", 1)
    return html


def scene_for(pane: dict, page: dict, toggles: dict | None = None, expanded: set[int] | None = None) -> tuple:
    placer = Placer(pane, set(pane["expanded"]) if expanded is None else expanded,
                    toggles=toggles, rankdir=page.get("rankdir", "TB"))
    return placer.scene(), placer.toggles


def svg_text(page: dict, pane_index: int = 0, toggles: dict | None = None) -> str:
    """The picture the page shows first, as an SVG document."""
    pane = page["panes"][pane_index]
    scene, toggles = scene_for(pane, page, toggles)
    pmax = max((n["ov"]["time_ms"] for n in pane["nodes"] if n.get("ov", {}).get("time_ms") is not None), default=0.0)
    errors = page.get("errors")
    if errors and errors.get("pane") != pane_index and not pane.get("errors"):
        errors = None          # the legend goes with a coloured pane (an engine is coloured by tensor names)
    return render.svg(pane, scene, toggles, page.get("rankdir", "TB"), profile_max=pmax, errors=errors)


def add_weight_stats(panes: list[pagemod.Pane], budget: int = 256 << 20) -> None:
    """Statistics and previews for the HTML file, which has no server to ask (up to ``budget`` bytes read)."""
    spent = 0
    for p in panes:
        for entry, w in zip(p.data["weights"], p.weights):
            if "stats" in entry:
                continue
            size = w.nbytes or 0
            if spent + size > budget:
                entry["stats"] = {"error": "Values left out of this file to keep it small; open the model with "
                                           "`kiln view` to read them."}
                continue
            spent += size
            try:
                entry["stats"] = weights.stats(w)
            except ViewerError as exc:
                entry["stats"] = {"error": str(exc)}


def find_chromium() -> str | None:
    for path in (os.environ.get("KILN_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
                 shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if path and os.path.exists(path):
            return path
    return None


def rasterize(svg: str, out: pathlib.Path, scale: float = 1.0) -> None:
    """SVG → PNG in headless Chromium (Playwright with the system browser, never a download).

    Runs in a worker thread: Playwright's sync API refuses to start where an event loop is running
    (Jupyter, or a caller already driving a browser)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise ViewerError("PNG export needs Playwright and Chromium: `pip install playwright` and "
                          "`apt-get install chromium` (or export .svg/.html instead).") from None
    result: list[BaseException] = []
    worker = threading.Thread(target=lambda: _screenshot(svg, out, scale, result), name="kiln-png")
    worker.start()
    worker.join()
    if result:
        raise result[0]


def _screenshot(svg: str, out: pathlib.Path, scale: float, result: list) -> None:
    from playwright.sync_api import sync_playwright
    m = re.search(r'width="([\d.]+)" height="([\d.]+)"', svg)
    w, h = (float(m.group(1)), float(m.group(2))) if m else (800.0, 600.0)
    scale = min(scale, 16000 / max(w, h, 1))
    width, height = max(1, int(w * scale)), max(1, int(h * scale))
    try:
        with sync_playwright() as p:
            try:
                browser = p.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
            except Exception as exc:
                raise ViewerError(f"PNG export could not start Chromium ({str(exc).splitlines()[0]}); install it "
                                  f"with `apt-get install chromium` or set KILN_CHROMIUM to its path.") from None
            try:
                ctx = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1,
                                          offline=True)
                page = ctx.new_page()
                page.set_content(f'<html><body style="margin:0;background:#fff">'
                                 f'<div style="transform:scale({scale});transform-origin:0 0">{svg}</div></body></html>')
                page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": width, "height": height})
            finally:
                browser.close()
    except BaseException as exc:        # handed to the calling thread
        result.append(exc)


def export(page: dict, panes: list[pagemod.Pane], out: str | os.PathLike, *, toggles: dict | None = None) -> pathlib.Path:
    """Write ``out`` as .svg, .png or .html (by its suffix)."""
    out = pathlib.Path(out)
    suffix = out.suffix.lower()
    for p in panes:
        p.complete()
    if suffix not in FORMATS:
        raise ViewerError(f"cannot export to {out.name!r}: the file name must end in .svg, .png or .html.")
    if not out.parent.exists():
        raise ViewerError(f"cannot write {str(out)!r}: the folder {str(out.parent)!r} does not exist.")
    if suffix in (".html", ".htm"):
        add_weight_stats(panes)
        page = dict(page, panes=[p.data for p in panes], server=False)
        out.write_text(html_document(page), encoding="utf-8")
    elif suffix == ".svg":
        out.write_text(svg_text(page, 0, toggles), encoding="utf-8")
    else:
        rasterize(svg_text(page, 0, toggles), out, scale=2.0 if len(page["panes"][0]["nodes"]) < 400 else 1.0)
    return out


def export_model(model, out: str | os.PathLike, *, rankdir: str = "TB") -> pathlib.Path:
    """Export a ViewModel (any reader's output) straight to .svg, .png or .html."""
    pane = pagemod.build_pane(model)
    return export(pagemod.page_json([pane], rankdir=rankdir), [pane], out)


def export_svg(model, out: str | os.PathLike) -> pathlib.Path:
    """A ViewModel as an SVG picture."""
    if pathlib.Path(out).suffix.lower() != ".svg":
        raise ViewerError(f"export_svg writes .svg files, not {pathlib.Path(out).name!r}.")
    return export_model(model, out)
