"""Helpers shared by the viewer tests (imported by name; tests/viewer is on sys.path)."""
from __future__ import annotations

import http.client

from kiln.viewer import documents
from kiln.viewer.placement import Placer


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


def scene(path, expanded: str = "default", rankdir: str = "TB", toggles: dict | None = None):
    doc = documents.build_document(path, rankdir=rankdir)
    pane = doc.page["panes"][0]
    if expanded == "default":
        exp = set(pane["expanded"])
    elif expanded == "all":
        exp = {i for i, c in enumerate(pane["clusters"]) if c["kind"] == "group"}
    else:
        exp = set()
    return pane, Placer(pane, exp, toggles=toggles, rankdir=rankdir).scene()


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


def get(server, path: str, host: str | None = None, method: str = "GET"):
    """A raw request: the path goes out exactly as given (no client-side normalisation)."""
    h, port = server.server_address[:2]
    conn = http.client.HTTPConnection(h, port, timeout=10)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host or f"127.0.0.1:{port}")
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), body
