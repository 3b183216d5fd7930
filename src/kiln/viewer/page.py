"""The page data: a ViewModel turned into the JSON the web app and the exporters draw from.

One pane holds one model: its nodes (with the text of their boxes), tensors,
weights, documentation, clusters and each cluster's layout structure. Sizes
and coordinates are not stored: they follow from the view state (expanded
groups, opened subgraphs, toggles, direction) and are computed in the page by
``static/layout.js``, the one implementation (headless export drives the page).

The document (``page_json``)::

    {"kiln": 1, "rankdir": "TB"|"LR", "panes": [pane, ...], "links": [[engine node, [model nodes]]] | None,
     "profile": {...} | None, "errors": {...} | None, "server": bool,
     "toggles": {"attributes", "weights", "names"} (optional), "headless": bool (optional: export)}

A pane: ``title``, ``model`` (facts for the Model panel), ``nodes`` (``op``, ``name``, ``cat``, ``c``: its
cluster, ``g``: its graph, ``in``/``out``: [slot, [tensor ids]], optional ``w``/``wrow``/``attrs``/``arow``/
``doc``/``props``/``sub``: body clusters/``ov``/``erow``/``trow``/``pseudo``/``shape``), ``tensors``
([name, shape text, dtype, optional shorter edge label]), ``weights``, ``docs``, ``graphs`` and ``clusters`` (``kind``: root, group or
body; ``name``, ``parent``, ``owner``, ``items``: [kind, index] with kinds n(ode), c(luster), i(n port),
o(ut port); ``pin``/``pout``: port tensors; ``size``; ``path``; ``s``: the layout structure of
:mod:`kiln.viewer.layout` or None until the server computes it), and ``expanded``: the groups open at first.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from kiln.ir.network import gc_paused
from kiln.viewer import grouping, layout
from kiln.viewer.graph import ViewGraph, ViewModel, ViewNode, ViewWeight

FORMAT_VERSION = 1
EXPAND_ALL = 1500        # graphs up to this many nodes open fully expanded
VISIBLE_BUDGET = 400     # otherwise levels of groups open while about this many boxes stay visible
_ROW_CHARS = 34


LABEL_CHARS = 24         # shape labels on edges longer than this are shortened (the full text on hover)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACKETS = {"floor": ("⌊", "⌋"), "ceil": ("⌈", "⌉")}


def _closing(text: str, i: int) -> int:
    """Index of the parenthesis closing the one at ``text[i]``, or -1."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "(":
            depth += 1
        elif text[j] == ")":
            depth -= 1
            if depth == 0:
                return j
    return -1


def _atomic(dim: str) -> bool:
    """A dim that reads as one factor of a product: a name or number, ``f(…)``, ``(…)``, ``⌊…⌋`` or ``⌈…⌉``."""
    if re.fullmatch(r"-?[\w.?]+", dim):
        return True
    m = re.match(r"[\w.]*\(", dim)
    if m:
        return _closing(dim, m.end() - 1) == len(dim) - 1
    return len(dim) > 1 and dim[0] + dim[-1] in ("⌊⌋", "⌈⌉") and dim.count(dim[0]) == 1


def _factor(dim: Any) -> str:
    """One dim as a factor of the ``×`` product: expressions in parentheses (``(floor(h/2 - 1/2) + 1)``)."""
    text = "?" if dim is None else str(dim).strip()
    return text if _atomic(text) else f"({text})"


def shape_text(shape: list | None) -> str:
    """The full shape: dims joined by ``×``, symbolic expressions parenthesised where they hold an operator."""
    if shape is None:
        return ""
    if not shape:
        return "scalar"
    return "×".join(_factor(d) for d in shape)


def _compact(expr: str) -> str:
    """``floor(x)``/``ceil(x)`` as ``⌊x⌋``/``⌈x⌉``, without spaces."""
    out, i = [], 0
    while i < len(expr):
        m = _IDENT.match(expr, i)
        if m and m.group() in _BRACKETS and m.end() < len(expr) and expr[m.end()] == "(":
            j = _closing(expr, m.end())
            if j > 0:
                left, right = _BRACKETS[m.group()]
                out.append(left + _compact(expr[m.end() + 1:j]) + right)
                i = j + 1
                continue
        if m:
            out.append(m.group())
            i = m.end()
            continue
        if not expr[i].isspace():
            out.append(expr[i])
        i += 1
    return "".join(out)


def shape_label(shape: list | None) -> str:
    """The shape as an edge label: like :func:`shape_text`, shortened when long (``floor`` as ``⌊⌋``, names inside
    expressions cut to their shortest unambiguous prefix, ``batch×16×(⌊h/2-1/2⌋+1)×(⌊w/2-1/2⌋+1)``)."""
    text = shape_text(shape)
    if len(text) <= LABEL_CHARS or not shape:
        return text
    if len(text) > 16 * LABEL_CHARS:           # no file's text gets more than linear work
        return text[:2 * LABEL_CHARS - 1] + "…"
    dims = ["?" if d is None else _compact(str(d)) for d in shape]
    label = "×".join(d if _atomic(d) else f"({d})" for d in dims)
    if len(label) > LABEL_CHARS:
        names = sorted({m.group() for d in dims for m in _IDENT.finditer(d)})
        short = {n: _prefix(n, names) for n in names}
        dims = [d if _IDENT.fullmatch(d) else _IDENT.sub(lambda m: short[m.group()], d) for d in dims]
        label = "×".join(d if _atomic(d) else f"({d})" for d in dims)
    return label if len(label) <= 2 * LABEL_CHARS else label[:2 * LABEL_CHARS - 1] + "…"


def _prefix(name: str, names: list[str]) -> str:
    """The shortest prefix of ``name`` that no other of ``names`` starts with (the whole name if none is)."""
    for k in range(1, len(name)):
        if not any(o != name and o.startswith(name[:k]) for o in names):
            return name[:k]
    return name


def value_text(v: Any, limit: int = 24) -> str:
    """A short display form of an attribute value."""
    if isinstance(v, dict) and "tensor" in v:
        vals = v.get("value")
        if vals is not None and not v.get("truncated") and len(json.dumps(vals)) <= limit:
            text = json.dumps(vals)
        else:
            text = f"{v['tensor']}⟨{shape_text(v.get('shape'))}⟩"
    elif isinstance(v, float):
        text = f"{v:.6g}"
    elif isinstance(v, (list, tuple)):
        text = ", ".join(value_text(x, limit) for x in v)
    elif isinstance(v, bool):
        text = str(v).lower()
    else:
        text = str(v)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _clip(text: str) -> str:
    return text if len(text) <= _ROW_CHARS else text[:_ROW_CHARS - 1] + "…"


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


# Set by `kiln view`, whose process holds one model until it exits: what a build allocated is frozen out of
# later collections instead of being walked by the first one (50k nodes: 0.8 s saved). Library callers keep
# the default, so nothing of theirs is frozen.
FREEZE_AFTER_BUILD = False


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: building a page allocates millions of small, long-lived objects
    and full collections over them cost more than the work itself (10k nodes: 0.7 s → 0.3 s)."""
    was = gc.isenabled()
    with gc_paused():
        try:
            yield
        finally:
            if was and FREEZE_AFTER_BUILD:
                gc.freeze()


@dataclass
class Pane:
    """One model on the page: its JSON, plus what the server computes on request (weights; the layout
    structure of clusters not yet drawn)."""

    data: dict
    weights: list[ViewWeight]
    model: ViewModel
    pending: dict[int, tuple] = field(default_factory=dict)    # cluster → (items, edges, top, bottom)

    def structure(self, cid: int) -> dict:
        """The layout structure of one cluster, computed on first use."""
        c = self.data["clusters"][cid]
        if c["s"] is None:
            with no_gc():
                n, edges, top, bottom = self.pending.pop(cid)
                c["s"] = layout.build(n, edges, top, bottom).to_json()
        return c["s"]

    def complete(self) -> "Pane":
        """Every cluster's structure (for exports, which have no server to ask)."""
        with no_gc():
            for cid in list(self.pending):
                self.structure(cid)
        return self


def build_pane(model: ViewModel, *, title: str | None = None, lazy: bool = False) -> Pane:
    """All the page needs to draw ``model``. With ``lazy`` only the clusters of the first view get their
    layout structure now; the others when :meth:`Pane.structure` asks (the server does, when a group opens)."""
    with no_gc():
        pane = _build_pane(model, title)
        needed = {0} | set(pane.data["expanded"])
        for cid in list(pane.pending):
            if not lazy or cid in needed:
                pane.structure(cid)
    return pane


def _build_pane(model: ViewModel, title: str | None) -> Pane:
    h = grouping.build(model.graph)
    tensors: list[list] = []
    tindex: dict[tuple[int, str], int] = {}

    def tensor(gi: int, name: str) -> int:
        key = (gi, name)
        if key not in tindex:
            t = h.graphs[gi].tensors.get(name)
            tindex[key] = len(tensors)
            entry = [name, shape_text(t.shape) if t else "", (t.dtype or "") if t else ""]
            if t is not None and (label := shape_label(t.shape)) != entry[1]:
                entry.append(label)
            tensors.append(entry)
        return tindex[key]

    weights: list[dict] = []
    wobjs: list[ViewWeight] = []
    windex: dict[tuple[int, str], int] = {}
    for gi, g in enumerate(h.graphs):
        for name, w in g.weights.items():
            windex[(gi, name)] = len(weights)
            wobjs.append(w)
            weights.append({"name": name, "shape": shape_text(w.shape), "dtype": w.dtype or "",
                            "nbytes": w.nbytes, "g": gi, "count": math.prod(w.shape) if w.shape is not None else None})
    docs: list[str] = []
    dindex: dict[str, int] = {}
    nodes = []
    params = 0
    for i, n in enumerate(h.nodes):
        gi = h.node_graph[i]
        g = h.graphs[gi]
        entry: dict[str, Any] = {"op": n.op_type, "name": n.name, "cat": n.category, "c": h.node_cluster[i], "g": gi}
        pseudo = n.properties.get("pseudo")
        if pseudo:
            entry["pseudo"] = pseudo
            t = g.tensors.get(n.name)
            entry["shape"] = shape_text(t.shape) if t else ""
        wrow, wlist = [], []
        ins = []
        for arg in n.inputs:
            ids = []
            for v in arg.values:
                if v in g.weights and (gi, v) in windex:
                    wi = windex[(gi, v)]
                    wlist.append([arg.name, wi])
                    wrow.append(_clip(_weight_row(arg.name, g.weights[v])))
                ids.append(tensor(gi, v))
            ins.append([arg.name, ids])
        entry["in"] = ins
        entry["out"] = [[arg.name, [tensor(gi, v) for v in arg.values]] for arg in n.outputs]
        if wlist:
            entry["w"] = wlist
            entry["wrow"] = wrow
        if n.attributes:
            entry["attrs"] = [[k, _json_safe(v)] for k, v in n.attributes.items()]
            entry["arow"] = [_clip(f"{k} = {value_text(v)}") for k, v in n.attributes.items()]
        if n.doc:
            if n.doc not in dindex:
                dindex[n.doc] = len(docs)
                docs.append(n.doc)
            entry["doc"] = dindex[n.doc]
        props = {k: _json_safe(v) for k, v in n.properties.items() if k != "pseudo"}
        if props:
            entry["props"] = props
        if i in h.bodies:
            entry["sub"] = h.bodies[i]
        if n.overlay:
            entry["ov"] = _json_safe(n.overlay)
            facts = [str(n.overlay[k]) for k in ("precision", "tactic") if n.overlay.get(k)]
            if facts:
                entry["erow"] = [_clip(" · ".join(facts))]
            if n.overlay.get("time_ms") is not None:
                entry["trow"] = f"{n.overlay['time_ms']:.3f} ms · {n.overlay.get('percent', 0.0):.1f}%"
        nodes.append(entry)
    _fold_constants(h, nodes, tensors, tensor)
    for w in h.graphs[0].weights.values():
        if w.shape is not None:
            params += math.prod(w.shape)
    clusters = []
    pending = {}
    for c in h.clusters:
        pos_in = {i for i, it in enumerate(c.items) if it[0] == grouping.PORT_IN}
        pos_out = {i for i, it in enumerate(c.items) if it[0] == grouping.PORT_OUT}
        gi = c.graph
        pending[c.id] = (len(c.items), [(a, b, tensor(gi, t)) for a, b, t in c.edges], pos_in, pos_out)
        clusters.append({"kind": c.kind, "name": c.name, "parent": c.parent, "owner": c.owner,
                         "items": [list(it) for it in c.items], "pin": [tensor(gi, t) for t in c.ports_in],
                         "pout": [tensor(gi, t) for t in c.ports_out], "size": c.size, "path": "/".join(c.path),
                         "s": None})
    graphs = [{"name": g.name, "inputs": [tensor(gi, t.name) for t in g.inputs],
               "outputs": [tensor(gi, t.name) for t in g.outputs]} for gi, g in enumerate(h.graphs)]
    pane = {"title": title or (os.path.basename(model.path) if model.path else model.graph.name),
            "model": _model_info(model, len(h.graphs[0].nodes), params),
            "nodes": nodes, "tensors": tensors, "weights": weights, "docs": docs, "clusters": clusters,
            "graphs": graphs}
    pane["expanded"] = sorted(default_expanded(pane))
    return Pane(pane, wobjs, model, pending)


def _uses(g: ViewGraph) -> dict[str, int]:
    """How many node inputs, graph outputs and (recursively) body nodes read each value of ``g``."""
    count: dict[str, int] = {}
    for n in g.nodes:
        for arg in n.inputs:
            for v in arg.values:
                count[v] = count.get(v, 0) + 1
        for sub in n.subgraphs.values():
            for v, k in _uses(sub).items():
                count[v] = count.get(v, 0) + k
    for t in g.outputs:
        count[t.name] = count.get(t.name, 0) + 1
    return count


def _fold_constants(h: grouping.Hierarchy, nodes: list[dict], tensors: list[list],
                    tensor: Callable[[int, str], int]) -> None:
    """Mark each constant read once, by a node of its own cluster, as folded into that reader (``fold``) and
    give the reader one row per such constant (``krow``; ``kin``: the folded nodes). A constant is a node
    with no inputs, no bodies and one output value; the page hides it while the Compact toggle is on."""
    uses = [_uses(g) for g in h.graphs]
    reader: dict[tuple[int, str], tuple[int, str]] = {}
    for i, n in enumerate(h.nodes):
        for arg in n.inputs:
            for v in arg.values:
                reader[(h.node_graph[i], v)] = (i, arg.name)
    for i, n in enumerate(h.nodes):
        if n.subgraphs or "pseudo" in n.properties or any(a.values for a in n.inputs):
            continue
        outs = [v for a in n.outputs for v in a.values]
        gi = h.node_graph[i]
        if len(outs) != 1 or uses[gi].get(outs[0]) != 1 or (gi, outs[0]) not in reader:
            continue
        j, slot = reader[(gi, outs[0])]
        if h.node_cluster[j] != h.node_cluster[i] or j == i:
            continue
        nodes[i]["fold"] = j
        nodes[j].setdefault("kin", []).append(i)
        nodes[j].setdefault("krow", []).append(_clip(_constant_row(slot, n, tensors[tensor(gi, outs[0])])))


def _constant_row(slot: str, node: ViewNode, t: list) -> str:
    """``slot = value`` for a short scalar or vector constant, else ``slot ⟨shape⟩ dtype``."""
    value = next((v for v in node.attributes.values() if isinstance(v, dict) and "tensor" in v), {})
    if value.get("value") is not None and not value.get("truncated") and len(value.get("shape", [0, 0])) <= 1:
        text = value_text(value["value"], 20)
        if not text.endswith("…"):
            return f"{slot} = {text}" if not value["shape"] else f"{slot} = [{text}]"
    shape = t[1] or (shape_text(value["shape"]) if "shape" in value else "?")
    return f"{slot} ⟨{shape}⟩ {t[2] or value.get('tensor', '')}".rstrip()


def _weight_row(slot: str, w) -> str:
    if w.shape is not None and math.prod(w.shape) <= 4 and (w.nbytes or 0) <= 64 and w.load is not None:
        try:
            arr = w.load()
            vals = arr.reshape(-1).tolist()
            text = value_text(vals[0] if not w.shape else vals, 20)
            return f"{slot} = {text}"
        except Exception:
            pass
    return f"{slot} ⟨{shape_text(w.shape)}⟩"


def _model_info(model: ViewModel, node_count: int, params: int) -> dict:
    g = model.graph
    info = {"format": model.format, "producer": model.producer, "version": model.version,
            "graph": g.name, "nodes": node_count, "parameters": params, "file_size": model.file_size,
            "path": os.path.basename(model.path) if model.path else None,
            "inputs": [[t.name, shape_text(t.shape), t.dtype or ""] for t in g.inputs],
            "outputs": [[t.name, shape_text(t.shape), t.dtype or ""] for t in g.outputs],
            "properties": _json_safe(model.properties), "warnings": [str(w) for w in model.warnings]}
    return info


def default_expanded(pane: dict) -> set[int]:
    """Every group when the graph is small; otherwise whole levels of the group tree, outermost first, as long
    as about VISIBLE_BUDGET boxes stay on screen (a level opens completely or not at all)."""
    clusters = pane["clusters"]
    groups = [i for i, c in enumerate(clusters) if c["kind"] == "group"]
    if clusters[0]["size"] <= EXPAND_ALL:
        return set(groups)
    visible = len(clusters[0]["items"])
    out: set[int] = set()
    level = [idx for kind, idx in clusters[0]["items"] if kind == "c"]
    while level:
        cost = sum(sum(1 for k, _ in clusters[cid]["items"] if k in ("n", "c")) - 1 for cid in level)
        if visible + cost > VISIBLE_BUDGET:
            break
        visible += cost
        out.update(level)
        level = [idx for cid in level for kind, idx in clusters[cid]["items"] if kind == "c"]
    return out


def page_json(panes: list[Pane], *, rankdir: str = "TB", links: list | None = None,
              profile: dict | None = None, errors: dict | None = None, server: bool = False) -> dict:
    """The whole document: one pane, or an engine pane beside its ONNX model."""
    return {"kiln": FORMAT_VERSION, "rankdir": rankdir, "panes": [p.data for p in panes],
            "links": links, "profile": profile, "errors": errors, "server": server}


# Characters that could end or re-mode an inline <script> (``</script>``, ``<!--``, ``-->``), plus the two line
# separators old JavaScript parsers reject: all become \uXXXX escapes, which JSON.parse reads back unchanged.
_SCRIPT_SAFE = [(c, f"\\u{ord(c):04x}") for c in "<>&\u2028\u2029"]


def _undumpable(v: Any) -> str:
    """Bytes that slipped through a reader become text (invalid UTF-8 kept visible as \\x escapes)."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", "backslashreplace")
    return str(v)


def _finite(v: Any) -> Any:
    """A copy of ``v`` with non-finite floats as the strings JavaScript prints for them (JSON has no NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps(page: dict) -> str:
    """JSON that no string inside it can break out of when embedded in a <script> element.

    A NaN or infinity read from a file is written as a string; a lone surrogate (a file's invalid
    Unicode escape) as its \\u escape, so the text always encodes as UTF-8."""
    try:
        text = json.dumps(page, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_undumpable)
    except ValueError:
        text = json.dumps(_finite(page), separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                          default=_undumpable)
    for char, escape in _SCRIPT_SAFE:     # str.replace: far faster than str.translate on a page of megabytes
        text = text.replace(char, escape)
    if _SURROGATE.search(text):
        text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text
