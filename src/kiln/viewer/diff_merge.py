"""One graph for a model diff: the second model with the first one's removed nodes put back in.

Removed nodes read the tensors of the matched nodes that replaced their producers
(or their own, renamed ``… (removed)`` where the second model uses the name for
another value); a matched node that read a removed node's output gets that edge
as an extra ``(removed)`` input, so the picture shows where the removed nodes
sat. If/Loop bodies are merged the same way. Nodes are ordered topologically,
each removed node near its old neighbours.
"""
from __future__ import annotations

import dataclasses
import heapq

from kiln.viewer.diff import ModelDiff
from kiln.viewer.graph import ViewArgument, ViewGraph, ViewModel, ViewNode, ViewTensor

REMOVED_SLOT = "(removed)"


@dataclasses.dataclass
class MergedModel:
    model: ViewModel
    status: dict[int, str]                  # id(merged node) → diff status
    origin: dict[int, tuple]                # id(merged node) → (node in a or None, node in b or None)


def merge(d: ModelDiff) -> MergedModel:
    """The merged view model of ``d`` and each of its nodes' status."""
    partner: dict[int, ViewNode] = {id(n.a): n.b for n in d.nodes if n.a is not None and n.b is not None}
    status: dict[int, str] = {}
    for n in d.nodes:
        for x in (n.a, n.b):
            if x is not None:
                status[id(x)] = n.status
    out = MergedModel(d.b, {}, {})
    graph = _Merger(partner, status, out).graph(d.a.graph, d.b.graph)
    b = d.b
    out.model = ViewModel(format=b.format, path=b.path, producer=b.producer, version=b.version,
                          properties=b.properties, graphs=[graph], file_size=b.file_size,
                          warnings=list(dict.fromkeys(d.a.warnings + b.warnings)))
    return out


def _outputs(n: ViewNode) -> list[str]:
    return [v for arg in n.outputs for v in arg.values]


class _Merger:
    def __init__(self, partner: dict[int, ViewNode], status: dict[int, str], out: MergedModel) -> None:
        self.partner, self.status, self.out = partner, status, out

    def _mark(self, node: ViewNode, status: str, a: ViewNode | None, b: ViewNode | None) -> None:
        self.out.status[id(node)] = status
        self.out.origin[id(node)] = (a, b)

    def _whole(self, g: ViewGraph, status: str, side: int) -> None:
        """Bodies of an added or removed node: every node inside has that status."""
        for n in g.nodes:
            self._mark(n, status, n if side == 0 else None, n if side == 1 else None)
            for sub in n.subgraphs.values():
                self._whole(sub, status, side)

    def graph(self, ga: ViewGraph, gb: ViewGraph) -> ViewGraph:
        m = ViewGraph(name=gb.name, inputs=list(gb.inputs), outputs=list(gb.outputs), tensors=dict(gb.tensors),
                      weights=dict(gb.weights))
        producer = {v: (n, k) for n in ga.nodes for k, v in enumerate(_outputs(n))}
        names: dict[str, str] = {}

        def name_in_m(t: str) -> str:
            """What a removed node's tensor ``t`` (of graph a) is called in the merged graph."""
            if t in names:
                return names[t]
            p = producer.get(t)
            other = self.partner.get(id(p[0])) if p is not None else None
            if other is not None and p[1] < len(_outputs(other)):
                new = _outputs(other)[p[1]]
            elif p is None and t not in ga.weights and t in gb.tensors:
                new = t                               # a graph input (or outer value) both have
            else:
                new = t if t not in m.tensors else f"{t} {REMOVED_SLOT}"
                old = ga.tensors.get(t)
                m.tensors[new] = ViewTensor(new, old.shape if old else None, old.dtype if old else None)
                if t in ga.weights:
                    m.weights[new] = ga.weights[t]
            names[t] = new
            return new

        keyed: list[tuple[float, ViewNode]] = []
        last = -1.0
        b_pos = {id(n): i for i, n in enumerate(gb.nodes)}
        merged_b: dict[int, ViewNode] = {}
        for k, x in enumerate(ga.nodes):
            y = self.partner.get(id(x))
            if y is not None:
                last = b_pos.get(id(y), last)
                continue
            copy = dataclasses.replace(x, inputs=[ViewArgument(a.name, [name_in_m(v) for v in a.values])
                                                  for a in x.inputs],
                                       outputs=[ViewArgument(a.name, [name_in_m(v) for v in a.values])
                                                for a in x.outputs])
            self._mark(copy, "removed", x, None)
            for sub in x.subgraphs.values():
                self._whole(sub, "removed", 0)
            keyed.append((last + 0.5 + k * 1e-9, copy))
        for x in ga.nodes:                            # matched readers of a removed node's output
            y = self.partner.get(id(x))
            if y is None:
                continue
            extra = [name_in_m(v) for a in x.inputs for v in a.values
                     if v in producer and id(producer[v][0]) not in self.partner]
            bodies = {k: self.graph(x.subgraphs[k], sub) if k in x.subgraphs else sub for k, sub in y.subgraphs.items()}
            if extra or bodies:
                merged_b[id(y)] = dataclasses.replace(
                    y, inputs=y.inputs + ([ViewArgument(REMOVED_SLOT, extra)] if extra else []), subgraphs=bodies)
        for i, y in enumerate(gb.nodes):     # b's nodes keep their places; removed ones sit between them
            node = merged_b.get(id(y), y)
            self._mark(node, self.status.get(id(y), "added"), None, y)
            if self.status.get(id(y)) == "added":
                for sub in y.subgraphs.values():
                    self._whole(sub, "added", 1)
            keyed.append((float(i), node))
        m.nodes = _topological(keyed)
        return m


def _topological(keyed: list[tuple[float, ViewNode]]) -> list[ViewNode]:
    """The nodes in key order, except that a node never comes before the producer of one of its inputs."""
    keyed.sort(key=lambda kv: kv[0])
    nodes = [n for _, n in keyed]
    producer = {v: i for i, n in enumerate(nodes) for v in _outputs(n)}
    waiting = [0] * len(nodes)
    readers: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        for p in {producer[v] for a in n.inputs for v in a.values if v in producer and producer[v] != i}:
            waiting[i] += 1
            readers[p].append(i)
    heap = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        i = heapq.heappop(heap)
        order.append(nodes[i])
        for r in readers[i]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(heap, r)
    if len(order) < len(nodes):                      # a cycle (a malformed file): keep the rest in key order
        seen = {id(n) for n in order}
        order += [n for n in nodes if id(n) not in seen]
    return order
