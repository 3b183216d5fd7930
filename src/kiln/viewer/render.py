"""Headless drawing: a placed scene → one SVG document, the same markup the page builds.

``static/view.js`` draws the same elements with the same classes, and both use
``static/graph.css``; change the two together.
"""
from __future__ import annotations

from html import escape
from importlib import resources

from kiln.viewer.accuracy import NO_RECORD
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


def _err_title(err: dict | None) -> str:
    """The error line of a box's tooltip."""
    if not err:
        return ""
    v = err.get("value")
    shown = f"{v:.3g}" if isinstance(v, float) else str(v)
    return f"\nerror {shown}{' · failed' if err.get('failed') else ''}{' · first failing' if err.get('first') else ''}"


def node_svg(pane: dict, idx: int, b: dict, toggles: dict, cls: str = "", profile_max: float = 0.0) -> str:
    node = pane["nodes"][idx]
    head, rows = box_content(node, toggles)
    m = METRICS
    w, h = b["w"], b["h"]
    kind = " pseudo" if node.get("pseudo") else ""
    err = node.get("err")
    paint = ""
    if pane.get("errors") and not node.get("pseudo"):      # accuracy overlay: the header shows the error
        paint = f' style="fill:{err["color"] if err else NO_RECORD}"'
    first = " err-first" if err and err.get("first") else ""
    out = [f'<g class="node cat-{escape(node["cat"])}{kind}{first}{cls}" data-node="{idx}" '
           f'transform="translate({_f(b["x"])},{_f(b["y"])})">',
           f'<title>{escape((node["name"] or node["op"]) + _err_title(err))}</title>',
           f'<rect class="box" width="{_f(w)}" height="{_f(h)}" rx="{_R}"/>',
           f'<path class="head" d="{head_path(w, m["headH"], not rows)}"{paint}/>',
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
    if first:
        out.append(_first_ring(w, h, _R))
    out.append("</g>")
    return "".join(out)


def _first_ring(w: float, h: float, r: float) -> str:
    return f'<rect class="err-ring" x="-4" y="-4" width="{_f(w + 8)}" height="{_f(h + 8)}" rx="{r + 3}"/>'


def group_svg(pane: dict, b: dict, cls: str = "") -> str:
    c = pane["clusters"][b["id"]]
    m = METRICS
    w, h = b["w"], b["h"]
    err = c.get("err") if pane.get("errors") else None
    stack = f' style="fill:{err["color"]};stroke:{err["color"]}"' if err else ""
    first = " err-first" if err and err.get("first") else ""
    out = (f'<g class="group{first}{cls}" data-cluster="{b["id"]}" transform="translate({_f(b["x"])},{_f(b["y"])})">'
           f'<title>{escape((c["path"] or c["name"]) + _group_err_title(pane, err))}</title>'
           f'<rect class="stack" x="4" y="4" width="{_f(w)}" height="{_f(h)}" rx="6"{stack}/>'
           f'<rect class="box" width="{_f(w)}" height="{_f(h)}" rx="6"/>'
           f'<text class="title" x="{m["padX"]}" y="{_f(m["headH"] / 2 + 1)}">{escape(c["name"])}</text>'
           f'<text class="count" x="{m["padX"]}" y="{_f(m["headH"] + m["rowH"] / 2)}">{c["size"]} nodes</text>'
           f'<text class="toggle" x="{_f(w - 7)}" y="{_f(m["headH"] / 2 + 1)}">+</text>')
    if err:
        out += f'<rect class="err-bar" x="1" y="{_f(h - 6)}" width="{_f(w - 2)}" height="5" rx="2" fill="{err["color"]}"/>'
    if first:
        out += _first_ring(w, h, 6)
    return out + "</g>"


def _group_err_title(pane: dict, err: dict | None) -> str:
    if not err:
        return ""
    worst = pane["nodes"][err["node"]]
    return (f"\nworst: {worst['name'] or worst['op']}{_err_title(worst['err'])}"
            f"\n{err['failed']} of {err['matched']} compared nodes failed")


LEGEND_W, LEGEND_H = 640, 58          # the legend under an exported graph


def legend_svg(errors: dict, x: float, y: float) -> str:
    """The accuracy scale: one block per decade, then the failed, no-record and first-failing marks
    (as legendSvg in view.js)."""
    sc = errors["scale"]
    bw, parts = 44, []
    parts.append(f'<g class="err-legend" transform="translate({_f(x)},{_f(y)})">')
    parts.append(f'<text class="title" x="0" y="6">Accuracy error · {escape(str(errors["metric"]))} per tensor, '
                 f'log scale · {escape(str(errors["file"]))}</text>')
    for i, c in enumerate(sc["colors"]):
        parts.append(f'<rect class="block" x="{i * bw}" y="16" width="{bw}" height="10" fill="{c}"/>')
    for i, t in enumerate(sc["ticks"]):
        anchor = "start" if i == 0 else "end" if i == len(sc["ticks"]) - 1 else "middle"
        label = ("≤" if i == 0 else "≥" if i == len(sc["ticks"]) - 1 else "") + t
        parts.append(f'<text x="{i * bw}" y="34" text-anchor="{anchor}">{label}</text>')
    sx = len(sc["colors"]) * bw + 16
    parts.append(f'<rect class="block" x="{sx}" y="16" width="14" height="10" fill="{sc["failed"]}"/>'
                 f'<text x="{sx + 18}" y="21">failed (orange or worse)</text>')
    parts.append(f'<rect class="block" x="{sx}" y="32" width="14" height="10" fill="{sc["none"]}"/>'
                 f'<text x="{sx + 18}" y="37">not compared</text>')
    first = errors.get("first") or {}
    name = str(first.get("name") or first.get("tensor") or "")
    if len(name) > 34:
        name = "…" + name[-33:]                      # the end of a scoped name says the most
    if name:
        parts.append(f'<rect class="err-ring" x="{sx + 170}" y="16" width="14" height="10" rx="2"/>'
                     f'<text x="{sx + 188}" y="21">first failing: {escape(name)}</text>')
    parts.append(f'<text class="note" x="{sx + 170}" y="37">{errors["matched"]} of {errors["tensors"]} tensors '
                 f'found in the model · {errors["failed"]} failed</text>')
    parts.append("</g>")
    return "".join(parts)


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
        decorate=None, profile_max: float = 0.0, errors: dict | None = None) -> str:
    """A standalone SVG document of the scene (``decorate(box) -> css class suffix`` adds overlays);
    with ``errors`` (the page's accuracy summary) the legend sits under the graph."""
    lr = rankdir == "LR"
    legend = errors is not None and pane.get("errors")
    w, h = scene["width"] + 2 * margin, scene["height"] + 2 * margin
    if legend:
        w, h = max(w, LEGEND_W + 2 * margin), h + LEGEND_H
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
    if legend:
        parts.append(legend_svg(errors, 0, scene["height"] + margin))
    parts.append("</svg>")
    return "\n".join(parts)
