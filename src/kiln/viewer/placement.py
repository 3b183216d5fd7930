"""Coordinates: box sizes, x/y assignment per cluster and the composed picture.

This module and ``static/layout.js`` implement the same algorithm on the same
page data, so the browser and the headless export draw the same picture; a
browser test compares the two. Keep them in step.

Breadth coordinates come from Brandes–Köpf (:mod:`kiln.viewer.coords`); edges
then meet expanded groups at their ports and spread along the sides of boxes
with several edges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kiln.viewer import coords

METRICS: dict[str, float] = {
    "nodeSep": 22, "edgeSep": 12, "rankSep": 34, "rankSepLR": 72, "headH": 22, "rowH": 15, "rowPad": 5, "padX": 9,
    "minW": 48, "groupPad": 12, "groupHead": 22, "headFont": 12, "rowFont": 10.5, "labelFont": 9,
}

DEFAULT_TOGGLES = {"attributes": False, "weights": True, "names": False}

_NARROW = set("iljtfrI.,:;|!'` ()[]")
_WIDE = set("MWmw@%")


def text_width(text: str, kind: str = "head") -> float:
    """Width estimate in px: bold sans for headers, monospace for rows."""
    if kind == "row":
        return len(text) * METRICS["rowFont"] * 0.602
    size = METRICS["headFont"] if kind == "head" else METRICS["labelFont"]
    w = 0.0
    for ch in text:
        if ch in _NARROW:
            w += 0.34
        elif ch in _WIDE:
            w += 0.9
        elif "A" <= ch <= "Z":
            w += 0.74
        elif "0" <= ch <= "9":
            w += 0.64
        else:
            w += 0.62
    return w * size


def box_content(node: dict, toggles: dict) -> tuple[str, list[list[str]]]:
    """Header text and rows ([kind, text]) of a node's box for the given toggles."""
    if node.get("pseudo"):
        return node["name"], ([["shape", node["shape"]]] if node.get("shape") else [])
    rows = []
    if toggles.get("names") and node.get("name"):
        name = node["name"]
        rows.append(["name", name if len(name) <= 34 else name[:33] + "…"])
    if toggles.get("weights", True):
        rows += [["weight", r] for r in node.get("wrow", [])]
    if toggles.get("attributes", False):
        rows += [["attr", r] for r in node.get("arow", [])]
    rows += [["engine", r] for r in node.get("erow", [])]
    if node.get("trow"):
        rows.append(["ms", node["trow"]])
    return node["op"], rows


def node_size(node: dict, toggles: dict) -> tuple[float, float]:
    head, rows = box_content(node, toggles)
    m = METRICS
    w = max(m["minW"], text_width(head) + 2 * m["padX"])
    for _, text in rows:
        w = max(w, text_width(text, "row") + 2 * m["padX"])
    h = m["headH"] + (len(rows) * m["rowH"] + m["rowPad"] if rows else 0)
    return math.ceil(w), h


def group_size(cluster: dict) -> tuple[float, float]:
    m = METRICS
    w = max(text_width(cluster["name"]) + 2 * m["padX"] + 16, text_width(f"{cluster['size']} nodes", "row")
            + 2 * m["padX"] + 16, 80)
    return math.ceil(w), m["headH"] + m["rowH"] + m["rowPad"]


def assign(struct: dict, br: list[float], th: list[float], up: list, down: list, rank_sep: float) -> tuple:
    """Breadth centre of every entry, start and thickness of every rank, total breadth and depth."""
    m = METRICS
    layers = struct["layers"]
    x = coords.assign(layers, struct["n"], br, up, down, m["nodeSep"], m["edgeSep"])
    left = min((x[e] - br[e] / 2 for layer in layers for e in layer), default=0.0)
    right = max((x[e] + br[e] / 2 for layer in layers for e in layer), default=0.0)
    for i in range(len(x)):
        x[i] -= left
    starts, thick = [], []
    depth = 0.0
    for r, layer in enumerate(layers):
        t = max((th[e] for e in layer), default=0.0)
        if r:
            depth += rank_sep if t > 0 and thick[-1] > 0 else rank_sep / 2
        starts.append(depth)
        thick.append(t)
        depth += t
    return x, starts, thick, right - left, depth


def _overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _spread(k: int, breadth: float) -> list[float]:
    if k <= 1:
        return [0.0] * k
    step = min(12.0, max(0.0, breadth - 16) / (k - 1))
    return [(i - (k - 1) / 2) * step for i in range(k)]


