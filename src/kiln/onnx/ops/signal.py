"""Signal ops: DFT (17, 20), STFT, Hann/Hamming/Blackman windows, MelWeightMatrix."""
from __future__ import annotations

from kiln.onnx.parser import onnx_dtype
from kiln.onnx.registry import converter


def _dft(ctx, node, axis_default: int, axis_is_input: bool):
    """DFT v17 takes axis as an attribute (default 1); v20 as an optional input (default -2)."""
    x = node.input(0)
    attrs = {"inverse": node.attr("inverse", 0), "onesided": node.attr("onesided", 0),
             "axis": node.attr("axis", axis_default) if not axis_is_input else axis_default}
    axis = node.input(2) if axis_is_input else None
    return ctx.add1("DFT", [x, node.input(1), axis], attrs, dtype=x.dtype)


@converter("DFT", since=17)
def dft_v17(ctx, node):
    return _dft(ctx, node, 1, axis_is_input=False)


@converter("DFT", since=20)
def dft_v20(ctx, node):
    return _dft(ctx, node, -2, axis_is_input=True)


@converter("STFT", since=17)
def stft(ctx, node):
    x = node.input(0)
    return ctx.add1("STFT", [x, node.input(1), node.input(2), node.input(3)], {"onesided": node.attr("onesided", 1)},
                    dtype=x.dtype)


def _window(kind: str):
    def fn(ctx, node):
        out = onnx_dtype(node.attr("output_datatype", 1), f"Node {node.name!r} ({node.op_type}) ")
        return ctx.add1("Window", [node.input(0)], {"type": kind, "periodic": node.attr("periodic", 1), "to": out},
                        dtype=out)
    fn.__name__ = f"{kind}_window"
    return fn


converter("HannWindow", since=17)(_window("hann"))
converter("HammingWindow", since=17)(_window("hamming"))
converter("BlackmanWindow", since=17)(_window("blackman"))


@converter("MelWeightMatrix", since=17)
def mel_weight_matrix(ctx, node):
    out = onnx_dtype(node.attr("output_datatype", 1), f"Node {node.name!r} (MelWeightMatrix) ")
    return ctx.add1("MelWeightMatrix", [node.input(i) for i in range(5)], {"to": out}, dtype=out)
