"""Headless drawing: a placed scene → one SVG document, the same markup the page builds.

``static/view.js`` draws the same elements with the same classes, and both use
``static/graph.css``; change the two together.
"""
from __future__ import annotations

from html import escape
from importlib import resources

from kiln.viewer.placement import METRICS, box_content

_R = 5          # node corner radius


def _f(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def path_d(pts: list[tuple[float, float]], lr: bool) -> str:
    """Smooth path through the points, tangent to the rank direction at each point."""
    x0, y0 = pts[0]
    d = [f"M{_f(x0)},{_f(y0)}"]
    for (px, py), (qx, qy) in zip(pts, pts[1:]):
        if (lr and py == qy) or (not lr and px == qx):
            d.append(f"L{_f(qx)},{_f(qy)}")
        elif lr:
            mx = (px + qx) / 2
            d.append(f"C{_f(mx)},{_f(py)} {_f(mx)},{_f(qy)} {_f(qx)},{_f(qy)}")
        else:
            my = (py + qy) / 2
            d.append(f"C{_f(px)},{_f(my)} {_f(qx)},{_f(my)} {_f(qx)},{_f(qy)}")
    return "".join(d)


def head_path(w: float, h: float, full: bool) -> str:
    r = _R
    if full:
        return (f"M0,{r}a{r},{r} 0 0 1 {r},-{r}h{_f(w - 2 * r)}a{r},{r} 0 0 1 {r},{r}v{_f(h - 2 * r)}"
                f"a{r},{r} 0 0 1 -{r},{r}h-{_f(w - 2 * r)}a{r},{r} 0 0 1 -{r},-{r}z")
    return f"M0,{r}a{r},{r} 0 0 1 {r},-{r}h{_f(w - 2 * r)}a{r},{r} 0 0 1 {r},{r}v{_f(h - r)}h-{_f(w)}z"


def _row(kind: str, text: str) -> str:
    if kind in ("weight", "attr"):
        for sep in (" = ", " ⟨"):
            k = text.find(sep)
            if k > 0:
                return f'<tspan class="k">{escape(text[:k])}</tspan>{escape(text[k:])}'
    return escape(text)


def heat_color(frac: float) -> str:
    """Light yellow (fast) to red (slow), as heatColor in view.js."""
    t = max(0.0, min(1.0, frac))
    return f"hsl({_f(48 - 48 * t)},{_f(90)}%,{_f(72 - 32 * t)}%)"


def node_svg(pane: dict, idx: int, b: dict, toggles: dict, cls: str = "", profile_max: float = 0.0) -> str:
    node = pane["nodes"][idx]
    head, rows = box_content(node, toggles)
    m = METRICS
    w, h = b["w"], b["h"]
    kind = " pseudo" if node.get("pseudo") else ""
    out = [f'<g class="node cat-{escape(node["cat"])}{kind}{cls}" data-node="{idx}" '
           f'transform="translate({_f(b["x"])},{_f(b["y"])})">',
           f'<title>{escape(node["name"] or node["op"])}</title>',
           f'<rect class="box" width="{_f(w)}" height="{_f(h)}" rx="{_R}"/>',
           f'<path class="head" d="{head_path(w, m["headH"], not rows)}"/>',
           f'<text class="op" x="{_f(w / 2)}" y="{_f(m["headH"] / 2)}">{escape(head)}</text>']
    if node.get("sub"):
        out.append(f'<text class="more" x="{_f(w - 6)}" y="{_f(m["headH"] / 2)}">{"−" if b.get("open") else "+"}</text>')
    for i, (rk, text) in enumerate(rows):
        y = m["headH"] + m["rowPad"] / 2 + i * m["rowH"] + m["rowH"] / 2
        out.append(f'<text class="row {rk}" x="{m["padX"]}" y="{_f(y)}">{_row(rk, text)}</text>')
    ov = node.get("ov") or {}
    if ov.get("time_ms") is not None and profile_max:
        out.append(f'<rect class="heat" x="1" y="{_f(h - 5)}" width="{_f(w - 2)}" height="4" rx="2" '
                   f'fill="{heat_color(ov["time_ms"] / profile_max)}"/>')
    out.append("</g>")
    return "".join(out)


def group_svg(pane: dict, b: dict, cls: str = "") -> str:
    c = pane["clusters"][b["id"]]
    m = METRICS
    w, h = b["w"], b["h"]
    return (f'<g class="group{cls}" data-cluster="{b["id"]}" transform="translate({_f(b["x"])},{_f(b["y"])})">'
            f'<title>{escape(c["path"] or c["name"])}</title><rect class="stack" x="4" y="4" width="{_f(w)}" height="{_f(h)}" rx="6"/>'
            f'<rect class="box" width="{_f(w)}" height="{_f(h)}" rx="6"/>'
            f'<text class="title" x="{m["padX"]}" y="{_f(m["headH"] / 2 + 1)}">{escape(c["name"])}</text>'
            f'<text class="count" x="{m["padX"]}" y="{_f(m["headH"] + m["rowH"] / 2)}">{c["size"]} nodes</text>'
            f'<text class="toggle" x="{_f(w - 7)}" y="{_f(m["headH"] / 2 + 1)}">+</text></g>')


def frame_svg(pane: dict, b: dict, cls: str = "") -> str:
    c = pane["clusters"][b["id"]]
    m = METRICS
    body = " body" if b.get("body") else ""
    toggle = "" if body else f'<text class="toggle" x="{_f(b["w"] - 7)}" y="{_f(m["groupHead"] / 2)}">−</text>'
    return (f'<g class="frame{body}{cls}" data-cluster="{b["id"]}" transform="translate({_f(b["x"])},{_f(b["y"])})">'
            f'<rect class="box" width="{_f(b["w"])}" height="{_f(b["h"])}" rx="8"/>'
            f'<text class="title" x="10" y="{_f(m["groupHead"] / 2)}">{escape(c["name"])}</text>{toggle}</g>')


def bodies_svg(b: dict) -> str:
    return (f'<g class="bodies" transform="translate({_f(b["x"])},{_f(b["y"])})">'
            f'<rect class="box" width="{_f(b["w"])}" height="{_f(b["h"])}" rx="4"/></g>')


def edge_svg(pane: dict, e: dict, lr: bool) -> str:
    marker = {"end": ' marker-end="url(#kg-arrow)"', "start": ' marker-start="url(#kg-arrow)"'}.get(e["arrow"], "")
    out = f'<g class="edge"><path d="{path_d(e["pts"], lr)}"{marker}/>'
    if e.get("label"):
        x, y, anchor = e["label"]
        out += f'<text x="{_f(x)}" y="{_f(y)}" text-anchor="{anchor}">{escape(pane["tensors"][e["t"]][1])}</text>'
    return out + "</g>"


def stylesheet() -> str:
    return resources.files("kiln.viewer").joinpath("static/graph.css").read_text(encoding="utf-8")


def svg(pane: dict, scene: dict, toggles: dict, rankdir: str = "TB", margin: float = 24,
        decorate=None, profile_max: float = 0.0) -> str:
    """A standalone SVG document of the scene (``decorate(box) -> css class suffix`` adds overlays)."""
    lr = rankdir == "LR"
    w, h = scene["width"] + 2 * margin, scene["height"] + 2 * margin
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="kg" width="{_f(w)}" height="{_f(h)}" '
             f'viewBox="{_f(-margin)} {_f(-margin)} {_f(w)} {_f(h)}">',
             f"<style>{stylesheet()}</style>",
             '<defs><marker id="kg-arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path class="arrowhead" d="M0,0L10,5L0,10z"/></marker></defs>',
             f'<rect x="{_f(-margin)}" y="{_f(-margin)}" width="{_f(w)}" height="{_f(h)}" fill="#ffffff"/>']
    for b in scene["boxes"]:
        if b["kind"] == "frame":
            parts.append(frame_svg(pane, b))
        elif b["kind"] == "bodies":
            parts.append(bodies_svg(b))
    for e in scene["edges"]:
        parts.append(edge_svg(pane, e, lr))
    for b in scene["boxes"]:
        cls = decorate(b) if decorate else ""
        if b["kind"] == "node":
            parts.append(node_svg(pane, b["id"], b, toggles, cls, profile_max))
        elif b["kind"] == "group":
            parts.append(group_svg(pane, b, cls))
    parts.append("</svg>")
    return "\n".join(parts)
