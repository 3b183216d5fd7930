"""If, Loop, Scan: bodies become sub-Networks that may read the enclosing scope."""
from __future__ import annotations

from kiln.onnx.registry import converter


@converter("If", since=1)
def if_(ctx, node):
    then_g = ctx.subgraph(node.attr("then_branch"), f"{node.name}/then")
    else_g = ctx.subgraph(node.attr("else_branch"), f"{node.name}/else")
    n = len(then_g.outputs)
    dtypes = [t.dtype for t in then_g.outputs]
    layer = ctx.add("If", [node.input(0)], {"then_branch": then_g, "else_branch": else_g}, num_outputs=n,
                    output_dtypes=dtypes)
    return layer.outputs


@converter("Loop", since=1)
def loop(ctx, node):
    carried = [t.dtype if t is not None else None for t in node.inputs[2:]]
    body = ctx.subgraph(node.attr("body"), f"{node.name}/body", input_types=["int64", "bool"] + carried)
    n = node.num_outputs
    dtypes = [t.dtype for t in body.outputs[1:]]
    dtypes = [c or d for c, d in zip(carried, dtypes)] + dtypes[len(carried):]   # carried values keep their type
    layer = ctx.add("Loop", list(node.inputs), {"body": body}, num_outputs=n, output_dtypes=dtypes[:n])
    return layer.outputs


def _scan(ctx, node, batched: bool):
    """Scan v8 has a leading batch axis and a sequence_lens input; v9+ scans one sequence along any axis."""
    fed = [t.dtype if t is not None else None for t in node.inputs[1 if batched else 0:]]
    body = ctx.subgraph(node.attr("body"), f"{node.name}/body", input_types=fed)
    n = node.num_outputs
    attrs = {"body": body, "num_scan_inputs": node.attr("num_scan_inputs"),
             "scan_input_axes": node.attr("scan_input_axes"),
             "scan_input_directions": node.attr("directions" if batched else "scan_input_directions"),
             "scan_output_axes": node.attr("scan_output_axes"),
             "scan_output_directions": node.attr("scan_output_directions"), "batched": batched}
    layer = ctx.add("Scan", list(node.inputs), attrs, num_outputs=n, output_dtypes=[t.dtype for t in body.outputs][:n])
    return layer.outputs


@converter("Scan", since=8)
def scan_v8(ctx, node):
    return _scan(ctx, node, batched=True)


@converter("Scan", since=9)
def scan(ctx, node):
    return _scan(ctx, node, batched=False)
