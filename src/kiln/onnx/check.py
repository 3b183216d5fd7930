"""``kiln check`` with reasons: which nodes of a model Kiln cannot map, and why, before any build.

``kiln.onnx.support.check`` finds the nodes (no converter at the model's opset, no plugin;
subgraphs included). This module says why for each, using the support
data the conformance run writes (``support.json``: the versions Kiln has, and the
suite's notes for ops it leaves out on purpose). ``limits=True`` also lists nodes of supported ops whose conformance cases
do not all pass, with the suite's notes, as warnings for the curious.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

_SUPPORT = Path(__file__).with_name("support.json")


@lru_cache(maxsize=1)
def support_data() -> dict[tuple[str, str], dict]:
    """(domain, op) → the support record of the last conformance run (empty if never generated)."""
    if not _SUPPORT.exists():
        return {}
    data = json.loads(_SUPPORT.read_text())
    return {("" if r["domain"] in ("", "ai.onnx") else r["domain"], r["op"]): r for r in data.get("ops", [])}


def check(model: Any, plugins: Sequence[str] = (), limits: bool = False,
          fallback: str | None = None) -> list[dict[str, Any]]:
    """Every node Kiln cannot map, as ``{name, op_type, domain, opset, graph, reason}``; empty means all map.

    ``model`` is a path, bytes or ModelProto; ``plugins`` are plugin files/modules to load first
    (as ``kiln build --plugins``). The search itself is ``kiln.onnx.support.check``; this adds
    the reasons (and, with ``limits``, the supported-but-partial warnings). With
    ``fallback="onnxruntime"`` each finding also says whether it would run in ONNX Runtime
    (``kiln.onnx.fallback.annotate``).
    """
    from kiln.onnx.registry import supported_ops
    from kiln.onnx.support import _load
    from kiln.onnx.support import check as find_unsupported
    proto = _load(model)
    known = supported_ops()
    support = support_data()
    findings = find_unsupported(proto, plugins=plugins)
    for f in findings:
        f["reason"] = _reason(f["op_type"], f["domain"], f["opset"], known, support)
    if fallback is not None:
        from kiln.onnx.fallback import annotate, check_mode
        check_mode(fallback)
        annotate(findings, proto)
    if limits:
        findings += _partial(proto, known, support)
    return findings


def _partial(proto, known: dict, support: dict) -> list[dict[str, Any]]:
    """Nodes of supported ops whose conformance cases do not all pass, with the suite's first note."""
    opsets = {"" if i.domain in ("", "ai.onnx") else i.domain: int(i.version) for i in proto.opset_import}
    out: list[dict[str, Any]] = []

    def walk(graph, where: str) -> None:
        for i, node in enumerate(graph.node):
            domain = "" if node.domain in ("", "ai.onnx") else node.domain
            rec = support.get((domain, node.op_type))
            cpu = (rec or {}).get("cpu") or {}
            if (domain, node.op_type) in known and cpu and cpu["pass"] < cpu["total"] and rec.get("notes"):
                out.append({"name": node.name or f"{node.op_type}_{i}", "op_type": node.op_type, "domain": domain,
                            "opset": opsets.get(domain, 1), "graph": where, "supported": True,
                            "reason": f"supported, but {cpu['total'] - cpu['pass']} of {cpu['total']} conformance "
                                      f"cases fail: {rec['notes'][0]}"})
            for a in node.attribute:
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(g, f"{where}/{node.name or node.op_type}.{a.name}")
    walk(proto.graph, proto.graph.name or "main")
    return out


def _reason(op: str, domain: str, opset: int, known: dict, support: dict) -> str:
    versions = known.get((domain, op))
    where = f"{domain or 'ai.onnx'}::{op}"
    if versions:
        return (f"Kiln converts {where} from opset {versions[0]} on; this model uses opset {opset}. "
                f"Re-export at opset {versions[0]} or later, or supply a plugin.")
    rec = support.get((domain, op))
    note = f" ({rec['notes'][0]})" if rec and rec.get("notes") else ""
    return f"Kiln has no converter for {where}{note}; supply a plugin (kiln.Plugin with name={op!r})."


class _CallableModule(__import__("types").ModuleType):
    """``kiln.onnx.check(model)`` and ``kiln.onnx.check.check(model)`` both work: the package
    exports this module under the name of its main function."""

    def __call__(self, model: Any, plugins: Sequence[str] = (), limits: bool = False,
                 fallback: str | None = None) -> list[dict[str, Any]]:
        return check(model, plugins=plugins, limits=limits, fallback=fallback)


__import__("sys").modules[__name__].__class__ = _CallableModule
