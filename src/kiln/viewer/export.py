"""Headless export: one self-contained interactive HTML file, and SVG and PNG pictures drawn by that page.

The HTML file inlines the page's CSS and scripts and embeds the page data, so it
opens from disk with the network off. Layout and drawing have one implementation,
the page's (``static/layout.js``, ``static/view.js``): SVG and PNG export open the
HTML file in headless Chromium through Playwright and ask the page for its
picture (``kilnApp.picture``), so an export is exactly what the page draws.
"""
from __future__ import annotations

import atexit
import base64
import os
import pathlib
import queue
import re
import shutil
import tempfile
import threading
from importlib import resources
from typing import Any, Callable

from kiln.errors import ViewerError
from kiln.viewer import page as pagemod
from kiln.viewer import weights

STATIC = {"index.html": "text/html; charset=utf-8", "graph.css": "text/css; charset=utf-8",
          "app.css": "text/css; charset=utf-8", "coords.js": "text/javascript; charset=utf-8", "layout.js": "text/javascript; charset=utf-8",
          "view.js": "text/javascript; charset=utf-8", "panels.js": "text/javascript; charset=utf-8",
          "app.js": "text/javascript; charset=utf-8", "diff.css": "text/css; charset=utf-8",
          "diff.js": "text/javascript; charset=utf-8"}
FORMATS = (".svg", ".png", ".html", ".htm")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PAGE_TIMEOUT_S = 300          # the page of a 50,000-node model draws in well under a minute
INSTALL = ("SVG and PNG export draw the graph in headless Chromium: `pip install kiln[viewer]` (Playwright) and "
           "`apt-get install chromium` (or `playwright install chromium`), or export .html instead.")


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


def _first_line(exc: BaseException | str) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class _Chromium:
    """One headless Chromium per process, driven by one worker thread: Playwright's sync API belongs to the
    thread that started it and refuses to start where an event loop runs (Jupyter). Started on first use,
    closed at exit."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.failure = ""                 # why the worker stopped, when it did

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(browser)`` on the worker thread; its result, or its exception raised here."""
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            raise ViewerError(INSTALL) from None
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                if self.thread is None:
                    atexit.register(self.close)
                self.thread = threading.Thread(target=self._work, name="kiln-chromium", daemon=True)
                self.thread.start()
            thread = self.thread
        box: dict = {}
        done = threading.Event()
        self.jobs.put((fn, box, done))
        while not done.wait(0.2):
            if not thread.is_alive():
                raise ViewerError(f"headless Chromium stopped{self.failure}. {INSTALL}")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _work(self) -> None:
        from playwright.sync_api import sync_playwright
        job = None
        try:
            with sync_playwright() as p:
                browser = None
                try:
                    while (job := self.jobs.get()) is not None:
                        fn, box, done = job
                        try:
                            if browser is None or not browser.is_connected():
                                browser = _launch(p)
                            box["value"] = fn(browser)
                        except BaseException as exc:        # handed to the calling thread
                            box["error"] = exc
                        done.set()
                        job = None
                finally:
                    if browser is not None:
                        browser.close()
        except BaseException as exc:
            self.failure = f" ({_first_line(exc)})"
            if job is not None:
                job[1]["error"] = ViewerError(f"headless Chromium failed{self.failure}. {INSTALL}")
                job[2].set()

    def close(self) -> None:
        thread = self.thread
        if thread is not None and thread.is_alive():
            self.jobs.put(None)
            thread.join(timeout=10)


def _launch(p):
    try:
        return p.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
    except Exception as exc:
        raise ViewerError(f"could not start headless Chromium ({_first_line(exc)}). {INSTALL}") from None


CHROMIUM = _Chromium()


def _draw(html_path: pathlib.Path, fmt: str, pane_index: int) -> Any:
    def job(browser):
        ctx = browser.new_context(viewport={"width": 1400, "height": 900}, offline=True)
        try:
            pg = ctx.new_page()
            errors: list[str] = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.goto(html_path.as_uri())
            try:
                pg.wait_for_selector("body[data-ready='1'], #error:not([hidden])", state="attached",
                                     timeout=PAGE_TIMEOUT_S * 1000)
            except Exception:
                raise ViewerError(f"the page did not finish drawing within {PAGE_TIMEOUT_S} s; export .html "
                                  f"instead.") from None
            if errors:
                raise ViewerError(f"the page failed while drawing ({_first_line(errors[0])}).")
            if pg.evaluate("document.body.dataset.ready") != "1":
                raise ViewerError(pg.evaluate("kilnApp.error || 'the page could not draw the model.'"))
            try:
                return pg.evaluate("([fmt, pi]) => kilnApp.picture(fmt, pi)", [fmt, pane_index])
            except Exception as exc:
                raise ViewerError(f"the page could not make the {fmt.upper()} picture ({_first_line(exc)}); export "
                                  f".html instead.") from None
        finally:
            ctx.close()
    return CHROMIUM.call(job)


def picture(page: dict, fmt: str = "svg", *, pane: int = 0, toggles: dict | None = None,
            expanded: set[int] | None = None) -> str | bytes:
    """What the page draws first for pane ``pane`` (every cluster's structure must be in the page data):
    SVG text, or PNG bytes. ``expanded`` (cluster ids) and ``toggles`` replace the page's first view."""
    if fmt not in ("svg", "png"):
        raise ValueError(f"fmt must be 'svg' or 'png', not {fmt!r}")
    panes = list(page["panes"])
    if expanded is not None:
        panes[pane] = dict(panes[pane], expanded=sorted(expanded))
    data = dict(page, panes=panes, server=False, headless=True)
    if toggles is not None:
        data["toggles"] = dict(toggles)
    with tempfile.TemporaryDirectory(prefix="kiln-export-") as tmp:
        path = pathlib.Path(tmp, "page.html")
        path.write_text(html_document(data), encoding="utf-8")
        out = _draw(path, fmt, pane)
    if fmt == "svg":
        return out
    head, _, b64 = out.partition(",")
    if head != "data:image/png;base64":
        raise ViewerError("the page could not rasterise the graph (the picture may be too large); export .svg "
                          "instead.")
    return base64.b64decode(b64)


def svg_text(page: dict, pane_index: int = 0, toggles: dict | None = None) -> str:
    """The picture the page shows first, as an SVG document."""
    return picture(page, "svg", pane=pane_index, toggles=toggles)


def export(page: dict, panes: list[pagemod.Pane], out: str | os.PathLike, *, toggles: dict | None = None) -> pathlib.Path:
    """Write ``out`` as .svg, .png or .html (by its suffix)."""
    out = pathlib.Path(out)
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise ViewerError(f"cannot export to {out.name!r}: the file name must end in .svg, .png or .html.")
    if not out.parent.exists():
        raise ViewerError(f"cannot write {str(out)!r}: the folder {str(out.parent)!r} does not exist.")
    for p in panes:
        p.complete()
    page = dict(page, panes=[p.data for p in panes], server=False)
    if suffix in (".html", ".htm"):
        add_weight_stats(panes)
        out.write_text(html_document(page), encoding="utf-8")
    elif suffix == ".svg":
        out.write_text(picture(page, "svg", toggles=toggles), encoding="utf-8")
    else:
        out.write_bytes(picture(page, "png", toggles=toggles))
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