@dataclass
class ClusterLayout:
    width: float
    height: float
    pos: list[tuple[float, float]]          # centre of each entry, interior coordinates
    size: list[tuple[float, float]]         # (w, h) of each entry
    band: list[tuple[float, float]]         # (start, end) of each entry's rank, along the depth axis
    port_in: dict[int, float] = field(default_factory=dict)   # tensor → breadth position of its entry port
    port_out: dict[int, float] = field(default_factory=dict)
    out_off: dict = field(default_factory=dict)    # (entry, tensor) → anchor offset where a segment leaves
    in_off: dict = field(default_factory=dict)     # (entry, from entry, tensor) → anchor offset where it enters


class Placer:
    """Sizes and positions for one view state (expanded clusters, toggles, direction)."""

    def __init__(self, pane: dict, expanded: set[int], opened: set[int] | None = None,
                 toggles: dict | None = None, rankdir: str = "TB") -> None:
        self.pane = pane
        self.expanded = expanded            # group clusters drawn open
        self.opened = opened or set()       # nodes whose subgraphs are drawn in place
        self.toggles = toggles or dict(DEFAULT_TOGGLES)
        self.lr = rankdir == "LR"
        self.cache: dict[int, ClusterLayout] = {}
        self.sizes: dict[int, tuple[float, float]] = {}

    def node_size(self, idx: int) -> tuple[float, float]:
        if idx not in self.sizes:
            self.sizes[idx] = node_size(self.pane["nodes"][idx], self.toggles)
        return self.sizes[idx]

    # sizes -----------------------------------------------------------------
    def item_size(self, cluster: dict, item: list) -> tuple[float, float]:
        kind, idx = item
        if kind == "n":
            node = self.pane["nodes"][idx]
            w, h = self.node_size(idx)
            if node.get("sub") and idx in self.opened:
                bw, bh = self.bodies_size(node)
                return max(w, bw), h + bh
            return w, h
        if kind == "c":
            c = self.pane["clusters"][idx]
            if idx in self.expanded:
                lay = self.cluster(idx)
                return self.frame_size(c, lay)
            return group_size(c)
        return 0.0, 0.0

    def frame_size(self, c: dict, lay: ClusterLayout) -> tuple[float, float]:
        m = METRICS
        w = max(lay.width + 2 * m["groupPad"], text_width(c["name"]) + 2 * m["padX"] + 16)
        return math.ceil(w), m["groupHead"] + lay.height + m["groupPad"]

    def bodies_size(self, node: dict) -> tuple[float, float]:
        m = METRICS
        w, h = 0.0, 0.0
        for cid in node["sub"]:
            fw, fh = self.frame_size(self.pane["clusters"][cid], self.cluster(cid))
            w += fw + (m["groupPad"] if w else 0)
            h = max(h, fh)
        return w + 2 * m["groupPad"], h + m["groupPad"]

    # layout ----------------------------------------------------------------
    def cluster(self, cid: int) -> ClusterLayout:
        if cid in self.cache:
            return self.cache[cid]
        c = self.pane["clusters"][cid]
        s = c["s"]
        n = s["n"]
        total = n + sum(len(h[2]) for h in s["edges"])
        size = [(0.0, 0.0)] * total
        for i, item in enumerate(c["items"]):
            size[i] = self.item_size(c, item)
        br = [(h if self.lr else w) for w, h in size]
        th = [(w if self.lr else h) for w, h in size]
        segs: list[tuple[int, int, int]] = []
        for src, tensor, trunk, dsts, _flip in s["edges"]:
            prev = src
            for d in trunk:
                segs.append((prev, d, tensor))
                prev = d
            for dst, at in dsts:
                segs.append((src if at < 0 else trunk[at], dst, tensor))
        out_off, in_off = self._offsets(c, n, s["layers"], segs, br)
        # Alignment ignores anchor offsets: following ports exactly would shift every group in a chain by the
        # distance between its entry and exit ports (a 10k-node encoder came out 32,000 px wide).
        up: list[list] = [[] for _ in range(total)]
        down: list[list] = [[] for _ in range(total)]
        for a, b, t in segs:
            w = 8.0 if a >= n and b >= n else 2.0 if a >= n or b >= n else 1.0
            up[b].append((a, 0.0, w))
            down[a].append((b, 0.0, w))
        x, starts, thick, width, depth = assign(s, br, th, up, down,
                                                METRICS["rankSepLR"] if self.lr else METRICS["rankSep"])
        pos = [(0.0, 0.0)] * total
        band = [(0.0, 0.0)] * total
        for r, layer in enumerate(s["layers"]):
            mid = starts[r] + thick[r] / 2
            for e in layer:
                pos[e] = (mid, x[e]) if self.lr else (x[e], mid)
                band[e] = (starts[r], starts[r] + thick[r])
        lay = ClusterLayout(depth if self.lr else width, width if self.lr else depth, pos, size, band,
                            out_off=out_off, in_off=in_off)
        for i, (kind, k) in enumerate(c["items"]):
            if kind == "i":
                lay.port_in[c["pin"][k]] = x[i]
            elif kind == "o":
                lay.port_out[c["pout"][k]] = x[i]
        self.cache[cid] = lay
        return lay

    def _offsets(self, c: dict, n: int, layers: list, segs: list, br: list) -> tuple[dict, dict]:
        """Anchor offsets along the breadth axis: ports of expanded groups, else spread over the box side."""
        order: dict[int, int] = {}
        for layer in layers:
            for i, e in enumerate(layer):
                order[e] = i
        outs: dict[int, dict[int, list[int]]] = {}
        ins: dict[int, list[tuple[int, int]]] = {}
        for a, b, t in segs:
            if a < n:
                outs.setdefault(a, {}).setdefault(t, []).append(order[b])
            if b < n:
                ins.setdefault(b, []).append((order[a], t, a))
        out_off: dict = {}
        in_off: dict = {}
        for a, by_tensor in outs.items():
            kind, idx = c["items"][a]
            if kind == "c" and idx in self.expanded:
                for t in by_tensor:
                    out_off[(a, t)] = self.port_offset(idx, t, True)
            elif kind in ("n", "c") and len(by_tensor) > 1:
                keys = sorted((sum(v) / len(v), t) for t, v in by_tensor.items())
                for (_, t), o in zip(keys, _spread(len(keys), br[a])):
                    out_off[(a, t)] = o
        for b, lst in ins.items():
            kind, idx = c["items"][b]
            if kind == "c" and idx in self.expanded:
                for _, t, a in lst:
                    in_off[(b, a, t)] = self.port_offset(idx, t, False)
            elif kind in ("n", "c") and len(lst) > 1:
                lst.sort()
                for (_, t, a), o in zip(lst, _spread(len(lst), br[b])):
                    in_off[(b, a, t)] = o
        return out_off, in_off

    def port_offset(self, cid: int, tensor: int, out: bool) -> float:
        """Breadth offset of an expanded group's port from the group's centre."""
        lay = self.cluster(cid)
        ports = lay.port_out if out else lay.port_in
        if tensor not in ports:
            return 0.0
        m = METRICS
        w, h = self.frame_size(self.pane["clusters"][cid], lay)
        if self.lr:
            return m["groupHead"] + ports[tensor] - h / 2
        return m["groupPad"] + ports[tensor] - w / 2

    # composition -------------------------------------------------------------
    def scene(self, root: int = 0) -> dict:
        """Absolute boxes and edge paths of everything visible."""
        from kiln.viewer.page import no_gc
        out: dict[str, Any] = {"boxes": [], "edges": []}
        with no_gc():
            lay = self.cluster(root)
            self._emit(root, 0.0, 0.0, out)
        out.pop("_grid", None)
        out["width"], out["height"] = lay.width, lay.height
        return out

    def _emit(self, cid: int, ox: float, oy: float, out: dict) -> None:
        c = self.pane["clusters"][cid]
        lay = self.cluster(cid)
        m = METRICS
        for i, (kind, idx) in enumerate(c["items"]):
            if kind in ("i", "o"):
                continue
            (cx, cy), (w, h) = lay.pos[i], lay.size[i]
            x0, y0 = ox + cx - w / 2, oy + cy - h / 2
            if kind == "n":
                node = self.pane["nodes"][idx]
                nw, nh = self.node_size(idx)
                open_ = bool(node.get("sub")) and idx in self.opened
                out["boxes"].append({"kind": "node", "id": idx, "x": x0 + (w - nw) / 2 if open_ else x0, "y": y0,
                                     "w": nw if open_ else w, "h": nh, "open": open_})
                if open_:
                    out["boxes"].append({"kind": "bodies", "id": idx, "x": x0, "y": y0 + nh, "w": w, "h": h - nh})
                    bx = x0 + m["groupPad"] + (w - self.bodies_size(node)[0]) / 2
                    for sub in node["sub"]:
                        sl = self.cluster(sub)
                        fw, fh = self.frame_size(self.pane["clusters"][sub], sl)
                        out["boxes"].append({"kind": "frame", "id": sub, "x": bx, "y": y0 + nh, "w": fw, "h": fh,
                                             "body": True})
                        self._emit(sub, bx + m["groupPad"], y0 + nh + m["groupHead"], out)
                        bx += fw + m["groupPad"]
            elif idx in self.expanded:
                out["boxes"].append({"kind": "frame", "id": idx, "x": x0, "y": y0, "w": w, "h": h})
                self._emit(idx, x0 + m["groupPad"], y0 + m["groupHead"], out)
            else:
                out["boxes"].append({"kind": "group", "id": idx, "x": x0, "y": y0, "w": w, "h": h})
        self._edges(c, lay, ox, oy, out)

    def _anchor(self, c: dict, lay: ClusterLayout, e: int, tensor: int, out: bool, ox: float, oy: float,
                other: int = -1):
        """Where a segment leaves (out) or enters an entry, in absolute coordinates."""
        m = METRICS
        n = len(c["items"])
        cx, cy = lay.pos[e]
        if e >= n:                                   # dummy: the far or near side of its rank band
            d = lay.band[e][1] if out else lay.band[e][0]
            return (ox + d, oy + cy) if self.lr else (ox + cx, oy + d)
        kind, idx = c["items"][e]
        if kind == "i":
            return (ox - m["groupPad"], oy + cy) if self.lr else (ox + cx, oy - m["groupHead"])
        if kind == "o":
            return (ox + lay.width + m["groupPad"], oy + cy) if self.lr else (ox + cx, oy + lay.height + m["groupPad"])
        w, h = lay.size[e]
        off = lay.out_off.get((e, tensor), 0.0) if out else lay.in_off.get((e, other, tensor), 0.0)
        if self.lr:
            return (ox + cx + (w / 2 if out else -w / 2), oy + cy + off)
        return (ox + cx + off, oy + cy + (h / 2 if out else -h / 2))

    def _edges(self, c: dict, lay: ClusterLayout, ox: float, oy: float, out: dict) -> None:
        for src, tensor, trunk, dsts, flip in c["s"]["edges"]:
            start = self._anchor(c, lay, src, tensor, True, ox, oy)
            if trunk:
                pts = [start]
                for d in trunk:
                    pts.append(self._anchor(c, lay, d, tensor, False, ox, oy, -1))
                    pts.append(self._anchor(c, lay, d, tensor, True, ox, oy))
                out["edges"].append({"pts": pts, "t": tensor, "arrow": "start" if flip else ""})
            for dst, at in dsts:
                frm = src if at < 0 else trunk[at]
                a = start if at < 0 else self._anchor(c, lay, frm, tensor, True, ox, oy)
                b = self._anchor(c, lay, dst, tensor, False, ox, oy, frm)
                kind, idx = c["items"][dst]
                final = kind == "n" or (kind == "c" and idx not in self.expanded)
                arrow = ("start" if not trunk else "") if flip else ("end" if final else "")
                e = {"pts": [a, b], "t": tensor, "arrow": arrow}
                if final:
                    self._label(e, out)
                out["edges"].append(e)

    def _label(self, e: dict, out: dict) -> None:
        """Place the shape label beside the arrow's end, moved back along the edge or dropped on a clash."""
        text = self.pane["tensors"][e["t"]][1]
        if not text:
            return
        grid = out.setdefault("_grid", {})
        w, h = text_width(text, "label"), 11.0
        x, y = e["pts"][-1]
        for k in range(3):
            if self.lr:
                lx, ly, anchor = x - 5 - k * (w + 6), y - 8, "end"
                box = (lx - w, ly - h / 2, lx, ly + h / 2, text)
            else:
                lx, ly, anchor = x + 5, y - 9 - k * h, "start"
                box = (lx, ly - h / 2, lx + w, ly + h / 2, text)
            cells = [(i, j) for i in range(math.floor(box[0] / 64), math.floor(box[2] / 64) + 1)
                     for j in range(math.floor(box[1] / 64), math.floor(box[3] / 64) + 1)]
            clash = [o for cell in cells for o in grid.get(cell, ()) if _overlap(box, o)]
            if any(o[4] == text for o in clash):        # the same shape is already written right there
                return
            if not clash:
                for cell in cells:
                    grid.setdefault(cell, []).append(box)
                e["label"] = [lx, ly, anchor]
                return
