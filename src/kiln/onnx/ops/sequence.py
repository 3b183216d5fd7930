"""Sequence and optional ops.

A sequence is a Python list of tensors at run time and an optional is its value
or None; their Kiln types are written ``sequence(float32)``/``optional(...)``
(see ``kiln.ir.dtypes.is_container``), which is what these converters declare so
that SequenceAt and OptionalGetElement know their element type before shape
inference (which cannot look inside a list) runs.
"""
from __future__ import annotations

from kiln.ir.dtypes import element_type, is_container
from kiln.onnx.parser import _type_name, onnx_dtype
from kiln.onnx.registry import converter


def _seq_type(t) -> str:
    return t.dtype if t is not None and t.dtype.startswith("sequence(") else f"sequence({t.dtype if t else 'float32'})"


def _inner(t) -> str:
    """Element type of a sequence/optional tensor, or the tensor's own type."""
    return element_type(t.dtype) if t is not None and is_container(t.dtype) else (t.dtype if t else "float32")


@converter("SequenceEmpty", since=11)
def sequence_empty(ctx, node):
    return ctx.add1("SequenceEmpty", [], {"dtype": onnx_dtype(node.attr("dtype", 1))},
                    dtype=f"sequence({onnx_dtype(node.attr('dtype', 1))})")


@converter("SequenceConstruct", since=11)
def sequence_construct(ctx, node):
    return ctx.add1("SequenceConstruct", list(node.inputs), {}, dtype=f"sequence({node.input(0).dtype})")


@converter("SequenceAt", since=11)
def sequence_at(ctx, node):
    return ctx.add1("SequenceAt", [node.input(0), node.input(1)], {}, dtype=_inner(node.input(0)))


@converter("SequenceInsert", since=11)
def sequence_insert(ctx, node):
    return ctx.add1("SequenceInsert", [node.input(0), node.input(1), node.input(2)], {}, dtype=_seq_type(node.input(0)))


@converter("SequenceErase", since=11)
def sequence_erase(ctx, node):
    return ctx.add1("SequenceErase", [node.input(0), node.input(1)], {}, dtype=_seq_type(node.input(0)))


@converter("SequenceLength", since=11)
def sequence_length(ctx, node):
    return ctx.add1("SequenceLength", [node.input(0)], {}, dtype="int64")


@converter("SplitToSequence", since=11)
def split_to_sequence(ctx, node):
    x = node.input(0)
    return ctx.add1("SplitToSequence", [x, node.input(1)],
                    {"axis": node.attr("axis", 0), "keepdims": node.attr("keepdims", 1)}, dtype=f"sequence({x.dtype})")


@converter("ConcatFromSequence", since=11)
def concat_from_sequence(ctx, node):
    return ctx.add1("ConcatFromSequence", [node.input(0)],
                    {"axis": node.attr("axis"), "new_axis": node.attr("new_axis", 0)}, dtype=_inner(node.input(0)))


@converter("SequenceMap", since=17)
def sequence_map(ctx, node):
    fed = [_inner(t) if t is not None and t.dtype.startswith("sequence(") else (t.dtype if t else None)
           for t in node.inputs]
    body = ctx.subgraph(node.attr("body"), f"{node.name}/body", input_types=fed)
    dtypes = [f"sequence({t.dtype})" for t in body.outputs]
    return ctx.add("SequenceMap", list(node.inputs), {"body": body}, num_outputs=len(dtypes),
                   output_dtypes=dtypes).outputs


def _type_attr(node) -> str | None:
    for a in node.proto.attribute:
        if a.name == "type" and a.HasField("tp"):
            return _type_name(a.tp, f"Node {node.name!r} (Optional) attribute 'type' ")
    return None


@converter("Optional", since=15)
def optional(ctx, node):
    x = node.input(0)
    inner = x.dtype if x is not None else (_type_attr(node) or "float32")
    return ctx.add1("Optional", [x] if x is not None else [], {}, dtype=f"optional({inner})")


@converter("OptionalHasElement", since=15)
def optional_has_element(ctx, node):
    x = node.input(0)
    return ctx.add1("OptionalHasElement", [x] if x is not None else [], {}, dtype="bool")


@converter("OptionalGetElement", since=15)
def optional_get_element(ctx, node):
    x = node.input(0)
    inner = element_type(x.dtype) if x.dtype.startswith("optional(") else x.dtype
    return ctx.add1("OptionalGetElement", [x], {}, dtype=inner)
