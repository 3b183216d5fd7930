"""Helpers shared by the viewer tests (imported by name; tests/viewer is on sys.path)."""
from __future__ import annotations

import http.client
import tempfile
from pathlib import Path

from kiln.viewer import export


def wait_ready(pg, timeout: float = 30_000) -> None:
    """Until the page has drawn its graph, or shown its error page."""
    pg.wait_for_selector("body[data-ready='1'], #error:not([hidden])", state="attached", timeout=timeout)


def settle(pg) -> None:
    """Until the page has fetched what it asked the server for and drawn it."""
    for _ in range(1200):             # polled from here: the page's CSP forbids wait_for_function's eval
        if pg.evaluate("window.kilnApp && kilnApp.busy === 0"):
            return
        pg.wait_for_timeout(50)
    raise TimeoutError("the page stayed busy for 60 s")


def open_offline(pg, page: dict) -> None:
    """Load the self-contained page of ``page`` (a page_json document) from a file, as an exported one opens."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "page.html")
        path.write_text(export.html_document(dict(page, server=False)), encoding="utf-8")
        pg.goto(path.as_uri())
        wait_ready(pg)
    assert pg.evaluate("document.body.dataset.ready") == "1"


def placed(pg, pane: int = 0, expanded: str | list = "default", rankdir: str = "TB", toggles: dict | None = None,
           opened: list | None = None) -> dict:
    """The page's own layout (``Kiln.Placer``) of a loaded pane in the given state: boxes, edges, size.
    ``expanded``: "default" (the pane's first view), "all", "none" or a list of cluster ids."""
    return pg.evaluate("""([pi, exp, opened, toggles, rankdir]) => {
        const ps = kilnApp.panes[pi], clusters = ps.pane.clusters;
        const e = exp === "default" ? ps.pane.expanded : exp === "none" ? []
          : exp === "all" ? clusters.map((c, i) => c.kind === "group" ? i : -1).filter((i) => i >= 0) : exp;
        const t = Object.assign({attributes: false, weights: true, names: false}, toggles || {});
        const s = new Kiln.Placer(ps.pane, new Set(e), new Set(opened), t, rankdir).scene(0);
        return {boxes: s.boxes, width: s.width, height: s.height,
                edges: s.edges.map((g) => ({pts: g.pts, t: g.t, arrow: g.arrow, label: g.label || null}))};
    }""", [pane, expanded, opened or [], toggles, rankdir])


def overlaps(boxes: list[dict]) -> list[tuple[int, int]]:
    """Pairs of overlapping boxes (sweep over x), touching edges allowed."""
    order = sorted(range(len(boxes)), key=lambda i: boxes[i]["x"])
    active: list[int] = []
    out = []
    for i in order:
        b = boxes[i]
        active = [j for j in active if boxes[j]["x"] + boxes[j]["w"] > b["x"] + 1e-6]
        for j in active:
            o = boxes[j]
            if b["y"] < o["y"] + o["h"] - 1e-6 and o["y"] < b["y"] + b["h"] - 1e-6:
                out.append((j, i))
        active.append(i)
    return out


def get(server, path: str, host: str | None = None, method: str = "GET", timeout: float = 10.0):
    """A raw request: the path goes out exactly as given (no client-side normalisation)."""
    h, port = server.server_address[:2]
    conn = http.client.HTTPConnection(h, port, timeout=timeout)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host or f"127.0.0.1:{port}")
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), body
