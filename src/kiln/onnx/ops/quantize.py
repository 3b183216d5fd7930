"""Quantization: QuantizeLinear/DequantizeLinear (per-tensor, per-axis, blocked), DynamicQuantizeLinear,
QLinearMatMul/QLinearConv and MatMulInteger/ConvInteger.

Version differences are attributes with defaults (axis from 13, saturate from 19, block_size and
output_dtype from 21), so one converter per op reads them all. Of the float8 types, E4M3 (FP8 engines'
type) quantizes and dequantizes; the other float8, 4-bit and 2-bit types are refused.
"""
from __future__ import annotations

from kiln.errors import ParseError
from kiln.onnx.ops._common import spatial_pads
from kiln.onnx.parser import onnx_dtype
from kiln.onnx.registry import converter

_QUANT_TYPES = ("uint8", "int8", "uint16", "int16", "float8_e4m3fn")


@converter("QuantizeLinear", since=10)
def quantize_linear(ctx, node):
    x, scale, zp = node.input(0), node.input(1), node.input(2)
    if zp is not None:
        out = zp.dtype
    elif node.attr("output_dtype"):
        out = onnx_dtype(node.attr("output_dtype"), f"Node {node.name!r} (QuantizeLinear) output_dtype ")
    else:
        out = "uint8"
    if out not in _QUANT_TYPES:
        raise ParseError(f"Node {node.name!r} (QuantizeLinear) quantizes to {out}; Kiln supports "
                         f"{', '.join(_QUANT_TYPES)} (other float8 and 4/2-bit types are not supported yet).")
    return ctx.add1("QuantizeLinear", [x, scale, zp], {"axis": node.attr("axis", 1), "to": out,
                                                       "block_size": node.attr("block_size", 0),
                                                       "saturate": node.attr("saturate", 1)}, dtype=out)


@converter("DequantizeLinear", since=10)
def dequantize_linear(ctx, node):
    x, scale, zp = node.input(0), node.input(1), node.input(2)
    if x.dtype not in _QUANT_TYPES + ("int32",):
        raise ParseError(f"Node {node.name!r} (DequantizeLinear) reads {x.dtype}; Kiln dequantizes "
                         f"{', '.join(_QUANT_TYPES + ('int32',))} (other float8 and 4/2-bit types are not supported "
                         f"yet).")
    out = onnx_dtype(node.attr("output_dtype"), f"Node {node.name!r} ") if node.attr("output_dtype") else scale.dtype
    y = ctx.add1("DequantizeLinear", [x, scale, zp], {"axis": node.attr("axis", 1), "to": out,
                                                      "block_size": node.attr("block_size", 0)}, dtype=out)
    if x.shape is not None:
        y.shape = x.shape          # a dequantized weight's shape is what a Conv/Gemm converter reads
    return y


@converter("DynamicQuantizeLinear", since=11)
def dynamic_quantize_linear(ctx, node):
    x = node.input(0)
    return ctx.add("DynamicQuantizeLinear", [x], {}, num_outputs=3,
                   output_dtypes=["uint8", x.dtype, "uint8"]).outputs


def _conv_attrs(node, x, w) -> dict:
    k = node.attr("kernel_shape")
    if not k:
        if w.shape is None or not all(isinstance(d, int) for d in w.shape[2:]):
            raise ParseError(f"Node {node.name!r} ({node.op_type}) needs kernel_shape or a weight of known shape.")
        k = list(w.shape[2:])
    nd = len(k)
    strides = node.attr("strides") or [1] * nd
    dil = node.attr("dilations") or [1] * nd
    return {"op": "conv", "stride": list(strides), "dilation": list(dil), "groups": node.attr("group", 1),
            "pads": list(spatial_pads(node, x, list(k), strides, dil))}


@converter("MatMulInteger", since=10)
def matmul_integer(ctx, node):
    return ctx.add1("IntegerOp", [node.input(0), node.input(1), node.input(2), node.input(3)], {"op": "matmul"},
                    dtype="int32")


@converter("ConvInteger", since=10)
def conv_integer(ctx, node):
    x, w = node.input(0), node.input(1)
    return ctx.add1("IntegerOp", [x, w, node.input(2), node.input(3)], _conv_attrs(node, x, w), dtype="int32")


@converter("QLinearMatMul", since=10)
def qlinear_matmul(ctx, node):
    ins = [node.input(i) for i in range(8)]
    out = ins[7].dtype if ins[7] is not None else ins[0].dtype
    return ctx.add1("QLinearOp", ins, {"op": "matmul"}, dtype=out)


@converter("QLinearConv", since=10)
def qlinear_conv(ctx, node):
    ins = [node.input(i) for i in range(9)]
    if ins[8] is None:
        ins = ins[:8]
    out = ins[7].dtype if ins[7] is not None else ins[0].dtype
    return ctx.add1("QLinearOp", ins, _conv_attrs(node, ins[0], ins[3]), dtype=out)
