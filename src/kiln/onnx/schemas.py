"""ONNX's operator schemas as far as the parser uses them, read from ``schemas.json`` instead of ``onnx.defs``.

Importing onnx costs seconds of start-up; the parser needs only each schema's since-version and the
input and attribute rules ``validate.check_node`` applies. ``python -m kiln.onnx.schemas`` writes
them from ``onnx.defs`` (every version of every op, with each domain's newest opset); the tests
compare the table with ``onnx.defs``. A model whose opset for a domain is newer than the table's
reads that domain's schemas from ``onnx.defs`` (as before the table), so a newer onnx is not
second-guessed.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

_TABLE = Path(__file__).with_name("schemas.json")


class Schema(NamedTuple):
    """What the parser reads of one ONNX operator schema."""

    since: int
    min_inputs: int
    max_inputs: int
    required: tuple[tuple[int, str], ...]        # (position, name) of single (not optional) inputs
    required_attrs: tuple[str, ...]
    typed_attrs: dict[str, int]                  # graph/tensor attributes: their AttributeProto type


def get(op_type: str, opset: int, domain: str = "") -> Schema | None:
    """The schema of ``op_type`` in force at ``opset`` of ``domain`` ("" is ai.onnx), or None where onnx
    defines none (contrib and custom ops, or an opset before the op existed)."""
    domain = "" if domain == "ai.onnx" else domain
    table = _table()
    if opset > table["opsets"].get(domain, 0):
        return _from_onnx(op_type, opset, domain)
    versions = table["ops"].get(domain, {}).get(op_type)
    found = None
    for entry in versions or ():
        if entry[0] <= opset:
            found = entry
    return _schema(found) if found is not None else None


def _schema(entry: list) -> Schema:
    since, lo, hi, required, attrs, typed = entry
    return Schema(since, lo, hi, tuple((int(i), n) for i, n in required), tuple(attrs), dict(typed))


@lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    return json.loads(_TABLE.read_text())


@lru_cache(maxsize=1024)
def _from_onnx(op_type: str, opset: int, domain: str) -> Schema | None:
    import onnx.defs
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except Exception:           # onnx.defs.SchemaError: no such op in that domain at that opset
        return None
    return _schema(_entry(schema))


def _entry(schema: Any) -> list:
    """One table entry of an ``onnx.defs.OpSchema``: since, min/max inputs, required inputs and
    attributes, graph/tensor attribute types."""
    from onnx.defs import OpSchema
    single = OpSchema.FormalParameterOption.Single
    structural = {OpSchema.AttrType.GRAPH, OpSchema.AttrType.GRAPHS, OpSchema.AttrType.TENSOR,
                  OpSchema.AttrType.SPARSE_TENSOR}
    attrs = schema.attributes
    return [int(schema.since_version), int(schema.min_input), int(schema.max_input),
            [[i, p.name] for i, p in enumerate(schema.inputs) if p.option == single],
            sorted(n for n, a in attrs.items() if a.required),
            {n: int(a.type) for n, a in sorted(attrs.items()) if a.type in structural}]


def generate() -> dict[str, Any]:
    """The table, from the installed onnx's ``onnx.defs``."""
    import onnx
    import onnx.defs
    ops: dict[str, dict[str, list]] = {}
    for s in onnx.defs.get_all_schemas_with_history():
        ops.setdefault(s.domain, {}).setdefault(s.name, []).append(_entry(s))
    for by_op in ops.values():
        for entries in by_op.values():
            entries.sort(key=lambda e: e[0])
    opsets = {d: int(hi) for d, (_, hi) in onnx.defs.C.schema_version_map().items()}
    return {"onnx": onnx.__version__, "opsets": dict(sorted(opsets.items())),
            "ops": {d: dict(sorted(v.items())) for d, v in sorted(ops.items())}}


if __name__ == "__main__":
    _TABLE.write_text(json.dumps(generate(), separators=(",", ":")) + "\n")
    print(f"wrote {_TABLE}")
