"""Model diff: the nodes of two view graphs matched and classified.

Nodes are matched by name first (a name unique in both graphs, same op type),
then by structure: starting from what is already matched, a node whose
producers are all matched is keyed by its op type, attributes and where each
input comes from, and pairs with the node of the other graph that has the same
key; the same runs backwards from consumers and graph outputs, so an inserted or
deleted node does not unmatch everything after it. When no exact key is left, op
type and wiring alone pair a node whose attributes changed. Matched pairs are
compared (attributes, output shapes and dtypes, weights' shape, dtype and values,
wiring, engine precision and tactic, If/Loop bodies recursively) and each node is
``added``, ``removed``, ``changed`` or ``unchanged``; name-scope groups roll their
members' status up.
"""
from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.viewer.graph import ViewGraph, ViewModel, ViewNode, ViewTensor

STATUSES = ("added", "removed", "changed", "unchanged")
_OVERLAY_KEYS = ("precision", "tactic")           # engine facts that make a layer differ


@dataclass
class Detail:
    """One difference of a matched pair: ``kind`` is op, attribute, output, weight, input, property, overlay,
    subgraph or (model level) format, version, producer, input, output; ``name`` the slot or attribute."""

    kind: str
    name: str
    a: Any = None
    b: Any = None
    stats: dict[str, Any] | None = None            # weights: max_abs, mean_abs (or unreadable); bodies: counts


@dataclass
class NodeDiff:
    status: str                                    # one of STATUSES
    a: ViewNode | None
    b: ViewNode | None
    scope: tuple[str, ...] = ()                    # owning node names and body keys, outermost first
    details: list[Detail] = field(default_factory=list)

    @property
    def node(self) -> ViewNode:
        return self.b if self.b is not None else self.a


@dataclass
class ModelDiff:
    a: ViewModel
    b: ViewModel
    model: list[Detail]                            # format, version, producer, graph inputs and outputs
    nodes: list[NodeDiff]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for n in self.nodes:
            out[n.status] += 1
        return out

    @property
    def differs(self) -> bool:
        return bool(self.model) or any(n.status != "unchanged" for n in self.nodes)

    def changes(self) -> list[NodeDiff]:
        return [n for n in self.nodes if n.status != "unchanged"]

    def groups(self, side: str) -> dict[tuple[str, ...], str]:
        """Status of every name-scope group of the main graph on ``side`` ("a" or "b"), rolled up from its
        nodes: all added (or removed) → added (removed); all unchanged → unchanged; otherwise changed."""
        seen: dict[tuple[str, ...], set[str]] = defaultdict(set)
        for n in self.nodes:
            node = n.a if side == "a" else n.b
            if node is None or n.scope:
                continue
            for k in range(1, len(node.group) + 1):
                seen[node.group[:k]].add(n.status)
        return {path: rollup(statuses) for path, statuses in seen.items()}


def rollup(statuses: set[str] | list[str]) -> str:
    """One status for a set of members' statuses."""
    s = set(statuses)
    if len(s) == 1:
        return next(iter(s))
    return "changed" if s else "unchanged"


def diff_models(a: ViewModel, b: ViewModel, *, weights: bool = True) -> ModelDiff:
    """Match and compare the main graphs of ``a`` and ``b`` (``weights=False`` skips reading weight values)."""
    model: list[Detail] = []
    for kind in ("format", "version", "producer"):
        va, vb = getattr(a, kind), getattr(b, kind)
        if va != vb:
            model.append(Detail(kind, kind, va, vb))
    nodes: list[NodeDiff] = []
    model.extend(_values(a.graph, b.graph))
    _GraphDiff(a.graph, b.graph, (), weights, nodes).run()
    return ModelDiff(a, b, model, nodes)


def _tensor_facts(t: ViewTensor | None) -> dict[str, Any] | None:
    return None if t is None else {"shape": t.shape, "dtype": t.dtype}


