"""The support report: every node Kiln cannot map, found before any build (`kiln check`).

A node is supported when a converter is registered for its (domain, op type) at
the model's opset for that domain, or when a registered plugin matches it the way
the parser looks plugins up. Subgraphs (If/Loop/Scan bodies) are walked too.
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Sequence

from kiln.errors import ParseError


def _load(model: Any, fallback: str | None = None):
    from kiln.onnx.parser import load_model
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.exists(path):
            raise ParseError(f"{path!r} does not exist; check the path.")
        try:
            return load_model(path, fallback, load_external_data=False)     # weights are not needed to check ops
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ParseError(f"{path!r} is not a readable ONNX model ({first}).") from None
    if isinstance(model, (bytes, bytearray)):
        try:
            return load_model(bytes(model), fallback)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ParseError(f"The bytes given are not an ONNX model ({first}).") from None
    return model


def check(model: Any, plugins: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Unsupported nodes as dicts: name, op_type, domain ('' for ai.onnx), opset, graph."""
    from kiln.onnx import proto as P
    from kiln.onnx.parser import _find_plugin
    from kiln.onnx.registry import lookup
    from kiln.plugins import load as load_plugins
    from kiln.plugins import load_builtins, registry
    load_builtins()
    for p in plugins:
        load_plugins(p)
    proto = _load(model)
    opsets = {"" if i.domain in ("", "ai.onnx") else i.domain: int(i.version) for i in proto.opset_import}
    problems: list[dict[str, Any]] = []

    def walk(graph, where: str) -> None:
        for i, node in enumerate(graph.node):
            domain = "" if node.domain in ("", "ai.onnx") else node.domain
            opset = opsets.get(domain, opsets.get("", 1) if domain == "" else 1)
            attrs = {a.name: (a.s.decode("utf-8", "replace") if a.type == P.STRING else a.i)
                     for a in node.attribute if a.name in ("plugin_name", "plugin_namespace", "plugin_version")}
            view = SimpleNamespace(op_type=node.op_type, domain=node.domain, attrs=attrs)
            if lookup(node.op_type, opset, domain) is None and _find_plugin(view, registry) is None:
                problems.append({"name": node.name or f"{node.op_type}_{i}", "op_type": node.op_type,
                                 "domain": domain, "opset": opset, "graph": where})
            for a in node.attribute:
                if a.type == P.GRAPH:
                    walk(a.g, f"{where}/{node.name or node.op_type}.{a.name}")
                elif a.type == P.GRAPHS:
                    for k, g in enumerate(a.graphs):
                        walk(g, f"{where}/{node.name or node.op_type}.{a.name}[{k}]")
    walk(proto.graph, proto.graph.name or "main")
    return problems
