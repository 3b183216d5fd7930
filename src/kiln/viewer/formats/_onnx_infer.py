"""What the ONNX reader needs the onnx package for: shapes from ONNX shape inference and operator schemas.

:func:`complete` runs in the reading process (exports, diffs, ``kiln.view(model_proto)``) or, for the served
page, in a child process (``python -m kiln.viewer.formats._onnx_infer``: a serialized ModelProto on stdin;
on stdout one JSON line with the schemas, then the shape-inferred light model), so the server never imports
onnx and a crash inside shape inference cannot take it down. The reader decodes the inferred model with its
own protobuf schema and validates the schema entries, like any other file content.
"""
from __future__ import annotations

import json
import sys
from typing import Any

_MAX_INLINE_BYTES = 1024          # initializers up to this size stay in the shape-inference copy


def _text(value: str | bytes) -> str:
    return value if type(value) is str else bytes(value).decode("utf-8", "backslashreplace")


def complete(model: Any) -> tuple[bytes, list[list]]:
    """The shape-inferred light copy of ``model`` serialized (b"" when none can be made) and the schema
    entries ``[domain, op_type, since_version, inputs, outputs, doc]`` of the ops it uses (inputs/outputs:
    ``[name, variadic]``)."""
    return _inferred(model), schema_entries(model)


def _inferred(model: Any) -> bytes:
    """Shape-infer a light copy: large initializers become typed graph inputs instead of data."""
    import onnx
    from onnx import helper
    light = onnx.ModelProto()
    try:
        light.ir_version = model.ir_version
        light.opset_import.extend(model.opset_import)
        light.functions.extend(model.functions)
        g = light.graph
        g.name = model.graph.name
        g.node.extend(model.graph.node)
        g.output.extend(model.graph.output)
        g.value_info.extend(model.graph.value_info)
        names = {t.name for t in model.graph.initializer}
        g.input.extend(i for i in model.graph.input if i.name not in names)
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) + 8 * len(t.int64_data) \
                    + 4 * len(t.float_data) + 4 * len(t.int32_data) <= _MAX_INLINE_BYTES:
                g.initializer.append(t)
            else:
                g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    except (UnicodeDecodeError, ValueError, TypeError):
        return b""                # protobuf refuses names that are not UTF-8: the file's own shapes stay
    try:
        light = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:
        pass
    return light.SerializeToString()


def _op_keys(graph: Any, out: dict) -> None:
    import onnx
    for node in graph.node:
        out.setdefault((_text(node.domain) or "", _text(node.op_type)), None)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _op_keys(attr.g, out)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _op_keys(sub, out)


def schema_entries(model: Any) -> list[list]:
    """The schema of every op of the model (its graphs, bodies and local functions) at the model's opsets."""
    from onnx import defs
    opsets = {_text(o.domain) or "": o.version for o in model.opset_import}
    keys: dict = {}
    _op_keys(model.graph, keys)
    for fn in model.functions:
        _op_keys(fn, keys)
    out = []
    for domain, op_type in keys:
        try:
            schema = defs.get_schema(op_type, opsets.get(domain, opsets.get("ai.onnx", 1 << 30)), domain)
        except Exception:
            continue
        formals = [[[p.name, p.option.name == "Variadic"] for p in ps] for ps in (schema.inputs, schema.outputs)]
        out.append([domain, op_type, schema.since_version, *formals, _schema_doc(schema)])
    return out


def _schema_doc(schema: Any) -> str:
    """Op documentation as light Markdown: summary, then inputs, outputs, attributes, type constraints."""
    lines = [(schema.doc or "").strip(), ""]
    if schema.inputs:
        lines.append("### Inputs")
        lines += [f"- **{p.name}**{_opt(p)} ({p.type_str}): {' '.join(p.description.split())}" for p in schema.inputs]
    if schema.outputs:
        lines.append("### Outputs")
        lines += [f"- **{p.name}**{_opt(p)} ({p.type_str}): {' '.join(p.description.split())}"
                  for p in schema.outputs]
    if schema.attributes:
        lines.append("### Attributes")
        for a in sorted(schema.attributes.values(), key=lambda a: a.name):
            req = " (required)" if a.required else ""
            lines.append(f"- **{a.name}**{req}: {' '.join(a.description.split())}")
    if schema.type_constraints:
        lines.append("### Type constraints")
        for tc in schema.type_constraints:
            lines.append(f"- **{tc.type_param_str}**: {', '.join(tc.allowed_type_strs)}")
    lines.append(f"\n_{schema.domain or 'ai.onnx'} · {schema.name}-{schema.since_version}_")
    return "\n".join(lines)


def _opt(p: Any) -> str:
    return {"Optional": " (optional)", "Variadic": " (variadic)"}.get(p.option.name, "")


def main() -> int:
    """Child process: a ModelProto on stdin; the schema entries as one JSON line, then the inferred model."""
    import onnx
    model = onnx.ModelProto.FromString(sys.stdin.buffer.read())
    inferred, entries = complete(model)
    out = sys.stdout.buffer
    out.write(json.dumps(entries, ensure_ascii=True).encode("ascii") + b"\n")
    out.write(inferred)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
