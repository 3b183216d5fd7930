"""The diff page: two models as one merged graph, or a model beside its engine, each node and group marked
with its diff status.

Every pane node gets ``df`` (its status: added, removed, changed, unchanged; for
a model beside its engine: kept, fused, plugin, folded, inserted; ``io`` for an
unchanged graph input or output) and every cluster the roll-up of its members
(``mixed`` when they differ in a build view); a node with constants folded into
it (``kin``) gets their statuses as ``kdf``, for its rows. ``page["diff"]`` holds the counts,
the model-level differences and the list of changes in graph order, each with
the pane nodes it is drawn at (``at``: [pane, node] pairs) and its before/after
rows as text made by :mod:`kiln.viewer.diff_report` (the page formats nothing
itself).
"""
from __future__ import annotations

import os
from typing import Any

from kiln.viewer import grouping
from kiln.viewer.diff import ModelDiff, rollup
from kiln.viewer.diff_build import BuildDiff
from kiln.viewer.diff_merge import merge
from kiln.viewer.diff_report import compare, detail_parts, show
from kiln.viewer.graph import ViewModel, ViewNode
from kiln.viewer.page import Pane, build_pane, page_json
from kiln.viewer.server import Document


def build_diff_document(a: Any, b: Any, *, rankdir: str = "TB", server: bool = False,
                        weights: bool = True) -> Document:
    """Read both models (paths, ModelProtos or ViewModels), diff them and lay them out for the page: two models
    as one merged graph; a model and its engine side by side, the engine first and linked to the model."""
    from kiln.viewer.documents import engine_links, open_view_model
    va, vb = open_view_model(a), open_view_model(b)
    d = compare(va, vb, weights=weights)
    if isinstance(d, BuildDiff):
        models = [d.engine, d.model]
        status = [{id(lo.layer): lo.status for lo in d.layers}, {id(f.node): f.status for f in d.nodes}]
        panes = [build_pane(m, title=_title(m), lazy=server) for m in models]
        index = [_mark(p, m, s, {}, "kept") for p, m, s in zip(panes, models, status)]
        page = page_json(panes, rankdir=rankdir, links=engine_links(panes[0], panes[1]), server=server)
        page["diff"] = _build_info(d, index)
        return Document(page=page, panes=panes)
    merged = merge(d)
    title = f"{_title(va)} → {os.path.basename(vb.path) if vb.path else vb.graph.name}"
    pane = build_pane(merged.model, title=title, lazy=server)
    index = _mark(pane, merged.model, merged.status, _io_status(d), "unchanged")
    where = {}
    for key, (x, y) in merged.origin.items():
        if key in index:
            where[id(y) if y is not None else id(x)] = index[key]
    page = page_json([pane], rankdir=rankdir, server=server)
    page["diff"] = _models_info(d, where)
    return Document(page=page, panes=[pane])


def _title(m: ViewModel) -> str:
    return f"{m.format} · {os.path.basename(m.path) if m.path else m.graph.name}"


def _io_status(d: ModelDiff) -> dict[tuple[str, str], str]:
    """Graph inputs and outputs added, removed or changed, from the model-level details."""
    out: dict[tuple[str, str], str] = {}
    for x in d.model:
        if x.kind in ("input", "output"):
            out[(x.kind, x.name)] = "changed" if x.a is not None and x.b is not None else \
                "added" if x.a is None else "removed"
    return out


