"""Reductions, ArgMax/ArgMin, TopK."""
from __future__ import annotations

from kiln.onnx.ops._common import const_value
from kiln.onnx.registry import converter

_OPS = {"ReduceSum": "sum", "ReduceMean": "mean", "ReduceMax": "max", "ReduceMin": "min", "ReduceProd": "prod",
        "ReduceL1": "l1", "ReduceL2": "l2", "ReduceLogSum": "log_sum", "ReduceLogSumExp": "log_sum_exp",
        "ReduceSumSquare": "sum_square"}


def _attr_axes(op):
    def fn(ctx, node):
        axes = node.attr("axes")
        return ctx.add1("Reduce", [node.input(0)], {"op": op, "axes": list(axes) if axes is not None else None,
                                                    "keepdims": bool(node.attr("keepdims", 1)),
                                                    "noop_with_empty_axes": False})
    return fn


def _input_axes(op):
    def fn(ctx, node):
        axes_t = node.input(1)
        v = const_value(axes_t)
        attrs = {"op": op, "axes": None, "keepdims": bool(node.attr("keepdims", 1)),
                 "noop_with_empty_axes": bool(node.attr("noop_with_empty_axes", 0))}
        if axes_t is None:
            return ctx.add1("Reduce", [node.input(0)], attrs)
        if v is not None:
            attrs["axes"] = [int(a) for a in v.reshape(-1)]
            return ctx.add1("Reduce", [node.input(0)], attrs)
        return ctx.add1("Reduce", [node.input(0), axes_t], attrs)
    return fn


for _name, _op in _OPS.items():
    converter(_name, since=1)(_attr_axes(_op))
    converter(_name, since=13 if _name == "ReduceSum" else 18)(_input_axes(_op))


def _arg(op):
    def fn(ctx, node):
        return ctx.add1("ArgReduce", [node.input(0)], {"op": op, "axis": node.attr("axis", 0),
                                                       "keepdims": bool(node.attr("keepdims", 1)),
                                                       "select_last_index": bool(node.attr("select_last_index", 0))},
                        dtype="int64")
    return fn


converter("ArgMax", since=1)(_arg("max"))
converter("ArgMin", since=1)(_arg("min"))


@converter("TopK", since=1)
def topk_v1(ctx, node):
    k = ctx.const([node.attr("k")], "int64")
    x = node.input(0)
    return ctx.add("TopK", [x, k], {"axis": node.attr("axis", -1), "largest": True, "sorted": True}, num_outputs=2,
                   output_dtypes=[x.dtype, "int64"]).outputs


@converter("TopK", since=10)
def topk(ctx, node):
    x = node.input(0)
    return ctx.add("TopK", [x, node.input(1)], {"axis": node.attr("axis", -1), "largest": bool(node.attr("largest", 1)),
                                                "sorted": bool(node.attr("sorted", 1))}, num_outputs=2,
                   output_dtypes=[x.dtype, "int64"]).outputs
