"""Clusters: the view graph cut into nested boxes by name scope, each laid out on its own.

A cluster is the root of a graph, a name-scope group (``/model.24/m.0/Conv`` →
``model.24`` → ``m.0``) or the body of an If/Loop/Scan node. Its items are
nodes, child clusters and ports; a port stands for a value crossing the
cluster's border (entry ports on top, exit ports at the bottom), so that an
edge from deep inside one group to deep inside another is drawn as one
segment per cluster it passes through, and each cluster's layout never looks
outside itself. A group with a single member, or with fewer than MIN_GROUP nodes, is
dissolved into its parent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kiln.viewer.graph import ViewArgument, ViewGraph, ViewNode

MIN_GROUP = 3          # groups of fewer nodes are drawn as plain nodes in their parent
# item kinds inside a cluster
NODE, CLUSTER, PORT_IN, PORT_OUT = "n", "c", "i", "o"


@dataclass
class Cluster:
    id: int
    kind: str                              # "root", "group" or "body"
    name: str
    graph: int                             # index into Hierarchy.graphs
    parent: int | None = None              # enclosing cluster (None for a graph's root)
    owner: int | None = None               # node owning a body cluster
    items: list[tuple[str, int]] = field(default_factory=list)   # (kind, index); ports index ports_in/out
    ports_in: list[str] = field(default_factory=list)           # tensor names entering
    ports_out: list[str] = field(default_factory=list)          # tensor names leaving
    edges: list[tuple[int, int, str]] = field(default_factory=list)   # (item, item, tensor)
    size: int = 0                          # nodes inside, at any depth
    path: tuple[str, ...] = ()             # full name-scope path


@dataclass
class Hierarchy:
    graphs: list[ViewGraph]
    nodes: list[ViewNode]                  # every node of every graph, plus input/output pseudo-nodes
    node_graph: list[int]
    node_cluster: list[int]
    clusters: list[Cluster]
    bodies: dict[int, list[int]]           # node index → its body clusters, in subgraph order

    def root(self) -> Cluster:
        return self.clusters[0]


def build(graph: ViewGraph) -> Hierarchy:
    """Group ``graph`` (and its subgraphs, recursively) into clusters."""
    h = Hierarchy([], [], [], [], [], {})
    _Builder(h).graph(graph, "root", graph.name, None, None)
    return h


def _leaves(t: dict) -> list[int]:
    out = []
    for kind, child in t["children"]:
        out.extend([child] if kind == "n" else _leaves(child))
    return out


def _pseudo(kind: str, name: str) -> ViewNode:
    arg = [ViewArgument(name, [name])]
    if kind == "input":
        return ViewNode(id=f"input:{name}", name=name, op_type="Input", category="data", outputs=arg,
                        properties={"pseudo": "input"})
    return ViewNode(id=f"output:{name}", name=name, op_type="Output", category="data", inputs=arg,
                    properties={"pseudo": "output"})


class _Builder:
    def __init__(self, h: Hierarchy) -> None:
        self.h = h

    def graph(self, g: ViewGraph, kind: str, name: str, parent: int | None, owner: int | None) -> int:
        h = self.h
        gi = len(h.graphs)
        h.graphs.append(g)
        root = self._cluster(kind, name, gi, parent, owner, ())
        members: list[int] = []
        produced = {w for w in g.weights}
        for t in g.inputs:
            members.append(self._node(_pseudo("input", t.name), gi))
            produced.add(t.name)
        free: list[str] = []
        for n in g.nodes:
            for arg in n.inputs:
                for v in arg.values:
                    if v not in produced and v not in free:
                        free.append(v)
            for arg in n.outputs:
                produced.update(arg.values)
            members.append(self._node(n, gi))
        if kind == "root":      # dangling values of the main graph are shown as inputs
            for v in free:
                members.insert(len(g.inputs), self._node(_pseudo("input", v), gi))
            free = []
        for t in g.outputs:
            members.append(self._node(_pseudo("output", t.name), gi))
        self._group(root, members)
        self._edges(g, members, root, free)
        for i in members:
            node = h.nodes[i]
            if node.subgraphs:
                h.bodies[i] = [self.graph(sub, "body", key, h.node_cluster[i], i)
                               for key, sub in node.subgraphs.items()]
        return root

    def _cluster(self, kind, name, gi, parent, owner, path) -> int:
        c = Cluster(len(self.h.clusters), kind, name, gi, parent, owner, path=path)
        self.h.clusters.append(c)
        return c.id

    def _node(self, node: ViewNode, gi: int) -> int:
        h = self.h
        h.nodes.append(node)
        h.node_graph.append(gi)
        h.node_cluster.append(-1)
        return len(h.nodes) - 1

    def _group(self, root: int, members: list[int]) -> None:
        """Build the scope trie, dissolve single-member groups, and emit clusters."""
        h = self.h
        trie: dict = {"children": [], "index": {}}
        at: dict[tuple[str, ...], dict] = {(): trie}
        for i in members:
            node = h.nodes[i]
            path = () if "pseudo" in node.properties else node.group
            t = at.get(path)
            if t is None:
                t = trie
                for part in path:
                    sub = t["index"].get(part)
                    if sub is None:
                        sub = {"children": [], "index": {}, "name": part}
                        t["index"][part] = sub
                        t["children"].append(("t", sub))
                    t = sub
                at[path] = t
            t["children"].append(("n", i))

        def count(t: dict) -> int:
            t["size"] = sum(1 if kind == "n" else count(child) for kind, child in t["children"])
            return t["size"]

        count(trie)

        def emit(t: dict, cid: int) -> None:
            c = h.clusters[cid]
            c.size = t["size"]
            for kind, child in t["children"]:
                while kind == "t" and len(child["children"]) == 1:       # dissolve single-member groups
                    kind, grand = child["children"][0]
                    if kind == "t":
                        grand = dict(grand, name=f"{child['name']}/{grand['name']}")
                    child = grand
                if kind == "t" and child["size"] < MIN_GROUP:                # too small to be worth a frame
                    for i in _leaves(child):
                        c.items.append((NODE, i))
                        h.node_cluster[i] = cid
                elif kind == "n":
                    c.items.append((NODE, child))
                    h.node_cluster[child] = cid
                else:
                    sub = self._cluster("group", child["name"], c.graph, cid, None, c.path + (child["name"],))
                    c.items.append((CLUSTER, sub))
                    emit(child, sub)

        emit(trie, root)

    def _edges(self, g: ViewGraph, members: list[int], root: int, free: list[str]) -> None:
        """Route every producer→consumer edge through the clusters between them."""
        h = self.h
        producer: dict[str, int] = {}
        for i in members:
            for arg in h.nodes[i].outputs:
                for v in arg.values:
                    producer[v] = i
        item_of: dict[tuple[str, int], int] = {}      # (kind, index) → position in its cluster's items
        for cid in range(root, len(h.clusters)):
            for pos, it in enumerate(h.clusters[cid].items):
                item_of[it] = pos
        seen: set = set()
        ports: dict[tuple[int, str, str], int] = {}

        def port(cid: int, kind: str, tensor: str) -> int:
            key = (cid, kind, tensor)
            if key not in ports:
                c = h.clusters[cid]
                lst = c.ports_in if kind == PORT_IN else c.ports_out
                lst.append(tensor)
                c.items.append((kind, len(lst) - 1))
                ports[key] = len(c.items) - 1
            return ports[key]

        def add(cid: int, a: int, b: int, tensor: str) -> None:
            key = (cid, a, b, tensor)
            if key not in seen:
                seen.add(key)
                h.clusters[cid].edges.append((a, b, tensor))

        def chain(i: int) -> list[tuple[int, int]]:
            """(cluster, item position) pairs from the node up to its graph's root."""
            out = [(h.node_cluster[i], item_of[(NODE, i)])]
            cid = h.node_cluster[i]
            while cid != root:
                parent = h.clusters[cid].parent
                out.append((parent, item_of[(CLUSTER, cid)]))
                cid = parent
            return out

        chains: dict[int, list[tuple[int, int]]] = {}
        for v in members:
            for arg in h.nodes[v].inputs:
                for t in arg.values:
                    u = producer.get(t)
                    if u is None:
                        if t in free:
                            self._enter(chains.setdefault(v, chain(v)), root, t, port, add)
                        continue
                    cu = chains.setdefault(u, chain(u))
                    cv = chains.setdefault(v, chain(v))
                    iu, iv = len(cu) - 1, len(cv) - 1
                    while iu > 0 and iv > 0 and cu[iu - 1][0] == cv[iv - 1][0]:
                        iu, iv = iu - 1, iv - 1
                    lca = cu[iu][0]
                    for k in range(iu):                 # out through each group between u and the lca
                        add(cu[k][0], cu[k][1], port(cu[k][0], PORT_OUT, t), t)
                    for k in range(iv):                 # in through each group down to v
                        add(cv[k][0], port(cv[k][0], PORT_IN, t), cv[k][1], t)
                    add(lca, cu[iu][1], cv[iv][1], t)

    def _enter(self, cv, root, t, port, add) -> None:
        """An outer-scope value used inside a body: an entry port at every level down to the node."""
        for cid, pos in cv:
            add(cid, port(cid, PORT_IN, t), pos, t)
