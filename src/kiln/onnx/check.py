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


def check(model: Any, plugins: Sequence[str] = (), limits: bool = False, fallback: str | None = None,
          shapes: Any = None, device: str | None = "cpu") -> list[dict[str, Any]]:
    """Every node Kiln cannot map, as ``{name, op_type, domain, opset, graph, reason}``; empty means all map.

    ``model`` is a path, bytes or ModelProto; ``plugins`` are plugin files/modules to load first
    (as ``kiln build --plugins``). The search itself is ``kiln.onnx.support.check``; this adds
    the reasons (and, with ``limits``, the supported-but-partial warnings). With
    ``fallback="onnxruntime"`` each finding also says whether it would run in ONNX Runtime
    (``kiln.onnx.fallback.annotate``).

    When every node maps and the shapes are known (``shapes``, a build profile: ``{input: shape}`` or
    ``{input: (min, opt, max)}``, or a model whose inputs are all static), the model is also parsed and
    run through the build's steps before tactic timing (``kiln.builder.build.prepare``) for
    ``device``, so what a build at those shapes would refuse (auto_pad that the shapes leave open,
    tensors larger than the device, a profile that does not fit the inputs) is a finding too, with
    ``stage: "build"``.
    """
    from kiln.onnx.registry import supported_ops
    from kiln.onnx.support import _load
    from kiln.onnx.support import check as find_unsupported
    proto = _load(model, fallback)
    known = supported_ops()
    support = support_data()
    findings = find_unsupported(proto, plugins=plugins)
    for f in findings:
        f["reason"] = _reason(f["op_type"], f["domain"], f["opset"], known, support)
    if fallback is not None:
        from kiln.onnx.fallback import annotate, check_mode
        check_mode(fallback)
        annotate(findings, proto)
    if shapes is not None or _static_inputs(proto):
        if not any(not f.get("fallback") for f in findings):
            findings += build_problems(proto, plugins, shapes, fallback, device)
    if limits:
        findings += _partial(proto, known, support)
    return findings


def build_problems(proto, plugins: Sequence[str] = (), shapes: Any = None, fallback: str | None = None,
                   device: str | None = "cpu") -> list[dict[str, Any]]:
    """What ``kiln build`` would refuse on this model at ``shapes``, found by running the build up to
    tactic timing: one finding naming the node where the refusal names one. A network that
    ``_nothing_to_refuse`` clears is not run through the build (nor torch imported)."""
    from kiln.errors import KilnError
    from kiln.onnx.parser import parse
    try:
        net = parse(proto, plugins=plugins)
        if shapes is None and fallback is None and device in (None, "cpu") and _nothing_to_refuse(net):
            return []
        from kiln.builder.build import prepare
        from kiln.builder.config import BuildConfig
        prepare(net, BuildConfig(device=device, profiles=shapes, fallback=fallback))
    except KilnError as exc:
        return [_build_finding(proto, exc)]
    return []


_NO_REFUSAL_BYTES = 1 << 30      # kiln.builder.memory.DEVICE_QUERY_BYTES (importing the builder imports torch)


def _nothing_to_refuse(net) -> bool:
    """Whether ``kiln.builder.build.prepare`` provably refuses nothing on ``net`` at its own static input
    shapes on the CPU (or a GPU): every layer's output shapes follow from its inputs' in closed form
    (``_static_outputs``), there is no padding to resolve, no output sized by values and no subgraph, and
    all tensors together, at 16 bytes an element, stay under the size above which the build asks the
    device for memory. Verification, which needs no shapes, runs here as in the build."""
    saved = [(t, t.shape) for t in net.tensors.values()]
    try:
        return _follow(net)
    finally:
        for t, shape in saved:
            t.shape = shape


def _follow(net) -> bool:
    """``_nothing_to_refuse`` on ``net``, writing each shape it follows into the tensor (the host shape
    arithmetic of ``kiln.passes.symbolic`` reads them there)."""
    import math

    from kiln.ir.network import subgraphs
    from kiln.ir.verify import verify
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str | None] = {}
    for t in net.inputs:
        if t.shape is None or not all(isinstance(d, int) for d in t.shape):
            return False
        shapes[t.name], dtypes[t.name] = tuple(t.shape), t.dtype
    for t in net.constants():
        shapes[t.name], dtypes[t.name] = tuple(t.value.shape), t.dtype
    for layer in net.layers:
        names = [None if t is None else t.name for t in layer.inputs]
        if not any(names) or any(n is not None and n not in shapes for n in names) or "auto_pad" in layer.attrs \
                or any(subgraphs(layer)):
            return False
        out = _static_outputs(layer, [None if n is None else shapes[n] for n in names],
                              [None if n is None else dtypes[n] for n in names])
        if out is None or len(out[0]) != len(layer.outputs):
            return False
        for o, s in zip(layer.outputs, out[0]):
            shapes[o.name], dtypes[o.name] = tuple(s), out[1]
            o.shape = tuple(s)
    if sum(math.prod(s) for s in shapes.values()) * 16 > _NO_REFUSAL_BYTES:
        return False
    verify(net)
    return True