def _values(ga: ViewGraph, gb: ViewGraph) -> list[Detail]:
    """Graph inputs and outputs added, removed or of another shape or dtype (matched by name)."""
    out = []
    for kind in ("input", "output"):
        ta = {t.name: t for t in getattr(ga, kind + "s")}
        tb = {t.name: t for t in getattr(gb, kind + "s")}
        for name in list(ta) + [n for n in tb if n not in ta]:
            fa, fb = _tensor_facts(ta.get(name)), _tensor_facts(tb.get(name))
            if fa != fb:
                out.append(Detail(kind, name, fa, fb))
    return out


def _frozen(attrs: dict[str, Any]) -> str:
    """A hashable stand-in for a node's attributes (equal attributes, equal text)."""
    return repr(sorted(attrs.items())) if attrs else ""


def same_value(x: Any, y: Any) -> bool:
    """Equality of attribute values as read from files (NaN equals NaN)."""
    if isinstance(x, float) and isinstance(y, float):
        return x == y or (math.isnan(x) and math.isnan(y))
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(same_value(p, q) for p, q in zip(x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(same_value(x[k], y[k]) for k in x)
    return x == y


class _Side:
    """One graph indexed for matching: producers and consumers by node position."""

    def __init__(self, g: ViewGraph) -> None:
        self.g = g
        self.nodes = g.nodes
        self.producer: dict[str, tuple[int, int]] = {}
        for i, n in enumerate(self.nodes):
            k = 0
            for arg in n.outputs:
                for v in arg.values:
                    self.producer[v] = (i, k)
                    k += 1
        self.inputs = [[v for arg in n.inputs for v in arg.values] for n in self.nodes]
        self.consumers: list[list[tuple[int, int]]] = [[] for _ in self.nodes]   # (consumer, input position)
        self.producers: list[set[int]] = [set() for _ in self.nodes]
        for i, vals in enumerate(self.inputs):
            for j, v in enumerate(vals):
                p = self.producer.get(v)
                if p is not None and p[0] != i:
                    self.consumers[p[0]].append((i, j))
                    self.producers[i].add(p[0])
        self.graph_outputs = {t.name for t in g.outputs}
        self.attrs = [_frozen(n.attributes) for n in self.nodes]


class _GraphDiff:
    """Match the nodes of two graphs, then compare each pair (and their bodies, recursively)."""

    def __init__(self, ga: ViewGraph, gb: ViewGraph, scope: tuple[str, ...], weights: bool,
                 out: list[NodeDiff]) -> None:
        self.sides = (_Side(ga), _Side(gb))
        self.scope = scope
        self.weights = weights
        self.out = out
        self.match: tuple[list[int], list[int]] = ([-1] * len(ga.nodes), [-1] * len(gb.nodes))
        self.queue: deque[tuple[int, int]] = deque()
        # pools[direction][side]: strict key (op, wiring, attributes) → nodes offered and not yet matched;
        # loose[direction][side]: the same by (op, wiring); fresh: offers no loose pass has looked at yet
        self.pools = [[defaultdict(deque), defaultdict(deque)] for _ in range(2)]
        self.loose = [[defaultdict(deque), defaultdict(deque)] for _ in range(2)]
        self.fresh: list[tuple[int, int, int, tuple]] = []
        self.inputs = _input_ids(ga, gb)

    # -- matching ---------------------------------------------------------------------------------------
    def run(self) -> None:
        wait = [[[len(s.producers[i]) for i in range(len(s.nodes))],
                 [len({c for c, _ in s.consumers[i]}) for i in range(len(s.nodes))]] for s in self.sides]
        self.wait = wait                       # wait[side][direction][node]: unmatched neighbours left
        self._by_name()
        for side, s in enumerate(self.sides):
            for i in range(len(s.nodes)):
                for d in (0, 1):
                    if wait[side][d][i] == 0:
                        self._offer(side, d, i)
        while True:
            self._drain()
            if not self._loose():
                break
        self._report()

    def _by_name(self) -> None:
        sa, sb = self.sides
        index = []
        for s in self.sides:
            seen: dict[str, int] = {}
            for i, n in enumerate(s.nodes):
                if n.name:
                    seen[n.name] = -1 if n.name in seen else i
            index.append(seen)
        for name, i in index[0].items():
            j = index[1].get(name, -1)
            if i >= 0 and j >= 0 and sa.nodes[i].op_type == sb.nodes[j].op_type:
                self._pair(i, j)

    def _pair(self, i: int, j: int) -> None:
        self.match[0][i], self.match[1][j] = j, i
        self.queue.append((i, j))

    def _mid(self, side: int, node: int) -> int:
        """The id both sides share for a matched node (its position in graph a)."""
        return node if side == 0 else self.match[1][node]

    def _key(self, side: int, d: int, i: int) -> tuple:
        s = self.sides[side]
        n = s.nodes[i]
        if d == 0:                                 # forward: where each input comes from
            parts = []
            for v in s.inputs[i]:
                p = s.producer.get(v)
                if p is not None and p[0] != i:
                    parts.append(("n", self._mid(side, p[0]), p[1]))
                elif v in s.g.weights:
                    w = s.g.weights[v]
                    parts.append(("w", tuple(w.shape or ()), w.dtype))
                else:
                    parts.append(("i", self.inputs[side].get(v, v)))
            io = tuple(parts)
        else:                                      # backward: who reads each output
            io = tuple(sorted((self._mid(side, c), j) for c, j in s.consumers[i])) + \
                tuple(sorted(("out", v) for arg in n.outputs for v in arg.values if v in s.graph_outputs))
        return (n.op_type, io, s.attrs[i])

    def _offer(self, side: int, d: int, i: int) -> None:
        if self.match[side][i] >= 0:
            return
        key = self._key(side, d, i)
        k = self._take(self.pools[d][1 - side].get(key), 1 - side)
        if k is not None:
            self._pair(*((i, k) if side == 0 else (k, i)))
            return
        self.pools[d][side][key].append(i)
        self.loose[d][side][key[:2]].append(i)
        self.fresh.append((side, d, i, key[:2]))

    def _take(self, cands: deque[int] | None, side: int) -> int | None:
        """The first node of ``cands`` (on ``side``) still unmatched, removed from it."""
        while cands:
            k = cands.popleft()
            if self.match[side][k] < 0:
                return k
        return None

    def _drain(self) -> None:
        while self.queue:
            pair = self.queue.popleft()
            for side, node in enumerate(pair):
                s = self.sides[side]
                for c in {c for c, _ in s.consumers[node]}:
                    self.wait[side][0][c] -= 1
                    if self.wait[side][0][c] == 0:
                        self._offer(side, 0, c)
                for p in s.producers[node]:
                    self.wait[side][1][p] -= 1
                    if self.wait[side][1][p] == 0:
                        self._offer(side, 1, p)

    def _loose(self) -> bool:
        """Pair each node offered since the last pass with an unmatched one of the same op and wiring whose
        attributes differ; True when any paired. Runs only once no exact key is left to match."""
        found = False
        fresh, self.fresh = self.fresh, []
        for side, d, i, key in fresh:
            if self.match[side][i] >= 0:
                continue
            k = self._take(self.loose[d][1 - side].get(key), 1 - side)
            if k is not None:
                self._pair(*((i, k) if side == 0 else (k, i)))
                found = True
        return found

    # -- comparison -------------------------------------------------------------------------------------
    def _report(self) -> None:
        sa, sb = self.sides
        for i, n in enumerate(sa.nodes):
            j = self.match[0][i]
            if j < 0:
                self.out.append(NodeDiff("removed", n, None, self.scope))
                continue
            m = sb.nodes[j]
            entry = NodeDiff("unchanged", n, m, self.scope)
            self.out.append(entry)
            entry.details = self._compare(i, j)
            if entry.details:
                entry.status = "changed"
        for j, m in enumerate(sb.nodes):
            if self.match[1][j] < 0:
                self.out.append(NodeDiff("added", None, m, self.scope))

    def _compare(self, i: int, j: int) -> list[Detail]:
        sa, sb = self.sides
        x, y = sa.nodes[i], sb.nodes[j]
        out: list[Detail] = []
        if x.op_type != y.op_type:
            out.append(Detail("op", "op", x.op_type, y.op_type))
        for k in list(x.attributes) + [k for k in y.attributes if k not in x.attributes]:
            if k in x.subgraphs or k in y.subgraphs:
                continue
            va, vb = x.attributes.get(k), y.attributes.get(k)
            if k not in x.attributes or k not in y.attributes or not same_value(va, vb):
                out.append(Detail("attribute", k, va, vb))
        out.extend(self._outputs(x, y))
        out.extend(self._inputs(i, j))
        for k in _OVERLAY_KEYS:
            if x.overlay.get(k) != y.overlay.get(k):
                out.append(Detail("overlay", k, x.overlay.get(k), y.overlay.get(k)))
        for k in list(x.properties) + [k for k in y.properties if k not in x.properties]:
            if k != "pseudo" and x.properties.get(k) != y.properties.get(k):
                out.append(Detail("property", k, x.properties.get(k), y.properties.get(k)))
        out.extend(self._bodies(x, y))
        return out

    def _outputs(self, x: ViewNode, y: ViewNode) -> list[Detail]:
        sa, sb = self.sides
        out = []
        va = [(arg.name, v) for arg in x.outputs for v in arg.values]
        vb = [(arg.name, v) for arg in y.outputs for v in arg.values]
        for k in range(max(len(va), len(vb))):
            slot = (va[k] if k < len(va) else vb[k])[0]
            fa = _tensor_facts(sa.g.tensors.get(va[k][1])) if k < len(va) else None
            fb = _tensor_facts(sb.g.tensors.get(vb[k][1])) if k < len(vb) else None
            if fa != fb:
                out.append(Detail("output", slot, fa, fb))
        return out

    def _inputs(self, i: int, j: int) -> list[Detail]:
        """Weights compared by slot; other inputs by where they come from."""
        sa, sb = self.sides
        x, y = sa.nodes[i], sb.nodes[j]
        slots_a = [(arg.name, v) for arg in x.inputs for v in arg.values]
        slots_b = [(arg.name, v) for arg in y.inputs for v in arg.values]
        out = []
        for k in range(max(len(slots_a), len(slots_b))):
            slot = (slots_a[k] if k < len(slots_a) else slots_b[k])[0]
            va = slots_a[k][1] if k < len(slots_a) else None
            vb = slots_b[k][1] if k < len(slots_b) else None
            wa = sa.g.weights.get(va) if va is not None else None
            wb = sb.g.weights.get(vb) if vb is not None else None
            if wa is not None and wb is not None:
                d = compare_weights(slot, wa, wb, self.weights)
                if d is not None:
                    out.append(d)
                continue
            ra, rb = self._source(0, va), self._source(1, vb)
            if ra != rb:
                out.append(Detail("input", slot, self._describe(0, va), self._describe(1, vb)))
        return out

    def _source(self, side: int, v: str | None) -> Any:
        """Where value ``v`` comes from, in terms both sides share."""
        if v is None:
            return None
        s = self.sides[side]
        p = s.producer.get(v)
        if p is not None:
            mid = self._mid(side, p[0])
            return ("n", mid, p[1]) if mid >= 0 else ("unmatched", side, p)
        if v in s.g.weights:
            return ("w", side, v)
        return ("i", self.inputs[side].get(v, v))

    def _describe(self, side: int, v: str | None) -> str | None:
        if v is None:
            return None
        s = self.sides[side]
        p = s.producer.get(v)
        if p is not None:
            n = s.nodes[p[0]]
            return f"{v} (from {n.name or n.op_type})"
        return f"{v} (weight)" if v in s.g.weights else v

    def _bodies(self, x: ViewNode, y: ViewNode) -> list[Detail]:
        out = []
        for key in list(x.subgraphs) + [k for k in y.subgraphs if k not in x.subgraphs]:
            ga, gb = x.subgraphs.get(key), y.subgraphs.get(key)
            if ga is None or gb is None:
                out.append(Detail("subgraph", key, _size(ga), _size(gb)))
                continue
            start = len(self.out)
            _GraphDiff(ga, gb, self.scope + (x.name or x.op_type, key), self.weights, self.out).run()
            inner = [n.status for n in self.out[start:]]
            changed = sum(s != "unchanged" for s in inner)
            values = _values(ga, gb)
            if changed or values:
                out.append(Detail("subgraph", key, _size(ga), _size(gb),
                                  {"changed nodes": changed, "changed inputs/outputs": len(values)}))
        return out


def _size(g: ViewGraph | None) -> str | None:
    return None if g is None else f"{len(g.nodes)} nodes"


def _input_ids(ga: ViewGraph, gb: ViewGraph) -> tuple[dict[str, str], dict[str, str]]:
    """A shared id per graph input: by name where both have it, else by position among the rest."""
    na, nb = [t.name for t in ga.inputs], [t.name for t in gb.inputs]
    ids_a = {n: n for n in na}
    ids_b = {n: n for n in nb}
    rest_a = [n for n in na if n not in ids_b]
    rest_b = [n for n in nb if n not in ids_a]
    for x, y in zip(rest_a, rest_b):
        ids_b[y] = x
    return ids_a, ids_b


def compare_weights(slot: str, wa, wb, values: bool = True) -> Detail | None:
    """Shape, dtype and (same shape, ``values``) max/mean absolute difference of two weights; None if equal."""
    fa, fb = {"shape": wa.shape, "dtype": wa.dtype}, {"shape": wb.shape, "dtype": wb.dtype}
    stats = None
    if values and wa.shape == wb.shape and wa.load is not None and wb.load is not None:
        try:
            xa, xb = np.asarray(wa.load()), np.asarray(wb.load())
        except Exception as exc:          # a damaged or refused weight is reported, the diff goes on
            reason = str(exc) if isinstance(exc, KilnError) else f"{type(exc).__name__}: {exc}"
            return Detail("weight", slot, fa, fb, {"unreadable": " ".join(reason.split())})
        stats = weight_stats(xa, xb)
    if fa == fb and (stats is None or stats.get("max_abs") == 0.0):
        return None
    return Detail("weight", slot, fa, fb, stats)


def weight_stats(xa: np.ndarray, xb: np.ndarray) -> dict[str, float] | None:
    """max and mean |a - b| in float64 (None when the shapes differ; 0/1 inequality for non-numbers)."""
    if xa.shape != xb.shape:
        return None
    if xa.size == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0}
    numeric = all(x.dtype.kind in "biufc" for x in (xa, xb))
    if not numeric:
        ne = np.asarray(xa != xb, dtype=np.float64)
        return {"max_abs": float(ne.max()), "mean_abs": float(ne.mean())}
    if xa.dtype == xb.dtype and xa.tobytes() == xb.tobytes():
        return {"max_abs": 0.0, "mean_abs": 0.0}
    wide = np.complex128 if "c" in xa.dtype.kind + xb.dtype.kind else np.float64
    fa, fb = xa.astype(wide), xb.astype(wide)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.where((fa == fb) | (np.isnan(fa) & np.isnan(fb)), 0.0, np.abs(fa - fb))
    return {"max_abs": float(np.max(d)), "mean_abs": float(np.mean(d))}