def _mark(pane: Pane, model: ViewModel, status: dict[int, str], io: dict[tuple[str, str], str],
          quiet: str) -> dict[int, int]:
    """Set ``df`` on the pane's nodes and clusters; returns the pane index of each view node (by id())."""
    nodes, clusters = pane.data["nodes"], pane.data["clusters"]
    order = _pane_order(model, nodes)
    index: dict[int, int] = {}
    members: list[set[str]] = [set() for _ in clusters]
    for i, (vn, entry) in enumerate(zip(order, nodes)):
        if entry.get("pseudo"):
            entry["df"] = io.get((entry["pseudo"], entry["name"]), "io")
            continue
        index[id(vn)] = i
        entry["df"] = st = status.get(id(vn), quiet)
        c = entry["c"]
        while c is not None and c >= 0:
            members[c].add(st)
            cl = clusters[c]
            c = nodes[cl["owner"]]["c"] if cl["kind"] == "body" else cl["parent"]
    for c, s in zip(clusters, members):
        c["df"] = (rollup(s) if quiet == "unchanged" else next(iter(s)) if len(s) == 1 else "mixed") if s else quiet
    for entry in nodes:                # with Compact on, a folded constant's status shows on its row in the reader
        if "kin" in entry:
            entry["kdf"] = [nodes[k]["df"] for k in entry["kin"]]
    return index


def _real_nodes(g) -> list[ViewNode]:
    """A graph's nodes, then each body's (recursively), in the order grouping.build lists them."""
    out = list(g.nodes)
    for n in g.nodes:
        for sub in n.subgraphs.values():
            out += _real_nodes(sub)
    return out


def _pane_order(model: ViewModel, nodes: list[dict]) -> list[ViewNode | None]:
    """The view node behind each pane node (None for input/output pseudo-nodes); checked name by name, and
    taken from grouping.build itself should the order ever differ."""
    real = iter(_real_nodes(model.graph))
    order: list[ViewNode | None] = [None if e.get("pseudo") else next(real, None) for e in nodes]
    if all(e.get("pseudo") or (vn is not None and vn.name == e["name"] and vn.op_type == e["op"])
           for vn, e in zip(order, nodes)) and next(real, None) is None:
        return order
    return [None if e.get("pseudo") else vn for vn, e in zip(grouping.build(model.graph).nodes, nodes)]


def _node_title(n: ViewNode | None) -> str:
    if n is None:
        return ""
    return f"{show(n.name)} ({show(n.op_type)})" if n.name else show(n.op_type)


def _models_info(d: ModelDiff, where: dict[int, int]) -> dict:
    changes = []
    for n in d.changes():
        at = where.get(id(n.b) if n.b is not None else id(n.a))
        changes.append({"s": n.status, "at": [[0, at]] if at is not None else [], "scope": [show(s) for s in n.scope],
                        "title": _node_title(n.node), "rows": [list(detail_parts(x)) for x in n.details]})
    changes.sort(key=lambda c: c["at"][0][1] if c["at"] else -1)
    return {"mode": "models", "counts": d.counts(), "differs": d.differs,
            "model": [list(detail_parts(x)) for x in d.model], "changes": changes}


def _build_info(d: BuildDiff, index: list[dict[int, int]]) -> dict:
    changes = []
    for lo in d.layers:
        if lo.status == "kept" and not lo.missing:
            continue
        facts = [f"{k} {show(lo.layer.overlay[k])}" for k in ("precision", "tactic") if lo.layer.overlay.get(k)]
        rows = [["built from", ", ".join(_node_title(n) for n in lo.nodes) or "(nothing: inserted by the build)",
                 None, "; ".join(facts)]]
        if lo.missing:
            rows.append(["not in the model", ", ".join(show(m) for m in lo.missing), None, ""])
        at = [[0, index[0].get(id(lo.layer))]] + [[1, index[1].get(id(n))] for n in lo.nodes[:1]]
        changes.append({"s": lo.status, "at": [p for p in at if p[1] is not None],
                        "scope": [show(s) for s in lo.scope], "title": _node_title(lo.layer), "rows": rows})
    for f in d.nodes:
        if f.status == "folded":
            at = index[1].get(id(f.node))
            changes.append({"s": "folded", "at": [[1, at]] if at is not None else [],
                            "scope": [show(s) for s in f.scope], "title": _node_title(f.node),
                            "rows": [["no layer", "folded away by the build", None, ""]]})
    model = [[f"tensor {show(n)}", "×".join(map(str, ms)), "×".join(map(str, es)), "model → engine"]
             for n, ms, es in d.shapes]
    return {"mode": "build", "counts": d.counts(), "differs": d.differs, "model": model, "changes": changes}
