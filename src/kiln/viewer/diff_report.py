"""What ``kiln diff a b`` prints: two models (or a model and its engine) compared, as text or JSON."""
from __future__ import annotations

import os
import sys
from typing import Any

from kiln.viewer.diff import Detail, ModelDiff, NodeDiff, diff_models
from kiln.viewer.diff_build import BuildDiff, explain_build
from kiln.viewer.graph import ViewModel, ViewNode

_MARK = {"added": "+", "removed": "-", "changed": "~", "unchanged": "="}
_VALUE_CHARS = 80


def compare(a: ViewModel, b: ViewModel, *, weights: bool = True) -> ModelDiff | BuildDiff:
    """A model and a Kiln engine: the build explained; any other two models: the node diff."""
    ea, eb = a.format == "Kiln engine", b.format == "Kiln engine"
    if ea != eb:
        return explain_build(b, a) if ea else explain_build(a, b)
    return diff_models(a, b, weights=weights)


def show(text: Any) -> str:
    """Text from a file made safe for one terminal line: control and format characters as escapes."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in s)


def value(v: Any) -> str:
    """An attribute value, tensor facts or weight facts in one short piece of text."""
    from kiln.viewer.page import shape_text, value_text
    if v is None:
        return "(none)"
    if isinstance(v, dict) and set(v) == {"shape", "dtype"}:
        if v["shape"] is None and v["dtype"] is None:
            return "unknown"
        return show(f"{v['dtype'] or '?'} {shape_text(v['shape']) or '?'}")
    if isinstance(v, (list, tuple)):
        return show("[" + value_text(list(v), _VALUE_CHARS) + "]")
    return show(value_text(v, _VALUE_CHARS))


def _node(n: ViewNode | None) -> str:
    if n is None:
        return "(none)"
    return f"{show(n.name)} ({show(n.op_type)})" if n.name else show(n.op_type)


def _where(scope: tuple[str, ...]) -> str:
    return "".join(f"{show(s)} › " for s in scope)


_LABEL = {"op": "op", "attribute": "attribute", "output": "output", "weight": "weight", "input": "input",
          "subgraph": "body"}


def detail_parts(d: Detail) -> tuple[str, str, str | None, str]:
    """(label, before, after, note) of one difference; ``after`` is None when only values differ."""
    label = f"{_LABEL.get(d.kind, '')} {show(d.name)}".strip()
    after = None if d.kind == "weight" and d.a == d.b else value(d.b)
    note = ""
    if d.stats:
        if "unreadable" in d.stats:
            note = f"values not compared: {show(d.stats['unreadable'])}"
        elif "max_abs" in d.stats:
            note = f"max |a-b| {d.stats['max_abs']:.6g}, mean {d.stats['mean_abs']:.6g}"
        else:
            note = ", ".join(f"{v} {k}" for k, v in d.stats.items() if v)
    return label, value(d.a), after, note


def _detail(d: Detail) -> str:
    label, before, after, note = detail_parts(d)
    text = f"{label}: {before}" + (f" → {after}" if after is not None else "")
    return text + (f"; {note}" if note else "")


def _model_line(m: ViewModel, what: str) -> str:
    name = os.path.basename(m.path) if m.path else m.graph.name
    facts = [m.format] + ([m.version] if m.version else []) + [f"{len(m.graph.nodes)} {what}"]
    return f"{show(name)}: {', '.join(show(f) for f in facts)}"


def text_lines(d: ModelDiff | BuildDiff) -> list[str]:
    """Counts first, then each change (or each layer of the build) on its own line."""
    if isinstance(d, BuildDiff):
        return _build_lines(d)
    lines = [_model_line(d.a, "nodes"), _model_line(d.b, "nodes")]
    c = d.counts()
    lines.append(", ".join(f"{c[s]} {s}" for s in ("added", "removed", "changed", "unchanged")))
    lines += [_detail(x) for x in d.model]
    for n in d.changes():
        lines.append(f"{_MARK[n.status]} {_where(n.scope)}{_node(n.a if n.status == 'removed' else n.b)}")
        if n.status == "changed" and n.a is not None and n.a.name != n.b.name:
            lines.append(f"    matched {_node(n.a)}")
        lines += [f"    {_detail(x)}" for x in n.details]
        if n.status in ("added", "removed") and n.node.attributes:
            lines.append("    " + ", ".join(f"{show(k)} = {value(v)}" for k, v in n.node.attributes.items()))
    return lines


def _build_lines(d: BuildDiff) -> list[str]:
    c = d.counts()
    lines = [_model_line(d.model, "nodes"), _model_line(d.engine, "layers")]
    nodes, layers = c["nodes"], c["layers"]
    lines.append(f"{sum(nodes.values())} nodes: {nodes['kept']} kept, {nodes['fused']} fused, "
                 f"{nodes['plugin']} run as plugins, {nodes['folded']} folded away; {sum(layers.values())} layers: "
                 f"{layers['kept']} kept, {layers['fused']} fused, {layers['plugin']} plugins, "
                 f"{layers['inserted']} inserted by the build")
    missing = d.missing()
    if missing:
        lines.append(f"the engine was not built from this model: {len(missing)} layer origins are not among its "
                     f"nodes ({', '.join(show(m) for m in missing[:5])}{', …' if len(missing) > 5 else ''})")
    if d.shapes:
        from kiln.viewer.page import shape_text
        some = ", ".join(f"{show(n)} {shape_text(ms)} → {shape_text(es)}" for n, ms, es in d.shapes[:3])
        lines.append(f"the engine was not built from this model: {len(d.shapes)} tensors have another shape in the "
                     f"engine than in the model ({some}{', …' if len(d.shapes) > 3 else ''})")
    for lo in d.layers:
        facts = ", ".join(show(lo.layer.overlay[k]) for k in ("precision", "tactic") if lo.layer.overlay.get(k))
        head = f"{lo.status} {_where(lo.scope)}{_node(lo.layer)}" + (f" [{facts}]" if facts else "")
        if lo.nodes:
            head += " ← " + ", ".join(_node(n) for n in lo.nodes)
        if lo.missing:
            head += " ← not in the model: " + ", ".join(show(m) for m in lo.missing)
        lines.append(head)
    folded = [f for f in d.nodes if f.status == "folded"]
    if folded:
        lines.append(f"folded away ({len(folded)}): " + ", ".join(f"{_where(f.scope)}{_node(f.node)}"
                                                                  for f in folded))
    return lines


def _facts(n: ViewNode | None) -> dict | None:
    return None if n is None else {"name": n.name, "op": n.op_type}


def _detail_json(x: Detail) -> dict:
    out = {"kind": x.kind, "name": x.name, "a": x.a, "b": x.b}
    if x.stats:
        out["stats"] = x.stats
    return out


def _model_json(m: ViewModel) -> dict:
    return {"path": os.path.basename(m.path) if m.path else None, "format": m.format, "version": m.version,
            "nodes": len(m.graph.nodes)}


def as_json(d: ModelDiff | BuildDiff) -> dict:
    """The same content as :func:`text_lines`, as one JSON-ready dict."""
    if isinstance(d, BuildDiff):
        return {"kind": "build", "model": _model_json(d.model), "engine": _model_json(d.engine),
                "counts": d.counts(), "differs": d.differs, "missing": d.missing(),
                "shapes": [{"tensor": n, "model": ms, "engine": es} for n, ms, es in d.shapes],
                "layers": [{"status": lo.status, "scope": list(lo.scope), "name": lo.layer.name,
                            "kind": lo.layer.op_type, "precision": lo.layer.overlay.get("precision"),
                            "tactic": lo.layer.overlay.get("tactic"),
                            "origin": [n.name or n.op_type for n in lo.nodes], "missing": lo.missing}
                           for lo in d.layers],
                "nodes": [{"status": f.status, "scope": list(f.scope), **_facts(f.node),
                           "layer": f.layer.layer.name if f.layer else None} for f in d.nodes]}
    groups = {side: {"/".join(p): s for p, s in sorted(d.groups(side).items())} for side in ("a", "b")}
    return {"kind": "models", "a": _model_json(d.a), "b": _model_json(d.b), "counts": d.counts(),
            "differs": d.differs, "model": [_detail_json(x) for x in d.model],
            "changes": [_change_json(n) for n in d.changes()], "groups": groups}


def _change_json(n: NodeDiff) -> dict:
    return {"status": n.status, "scope": list(n.scope), "a": _facts(n.a), "b": _facts(n.b),
            "details": [_detail_json(x) for x in n.details]}


def run(a: str, b: str, *, json_out: bool = False, weights: bool = True, export: str | None = None) -> int:
    """Open both files, compare and print (and with ``export`` write the diff page's picture or HTML file
    too); the exit status (0 equal, 1 different). A file that cannot be opened raises a KilnError (one line,
    exit 2)."""
    from kiln.viewer.formats import open_model
    va, vb = open_model(a), open_model(b)
    d = compare(va, vb, weights=weights)
    if json_out:
        from kiln.viewer.page import dumps
        print(dumps(as_json(d)))
    else:
        print("\n".join(text_lines(d)))
    if export:
        from kiln.viewer import view
        print(f"wrote {view((va, vb), export=export)}", file=sys.stderr if json_out else sys.stdout)
    return 1 if d.differs else 0
