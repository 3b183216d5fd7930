"""Layered (Sugiyama-style) layout of one cluster: ranks, dummy nodes and the order in each rank.

The steps, each deterministic:

1. cycle removal — a topological order (Kahn's algorithm, smallest item first,
   breaking cycles at the smallest remaining item); edges against it are flipped;
2. layering — longest path from the sources, then nodes that feed more edges
   than they take sink down to just above their first consumer (constants,
   graph inputs), so few edges are long; a run of ranks wider than ``WRAP``
   items (hundreds of parallel branches, a SavedModel's variables) is folded
   into bands of ``WRAP`` items each, stacked, each band keeping its branches
   whole, so the picture grows down instead of thousands of pixels wide;
3. dummy nodes — a value is a hyperedge: its consumers share one trunk of
   dummies, so a mask read by 300 layers costs one dummy per rank, not 300;
4. crossing reduction — DFS initial order, then median sweeps down and up
   (on small clusters the order with the fewest crossings is kept).

Coordinates depend on box sizes (toggles, expanded groups) and are computed
from this structure in the page, by ``static/layout.js``.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

SMALL = 3000          # entries up to which crossings are counted and the best order is kept
WRAP = 24             # items in a rank beyond which a run of wide ranks is folded into bands


@dataclass
class Hyperedge:
    src: int                       # entry the value leaves (upper end; the consumer when flipped)
    tensor: str
    trunk: list[int]               # dummy entries, one per rank, top to bottom
    dsts: list[tuple[int, int]]    # (entry, attach): attach is -1 for src, else an index into trunk
    flip: bool = False             # drawn against rank order (an edge that closed a cycle)


@dataclass
class Structure:
    n: int                                       # real items are entries 0..n-1; the rest are dummies
    layers: list[list[int]]
    rank: list[int]
    edges: list[Hyperedge] = field(default_factory=list)
    wrapped: bool = False                        # wide ranks were folded into bands (see _wrap)

    def neighbours(self) -> tuple[list[list[int]], list[list[int]]]:
        """Up and down neighbour lists per entry, one per drawn segment."""
        total = len(self.rank)
        up: list[list[int]] = [[] for _ in range(total)]
        down: list[list[int]] = [[] for _ in range(total)]
        for h in self.edges:
            prev = h.src
            for d in h.trunk:
                down[prev].append(d)
                up[d].append(prev)
                prev = d
            for dst, at in h.dsts:
                a = h.src if at < 0 else h.trunk[at]
                down[a].append(dst)
                up[dst].append(a)
        return up, down

    def to_json(self) -> dict:
        out = {"n": self.n, "layers": self.layers,
               "edges": [[h.src, h.tensor, h.trunk, [list(d) for d in h.dsts], int(h.flip)] for h in self.edges]}
        if self.wrapped:
            out["wrapped"] = 1
        return out


def build(n: int, edges: list[tuple[int, int, str]], top: set[int] | None = None,
          bottom: set[int] | None = None, sweeps: int | None = None) -> Structure:
    """Lay out ``n`` items joined by ``(src, dst, tensor)`` edges; ``top``/``bottom`` items get their own
    first/last rank (a cluster's entry and exit ports)."""
    top = top or set()
    bottom = bottom or set()
    order = _topological(n, edges)
    pred, succ = _oriented(n, edges, order, top, bottom)
    layered = _ranks(n, pred, succ, order, top, bottom)
    rank = _wrap(layered, pred, order, top | bottom)
    s = Structure(n, [], rank, wrapped=rank is not layered)
    _dummies(s, edges, order)
    _order(s, sweeps)
    return s


def _topological(n: int, edges) -> list[int]:
    """Position of each item in a topological order; cycles are broken at the smallest item left."""
    succ: list[list[int]] = [[] for _ in range(n)]
    indeg = [0] * n
    for a, b, _ in edges:
        if a != b:
            succ[a].append(b)
            indeg[b] += 1
    heap = [i for i in range(n) if indeg[i] == 0]
    heapq.heapify(heap)
    pos = [-1] * n
    k = 0
    nxt = 0                                     # smallest index possibly unplaced, for cycle breaking
    while k < n:
        if not heap:
            while pos[nxt] >= 0:
                nxt += 1
            indeg[nxt] = 0
            heap.append(nxt)
        i = heapq.heappop(heap)
        if pos[i] >= 0:
            continue
        pos[i] = k
        k += 1
        for j in succ[i]:
            if pos[j] < 0:
                indeg[j] -= 1
                if indeg[j] == 0:
                    heapq.heappush(heap, j)
    return pos


def _oriented(n: int, edges, order: list[int], top: set[int], bottom: set[int]) -> tuple[list[list[int]], ...]:
    """Predecessor and successor lists along the topological order (ports' edges left out)."""
    pred: list[list[int]] = [[] for _ in range(n)]
    succ: list[list[int]] = [[] for _ in range(n)]
    for a, b, _ in edges:
        if a == b or a in top or b in bottom:
            continue
        if order[a] > order[b]:
            a, b = b, a
        pred[b].append(a)
        succ[a].append(b)
    return pred, succ


def _ranks(n: int, pred: list[list[int]], succ: list[list[int]], order: list[int], top: set[int],
           bottom: set[int]) -> list[int]:
    seq = sorted(range(n), key=order.__getitem__)
    rank = [0] * n
    for v in seq:
        if pred[v]:
            rank[v] = max(rank[u] for u in pred[v]) + 1
    for v in reversed(seq):                  # sink nodes that feed more than they take
        if succ[v] and len(succ[v]) > len(pred[v]):
            rank[v] = min(rank[w] for w in succ[v]) - 1
    if top:
        rank = [0 if i in top else r + 1 for i, r in enumerate(rank)]
    if bottom:
        last = max((r for i, r in enumerate(rank) if i not in bottom), default=-1) + 1
        for i in bottom:
            rank[i] = last
    return rank


def _wrap(rank: list[int], pred: list[list[int]], order: list[int], ports: set[int]) -> list[int]:
    """Fold each run of consecutive ranks holding more than WRAP items into stacked bands of WRAP items.

    In a run, items are sorted rank by rank after their predecessor's place in the rank above (so the
    nodes of one branch share a place) and cut into bands; band j of a run of L ranks takes the L ranks
    after band j - 1. Then every item moves below its predecessors where a band put it above them, and
    empty ranks close up.
    """
    width: dict[int, int] = {}
    for i, r in enumerate(rank):
        if i not in ports:
            width[r] = width.get(r, 0) + 1
    if max(width.values(), default=0) <= WRAP:
        return rank
    last = max(rank)
    members: list[list[int]] = [[] for _ in range(last + 1)]
    for i in sorted(range(len(rank)), key=order.__getitem__):
        members[rank[i]].append(i)
    new = list(rank)
    shift = 0
    r = 0
    while r <= last:
        if width.get(r, 0) <= WRAP or any(i in ports for i in members[r]):
            for i in members[r]:
                new[i] = r + shift
            r += 1
            continue
        end = r
        while end + 1 <= last and width.get(end + 1, 0) > WRAP and not any(i in ports for i in members[end + 1]):
            end += 1
        run = end - r + 1
        place: dict[int, int] = {}
        bands = 1
        for k in range(r, end + 1):
            items = sorted(members[k], key=lambda i: (min((place[u] for u in pred[i] if u in place),
                                                          default=len(rank)), order[i]))
            for j, i in enumerate(items):
                place[i] = j
                new[i] = r + shift + (j // WRAP) * run + (k - r)
            bands = max(bands, -(-len(items) // WRAP))
        shift += run * (bands - 1)
        r = end + 1
    for i in sorted(range(len(rank)), key=order.__getitem__):     # keep every edge pointing down
        if pred[i]:
            new[i] = max(new[i], max(new[u] + 1 for u in pred[i]))
    bottom = [i for i in ports if rank[i] == last and last > 0]
    if bottom:
        below = max((r for i, r in enumerate(new) if i not in ports), default=-1) + 1
        for i in bottom:
            new[i] = below
    used = {v: k for k, v in enumerate(sorted(set(new)))}        # close empty ranks
    return [used[v] for v in new]


def _dummies(s: Structure, edges, order: list[int]) -> None:
    """Turn edges into hyperedges with shared trunks of dummy entries."""
    rank = s.rank
    groups: dict[tuple[int, str, bool], list[int]] = {}
    for a, b, t in edges:
        if a == b:
            continue
        flip = rank[a] >= rank[b]
        key = (b, t, True) if flip else (a, t, False)
        groups.setdefault(key, []).append(a if flip else b)
    for (src, t, flip), dsts in groups.items():
        if flip:                               # one hyperedge per flipped pair, from the consumer down
            for d in dsts:
                s.edges.append(_hyper(s, src, t, [d], True))
        else:
            s.edges.append(_hyper(s, src, t, sorted(set(dsts), key=lambda d: (rank[d], order[d])), False))
    s.layers = [[] for _ in range(max(rank, default=-1) + 1)]
    for e, r in enumerate(rank):
        s.layers[r].append(e)


def _hyper(s: Structure, src: int, tensor: str, dsts: list[int], flip: bool) -> Hyperedge:
    rank = s.rank
    trunk = []
    for k in range(max(rank[d] for d in dsts) - rank[src] - 1):
        trunk.append(len(rank))
        rank.append(rank[src] + 1 + k)
    h = Hyperedge(src, tensor, trunk, [], flip)
    for d in dsts:
        h.dsts.append((d, rank[d] - rank[src] - 2))
    return h


def _order(s: Structure, sweeps: int | None) -> None:
    up, down = s.neighbours()
    total = len(s.rank)
    pos = [0] * total
    # initial order: DFS discovery from the items in their given order
    seen = [False] * total
    disc = [0] * total
    k = 0
    for root in sorted(range(s.n), key=lambda i: (s.rank[i], i)):
        if seen[root]:
            continue
        stack = [root]
        while stack:
            e = stack.pop()
            if seen[e]:
                continue
            seen[e] = True
            disc[e] = k
            k += 1
            stack.extend(reversed(down[e]))
    for layer in s.layers:
        layer.sort(key=disc.__getitem__)
        for i, e in enumerate(layer):
            pos[e] = i
    if all(len(layer) < 2 for layer in s.layers):        # a chain: nothing to order
        return
    small = total <= SMALL
    iterations = sweeps if sweeps is not None else (8 if small else 3)
    best = [list(layer) for layer in s.layers] if small else None
    best_cross = crossings(s.layers, down, pos) if small else 0
    for it in range(iterations):
        before = [list(layer) for layer in s.layers]
        _sweep(s.layers, up, pos, range(1, len(s.layers)))
        _sweep(s.layers, down, pos, range(len(s.layers) - 2, -1, -1))
        if s.layers == before:                               # converged
            break
        if small:
            c = crossings(s.layers, down, pos)
            if c < best_cross:
                best_cross, best = c, [list(layer) for layer in s.layers]
            if best_cross == 0:
                break
    if best is not None:
        s.layers = best


def _sweep(layers: list[list[int]], ref: list[list[int]], pos: list[int], order) -> None:
    for r in order:
        layer = layers[r]
        if len(layer) < 2:
            continue
        keys = {}
        for e in layer:
            nb = ref[e]
            if not nb:
                keys[e] = (pos[e], pos[e])
            elif len(nb) == 1:
                keys[e] = (pos[nb[0]], pos[e])
            else:
                p = sorted(pos[x] for x in nb)
                m = len(p) // 2
                keys[e] = ((p[m] if len(p) % 2 else (p[m - 1] + p[m]) / 2), pos[e])
        layer.sort(key=keys.__getitem__)
        for i, e in enumerate(layer):
            pos[e] = i


def crossings(layers: list[list[int]], down: list[list[int]], pos: list[int] | None = None) -> int:
    """Edge crossings between consecutive ranks (accumulator tree, Barth–Jünger–Mutzel)."""
    if pos is None:
        pos = {e: i for layer in layers for i, e in enumerate(layer)}
    total = 0
    for r in range(len(layers) - 1):
        south = [pos[d] for e in layers[r] for d in sorted(down[e], key=pos.__getitem__)]
        if len(south) < 2:
            continue
        size = 1
        while size < len(layers[r + 1]):
            size *= 2
        tree = [0] * (2 * size)
        for p in south:
            i = p + size
            tree[i] += 1
            while i > 1:
                if i % 2 == 0:
                    total += tree[i + 1]
                i //= 2
                tree[i] += 1
    return total
