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
    body = ctx.subgraph(node.attr("body"), f"{node.name}/body")
    n = node.num_outputs
    dtypes = [t.dtype for t in body.outputs[1:]]
    layer = ctx.add("Loop", list(node.inputs), {"body": body}, num_outputs=n, output_dtypes=dtypes[:n])
    return layer.outputs


@converter("Scan", since=9)
def scan(ctx, node):
    body = ctx.subgraph(node.attr("body"), f"{node.name}/body")
    n = node.num_outputs
    attrs = {"body": body, "num_scan_inputs": node.attr("num_scan_inputs"),
             "scan_input_axes": node.attr("scan_input_axes"), "scan_input_directions": node.attr("scan_input_directions"),
             "scan_output_axes": node.attr("scan_output_axes"),
             "scan_output_directions": node.attr("scan_output_directions")}
    layer = ctx.add("Scan", list(node.inputs), attrs, num_outputs=n, output_dtypes=[t.dtype for t in body.outputs][:n])
    return layer.outputs
