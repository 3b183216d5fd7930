"""Breadth coordinates of a layered drawing: Brandes–Köpf.

Four alignments (from the top or the bottom, from the left or the right) each
join every entry with its median neighbour into vertical blocks, giving way to
segments between two dummies (type-1 conflicts) so that long edges stay
straight; each alignment is compacted (longest path over the block graph, then
blocks pulled towards their right neighbours), and the four results are
balanced: aligned to the narrowest and averaged over their two middle values.

Segments may ask for an offset (``x_v = x_u + d``: a port of an expanded group
is not at its centre); blocks then carry inner shifts. ``static/layout.js``
mirrors this module line for line.
"""
from __future__ import annotations

from collections import deque


def assign(layers: list[list[int]], n: int, br: list[float], up: list, down: list,
           node_sep: float, edge_sep: float) -> list[float]:
    """x centre of every entry (entries ≥ n are dummies); ``up``/``down``: per entry [(neighbour, d, w)]."""
    total = len(br)
    pos = [0] * total
    for layer in layers:
        for i, e in enumerate(layer):
            pos[e] = i
    marked = _type1(layers, n, up, pos)
    results = []
    for vertical in ("down", "up"):
        for horizontal in ("left", "right"):
            lays = layers if vertical == "down" else layers[::-1]
            if horizontal == "right":
                lays = [layer[::-1] for layer in lays]
            nbrs = up if vertical == "down" else down
            flip = -1.0 if horizontal == "right" else 1.0
            root, align, inner = _align(lays, nbrs, marked, total, flip)
            xs = _compact(lays, root, inner, br, n, node_sep, edge_sep)
            results.append([flip * v for v in xs])
    # align the four to the narrowest: left ones by their left edge, right ones by their right edge
    spans = []
    for xs in results:
        lo = min((xs[e] - br[e] / 2 for layer in layers for e in layer), default=0.0)
        hi = max((xs[e] + br[e] / 2 for layer in layers for e in layer), default=0.0)
        spans.append((lo, hi))
    best = min(range(4), key=lambda k: (spans[k][1] - spans[k][0], k))
    for k, xs in enumerate(results):
        delta = spans[best][0] - spans[k][0] if k % 2 == 0 else spans[best][1] - spans[k][1]
        if delta:
            for i in range(total):
                xs[i] += delta
    out = [0.0] * total
    for i in range(total):
        v = sorted((results[0][i], results[1][i], results[2][i], results[3][i]))
        out[i] = (v[1] + v[2]) / 2
    return out


def _type1(layers: list[list[int]], n: int, up: list, pos: list[int]) -> set[tuple[int, int]]:
    """Segments (upper, lower) that cross a segment between two dummies: they give way in alignment."""
    marked: set[tuple[int, int]] = set()
    for r in range(1, len(layers)):
        prev_len = len(layers[r - 1])
        lower = layers[r]
        k0 = 0
        scan = 0
        for l1, v in enumerate(lower):
            w = None
            if v >= n:
                for u, _, _ in up[v]:
                    if u >= n:
                        w = u
                        break
            if w is not None or l1 == len(lower) - 1:
                k1 = pos[w] if w is not None else prev_len
                for s in lower[scan:l1 + 1]:
                    for u, _, _ in up[s]:
                        if (pos[u] < k0 or pos[u] > k1) and not (u >= n and s >= n):
                            marked.add((u, s))
                scan = l1 + 1
                k0 = k1
    return marked


def _align(lays: list[list[int]], nbrs: list, marked: set, total: int, flip: float):
    """Vertical alignment: each entry joins the block of a median neighbour in the layer before."""
    root = list(range(total))
    align = list(range(total))
    inner = [0.0] * total
    hpos = [0] * total
    for layer in lays:
        for i, e in enumerate(layer):
            hpos[e] = i
    for layer in lays:
        r = -1
        for v in layer:
            ns = nbrs[v]
            if not ns:
                continue
            ns = sorted(ns, key=lambda t: (hpos[t[0]], flip * t[1]))
            d = len(ns)
            for m in sorted({(d - 1) // 2, d // 2}):
                if align[v] != v:
                    break
                u, off, _ = ns[m]
                if (u, v) in marked or (v, u) in marked or r >= hpos[u]:
                    continue
                align[u] = v
                root[v] = root[u]
                align[v] = root[v]
                inner[v] = inner[u] + flip * off
                r = hpos[u]
    return root, align, inner


def _compact(lays: list[list[int]], root: list[int], inner: list[float], br: list[float], n: int,
             node_sep: float, edge_sep: float) -> list[float]:
    """Blocks as far left as their left neighbours allow, then as far right as their right neighbours allow."""
    succ: dict[int, dict[int, float]] = {}
    pred: dict[int, dict[int, float]] = {}
    for layer in lays:
        for i in range(1, len(layer)):
            u, v = layer[i - 1], layer[i]
            gap = node_sep if br[u] > 0 and br[v] > 0 else edge_sep
            w = inner[u] - inner[v] + (br[u] + br[v]) / 2 + gap
            a, b = root[u], root[v]
            s = succ.setdefault(a, {})
            if b not in s or s[b] < w:
                s[b] = w
                pred.setdefault(b, {})[a] = w
    roots = [v for v in range(len(root)) if root[v] == v]
    indeg = {v: len(pred.get(v, ())) for v in roots}
    queue = deque(v for v in roots if indeg[v] == 0)
    order = []
    while queue:
        v = queue.popleft()
        order.append(v)
        for s in succ.get(v, ()):
            indeg[s] -= 1
            if indeg[s] == 0:
                queue.append(s)
    if len(order) < len(roots):                 # cannot happen for a proper alignment; stay total anyway
        seen = set(order)
        order += [v for v in roots if v not in seen]
    xs: dict[int, float] = {}
    for v in order:
        xs[v] = max((xs.get(p, 0.0) + w for p, w in pred.get(v, {}).items()), default=0.0)
    for v in reversed(order):
        s = succ.get(v)
        if s:
            lim = min(xs.get(t, 0.0) - w for t, w in s.items())
            if lim > xs[v]:
                xs[v] = lim
    return [xs[root[v]] + inner[v] for v in range(len(root))]