_VIEWS = ("Identity", "Flatten", "Squeeze", "Unsqueeze", "Shuffle")


def _static_outputs(layer, shapes: list, dtypes: list) -> tuple[list[tuple[int, ...]], str | None] | None:
    """A layer's output shapes and dtype (None where not followed) from its input shapes, or None where they
    do not follow in closed form: a rule of ``kiln.ir.shape_rules``; a kind that keeps its first input's shape
    (``kiln.passes.symbolic.SAME_SHAPE``) or broadcasts its inputs (ElementWise); a view whose target is an
    attribute, a constant or a followed shape value (``kiln.passes.symbolic.view_shape``); Shape, Gather,
    Select and Slice of shape values (``_value``)."""
    from kiln.ir import shape_rules
    from kiln.passes.symbolic import SAME_SHAPE, view_shape
    kind, attrs = layer.kind, layer.attrs
    got = shape_rules.answer(kind, attrs, shapes, dtypes)
    if got is not None:
        return got
    x, dtype = shapes[0], dtypes[0]
    if kind in SAME_SHAPE:
        if kind == "Cast":
            dtype = attrs.get("to")
        elif kind == "Unary" and attrs.get("op") in ("isnan", "isinf"):
            dtype = "bool"
        return ([x] * len(layer.outputs), dtype) if x is not None else None
    if kind == "ElementWise":
        out = None if None in shapes else shape_rules.broadcast(*shapes)
        return None if out is None else ([out], None)
    if kind in _VIEWS and x is not None and all(t is None or t.is_constant or _value(t) is not None
                                                for t in layer.inputs[1:]):
        try:
            out = view_shape(layer, x)
        except Exception:       # a target or axes of a form view_shape does not take: not sure
            return None
        return None if out is None or not all(isinstance(d, int) and d >= 0 for d in out) else ([out], dtype)
    if kind in _SHAPE_ARITHMETIC and len(layer.outputs) == 1:
        v = _value(layer.outputs[0])
        return None if v is None else ([() if v[1] else (len(v[0]),)], "int64" if kind == "Shape" else dtype)
    return None


_SHAPE_ARITHMETIC = ("Shape", "Gather", "Select", "Slice")


def _value(t) -> tuple | None:
    """``t``'s value where ``kiln.passes.symbolic.shape_value`` follows it to integers (shape arithmetic on
    the static shapes written into the tensors), else None."""
    from kiln.passes.symbolic import shape_value
    try:
        v = shape_value(t)
    except Exception:           # values of a form the arithmetic does not take: not followed
        return None
    return v if v is not None and all(isinstance(d, int) for d in v[0]) else None


def _build_finding(proto, exc: Exception) -> dict[str, Any]:
    from kiln.onnx.parser import text
    opsets = {"" if i.domain in ("", "ai.onnx") else i.domain: int(i.version) for i in proto.opset_import}
    name = getattr(exc, "node", None)
    found = {"name": name or "(model)", "op_type": "", "domain": "", "opset": opsets.get("", 1),
             "graph": proto.graph.name or "main", "reason": str(exc), "stage": "build"}

    def walk(graph, where: str) -> bool:
        for i, node in enumerate(graph.node):
            op = text(node.op_type)
            if (text(node.name) or f"{op}_{i + 1}") == name:
                domain = text(node.domain)
                domain = "" if domain in ("", "ai.onnx") else domain
                found.update(op_type=op, domain=domain, opset=opsets.get(domain, 1), graph=where)
                return True
            for a in node.attribute:
                if any(walk(g, f"{where}/{text(node.name) or op}.{text(a.name)}")
                       for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)):
                    return True
        return False
    if name is not None:
        walk(proto.graph, proto.graph.name or "main")
    return found


def _static_inputs(proto) -> bool:
    """Whether every graph input (that no initializer gives) has a shape of known positive dims."""
    given = {i.name for i in proto.graph.initializer}
    for vi in proto.graph.input:
        if vi.name in given or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or any(not d.HasField("dim_value") or d.dim_value <= 0 for d in tt.shape.dim):
            return False
    return True


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

    def __call__(self, model: Any, plugins: Sequence[str] = (), limits: bool = False, fallback: str | None = None,
                 shapes: Any = None, device: str | None = "cpu") -> list[dict[str, Any]]:
        return check(model, plugins=plugins, limits=limits, fallback=fallback, shapes=shapes, device=device)


__import__("sys").modules[__name__].__class__ = _CallableModule
