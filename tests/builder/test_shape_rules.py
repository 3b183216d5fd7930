"""kiln.builder.shape_rules (kiln.ir.shape_rules on meta tensors) gives exactly what evaluating the layer's
tactic on meta tensors gives (the reference: the same networks evaluated with the rules switched off): the
same shapes, strides and dtypes, the same unknowns and the same errors, on many kinds, shapes and dtypes,
with symbolic dims too."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch

from kiln.builder import shape_rules, shapes
from kiln.errors import ShapeError
from kiln.ir.network import Network

F32, F16 = np.float32, np.float16


def _w(shape, dtype=F32) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def _t(net: Network, x, perm):
    """x transposed by a Shuffle: a non-contiguous view on meta tensors."""
    return net.add_shuffle(x, first_transpose=perm).output


def _s(net: Network, x, starts, ends, axes, steps=None):
    """x sliced by a Slice layer: a strided view on meta tensors."""
    return net.add_slice(x, starts, ends, axes, steps).output


def _case(shape, build: Callable[[Network, Any, Any], Any], dtype=F32, fires: bool = True):
    return (tuple(shape), build, dtype, fires)


_PROGRAM = [{"op": "prod", "args": ["i0", 0.5]}, {"op": "sum", "args": ["v0", "i1"]},
            {"op": "relu", "args": ["v1"]}, {"op": "max", "args": ["v2", 0.1]}]

# (input shape, layer builder (net, x, dtype), dtype, whether a rule answers)
CASES = {
    "relu": _case((2, 3, 5, 5), lambda n, x, d: n.add_activation(x, "relu")),
    "clip-f16": _case((4, 7), lambda n, x, d: n.add_activation(x, "clip", 0.0, 6.0), F16),
    "gelu-rank0": _case((), lambda n, x, d: n.add_activation(x, "gelu")),
    "selu-empty": _case((0, 3), lambda n, x, d: n.add_activation(x, "selu", 1.6, 1.05)),
    "sigmoid-slice": _case((2, 6, 4), lambda n, x, d: n.add_activation(_s(n, x, [0], [3], [1]), "sigmoid")),
    "clip-slice": _case((2, 6), lambda n, x, d: n.add_activation(_s(n, x, [1], [4], [1]), "clip", 0.0, 1.0)),
    "clip-unbounded-slice": _case((2, 6), lambda n, x, d: n.add_activation(_s(n, x, [1], [4], [1]), "clip", None,
                                                                           None), fires=False),
    "relu-transposed": _case((2, 3), lambda n, x, d: n.add_activation(_t(n, x, [1, 0]), "relu"), fires=False),
    "pointwise-slices": _case((2, 6, 4), lambda n, x, d: n.add_layer(
        "Pointwise", [_s(n, x, [0], [3], [1]), _s(n, x, [3], [4], [1])],
        {"program": [{"op": "sub", "args": [1.0, "i0"]}] + _PROGRAM[1:]})),
    "exp": _case((3, 4), lambda n, x, d: n.add_unary(x, "exp")),
    "isnan": _case((3, 4), lambda n, x, d: n.add_unary(x, "isnan")),
    "isinf-pos": _case((3, 4), lambda n, x, d: n.add_layer("Unary", [x], {"op": "isinf", "detect_negative": False})),
    "identity": _case((2, 2), lambda n, x, d: n.add_unary(x, "identity")),
    "not-float": _case((2, 2), lambda n, x, d: n.add_unary(x, "not"), fires=False),
    "add-same": _case((2, 3, 4), lambda n, x, d: n.add_elementwise(x, x, "sum")),
    "add-bcast": _case((2, 3, 4, 4), lambda n, x, d: n.add_elementwise(x, _w((1, 3, 1, 1), d), "sum")),
    "mul-bcast-left": _case((4, 1), lambda n, x, d: n.add_elementwise(_w((2, 1, 5), d), x, "prod")),
    "div-scalar": _case((3, 5), lambda n, x, d: n.add_elementwise(x, np.asarray(2.0, d), "div"), F16),
    "pow": _case((3, 5), lambda n, x, d: n.add_elementwise(x, _w((5,), d), "pow")),
    "prelu": _case((2, 3, 4), lambda n, x, d: n.add_elementwise(x, _w((3, 1), d), "prelu")),
    "greater": _case((2, 3), lambda n, x, d: n.add_elementwise(x, _w((3,), d), "greater")),
    "max-3": _case((2, 3), lambda n, x, d: n.add_layer("ElementWise", [x, x, x], {"op": "max"})),
    "sum-1": _case((2, 3), lambda n, x, d: n.add_layer("ElementWise", [x], {"op": "sum"})),
    "add-int64": _case((2, 3), lambda n, x, d: n.add_elementwise(x, _w((3,), d), "sum"), np.int64),
    "div-int32": _case((2, 3), lambda n, x, d: n.add_elementwise(x, _w((2, 1), d) + 7, "div"), np.int32),
    "pow-int64": _case((4,), lambda n, x, d: n.add_elementwise(x, np.asarray(2, d), "pow"), np.int64),
    "less-int64": _case((2, 3), lambda n, x, d: n.add_elementwise(x, _w((1, 3), d), "less"), np.int64),
    "shift-uint8": _case((2, 3), lambda n, x, d: n.add_elementwise(x, _w((3,), d), "bitshift_left"), np.uint8),
    "and-bool": _case((2, 3), lambda n, x, d: n.add_elementwise(x, _w((3,), d), "and"), np.bool_),
    "xor-int64": _case((2, 3), lambda n, x, d: n.add_elementwise(x, x, "xor"), np.int64),
    "sum-bool": _case((2, 3), lambda n, x, d: n.add_elementwise(x, x, "sum"), np.bool_, fires=False),
    "prelu-int64": _case((2, 3), lambda n, x, d: n.add_elementwise(x, _w((3,), d), "prelu"), np.int64, fires=False),
    "relu-int64": _case((2, 3), lambda n, x, d: n.add_activation(x, "relu"), np.int64, fires=False),
    "where": _case((2, 1, 4), lambda n, x, d: n.add_where(n.add_constant(_w((3, 1), np.bool_)), x, _w((4,), d))),
    "where-int64": _case((3,), lambda n, x, d: n.add_where(n.add_constant(_w((2, 1), np.bool_)), x, x), np.int64),
    "where-float-cond": _case((3,), lambda n, x, d: n.add_where(x, x, x), fires=False),
    "where-mixed": _case((3,), lambda n, x, d: n.add_where(n.add_constant(_w((3,), np.bool_)), x, _w((3,), F16)),
                         fires=False),
    "add-slices": _case((2, 6, 4), lambda n, x, d: n.add_elementwise(_s(n, x, [0], [3], [1]),
                                                                     _s(n, x, [3], [6], [1]), "sum")),
    "prod-slice-bcast": _case((2, 6, 4), lambda n, x, d: n.add_elementwise(_s(n, x, [1], [4], [2], [2]),
                                                                           _w((6, 1), d), "prod")),
    "sub-expanded": _case((2, 1, 4), lambda n, x, d: n.add_elementwise(
        n.add_layer("Expand", [x, n.add_constant(np.array([2, 3, 4]))]).output, _w((3, 1), d), "sub")),
    "less-int-slice": _case((2, 6), lambda n, x, d: n.add_elementwise(_s(n, x, [2], [5], [1]), _w((3,), d), "less"),
                            np.int64),
    "min-1-slice": _case((2, 6), lambda n, x, d: n.add_layer("ElementWise", [_s(n, x, [2], [5], [1])],
                                                             {"op": "div"}), fires=False),
    "add-transposed-both": _case((2, 3), lambda n, x, d: n.add_elementwise(_t(n, x, [1, 0]), _t(n, x, [1, 0]),
                                                                           "sum"), fires=False),
    "add-mismatch": _case((2, 3), lambda n, x, d: n.add_elementwise(x, _w((4,), d), "sum"), fires=False),
    "add-mixed-dtype": _case((2, 3), lambda n, x, d: n.add_elementwise(x, _w((3,), np.float64), "sum"), fires=False),
    "and-float": _case((2, 3), lambda n, x, d: n.add_elementwise(x, x, "and"), fires=False),
    "pointwise": _case((2, 3, 4), lambda n, x, d: n.add_layer("Pointwise", [x, n.add_constant(_w((3, 1), d))],
                                                              {"program": _PROGRAM})),
    "matmul": _case((2, 3, 4), lambda n, x, d: n.add_matmul(x, _w((4, 5), d))),
    "matmul-batch-bcast": _case((2, 1, 3, 4), lambda n, x, d: n.add_matmul(x, _w((5, 4, 6), d))),
    "matmul-tb-relu": _case((3, 4), lambda n, x, d: n.add_layer(
        "MatMul", [x, n.add_constant(_w((6, 4), d))], {"transpose_b": True, "activation": "relu"})),
    "matmul-ta": _case((4, 3), lambda n, x, d: n.add_layer("MatMul", [x, n.add_constant(_w((4, 2), d))],
                                                           {"transpose_a": True}), F16),
    "matmul-transposed-a": _case((2, 4, 3), lambda n, x, d: n.add_matmul(_t(n, x, [0, 2, 1]), _w((4, 5), d))),
    "matmul-transposed-b": _case((5, 4), lambda n, x, d: n.add_matmul(_w((2, 3, 4), d), _t(n, x, [1, 0]))),
    "matmul-2d-by-batched-t": _case((4, 3), lambda n, x, d: n.add_matmul(_t(n, x, [1, 0]), _w((2, 4, 5), d))),
    "fc-transposed": _case((3, 2, 8), lambda n, x, d: n.add_fully_connected(_t(n, x, [1, 0, 2]), _w((5, 8), d))),
    "gemm-transposed": _case((4, 3), lambda n, x, d: n.add_layer("Gemm", [_t(n, x, [1, 0]), n.add_constant(
        _w((4, 5), d)), n.add_constant(_w((5,), d))], {})),
    "add-transposed": _case((4, 3), lambda n, x, d: n.add_elementwise(_t(n, x, [1, 0]), _w((4,), d), "sum"),
                            fires=False),
    "matmul-k-mismatch": _case((3, 4), lambda n, x, d: n.add_matmul(x, _w((5, 2), d)), fires=False),
    "matmul-1d": _case((4,), lambda n, x, d: n.add_matmul(x, _w((4, 2), d)), fires=False),
    "fc": _case((2, 8), lambda n, x, d: n.add_fully_connected(x, _w((5, 8), d), _w((5,), d))),
    "fc-3d-nobias": _case((2, 3, 8), lambda n, x, d: n.add_fully_connected(x, _w((5, 8), d))),
    "fc-bad-k": _case((2, 7), lambda n, x, d: n.add_fully_connected(x, _w((5, 8), d)), fires=False),
    "gemm": _case((3, 4), lambda n, x, d: n.add_layer("Gemm", [x, n.add_constant(_w((5, 4), d)),
                                                              n.add_constant(_w((5,), d))], {"trans_b": 1})),
    "gemm-ta-alpha": _case((4, 3), lambda n, x, d: n.add_layer("Gemm", [x, n.add_constant(_w((4, 2), d)),
                                                                       n.add_constant(_w((3, 1), d))],
                                                               {"trans_a": 1, "alpha": 0.5, "beta": 2.0})),
    "conv": _case((2, 3, 9, 9), lambda n, x, d: n.add_convolution(x, _w((4, 3, 3, 3), d), _w((4,), d), pads=[1] * 4)),
    "conv-stride-dil": _case((1, 4, 17, 12), lambda n, x, d: n.add_convolution(
        x, _w((6, 2, 3, 2), d), stride=[2, 3], dilation=[2, 1], pads=[0, 1, 2, 0], groups=2)),
    "conv-1d": _case((1, 3, 10), lambda n, x, d: n.add_convolution(x, _w((2, 3, 4), d), stride=[3])),
    "conv-3d-f16": _case((1, 2, 5, 6, 7), lambda n, x, d: n.add_convolution(x, _w((3, 2, 2, 3, 3), d)), F16),
    "conv-1x1-out": _case((1, 1, 3, 3), lambda n, x, d: n.add_convolution(x, _w((5, 1, 3, 3), d))),
    "conv-residual-act": _case((1, 3, 6, 6), lambda n, x, d: n.add_layer(
        "Convolution", [x, n.add_constant(_w((3, 3, 3, 3), d)), None, x],
        {"stride": [1, 1], "pads": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1, "activation": "silu",
         "residual": True})),
    "conv-on-1x1-maps": _case((2, 3, 1, 1), lambda n, x, d: n.add_convolution(x, _w((4, 3, 1, 1), d))),
    "conv-on-channel-slice": _case((2, 6, 5, 5), lambda n, x, d: n.add_convolution(
        _s(n, x, [1], [4], [1]), _w((4, 3, 3, 3), d), pads=[1, 0, 1, 0])),
    "conv-on-strided-slice": _case((2, 3, 5, 9), lambda n, x, d: n.add_convolution(
        _s(n, x, [1], [9], [3], [2]), _w((4, 3, 3, 3), d))),
    "conv-on-transposed": _case((2, 5, 5, 3), lambda n, x, d: n.add_convolution(
        _t(n, x, [0, 3, 1, 2]), _w((4, 3, 3, 3), d)), fires=False),
    "conv-too-small": _case((1, 3, 2, 2), lambda n, x, d: n.add_convolution(x, _w((4, 3, 3, 3), d)), fires=False),
    "conv-groups-bad": _case((1, 3, 5, 5), lambda n, x, d: n.add_convolution(x, _w((4, 2, 3, 3), d)), fires=False),
    "deconv": _case((2, 4, 5, 5), lambda n, x, d: n.add_deconvolution(x, _w((4, 3, 3, 3), d), _w((3,), d),
                                                                      stride=[2, 2], pads=[1, 0, 1, 2])),
    "deconv-outpad-groups": _case((1, 4, 5, 6), lambda n, x, d: n.add_deconvolution(
        x, _w((4, 2, 2, 3), d), stride=[2, 3], dilation=[2, 1], output_padding=[1, 2], groups=2)),
    "deconv-1d-f16": _case((1, 2, 7), lambda n, x, d: n.add_deconvolution(x, _w((2, 3, 4), d), _w((3,), d),
                                                                          stride=[3], pads=[1, 1]), F16),
    "deconv-crop-view": _case((1, 2, 5, 5), lambda n, x, d: n.add_deconvolution(x, _w((2, 3, 3, 3), d),
                                                                                pads=[1, 1, 1, 1]), fires=False),
    "deconv-bad-channels": _case((1, 3, 5, 5), lambda n, x, d: n.add_deconvolution(x, _w((2, 3, 3, 3), d)),
                                 fires=False),
    "maxpool": _case((2, 3, 9, 9), lambda n, x, d: n.add_pooling(x, "max", [3, 3], stride=[2, 2], pads=[1] * 4)),
    "maxpool-ceil-asym": _case((1, 2, 10, 7), lambda n, x, d: n.add_pooling(
        x, "max", [3, 2], stride=[2, 2], pads=[0, 1, 1, 0], ceil_mode=True)),
    "avgpool-ceil": _case((1, 2, 7, 7), lambda n, x, d: n.add_pooling(x, "average", [2, 2], stride=[2, 2],
                                                                      ceil_mode=True, count_include_pad=True), F16),
    "maxpool-ceil-last-window": _case((1, 1, 5, 5), lambda n, x, d: n.add_pooling(   # a window only in the padding
        x, "max", [2, 2], stride=[2, 2], pads=[1] * 4, ceil_mode=True)),
    "avgpool-asym": _case((1, 2, 8, 8), lambda n, x, d: n.add_pooling(x, "average", [3, 3], stride=[1, 1],
                                                                      pads=[0, 0, 2, 2])),
    "avgpool-dilated": _case((1, 2, 9, 9), lambda n, x, d: n.add_layer("Pooling", [x], {
        "type": "average", "kernel": [2, 2], "stride": [1, 1], "pads": [0] * 4, "dilation": [2, 2]})),
    "lppool-1d": _case((1, 2, 9), lambda n, x, d: n.add_layer("Pooling", [x], {
        "type": "lp", "kernel": [3], "stride": [2], "pads": [1, 1], "p": 2})),
    "maxpool-3d": _case((1, 2, 4, 5, 6), lambda n, x, d: n.add_pooling(x, "max", [2, 2, 2])),
    "global-avg": _case((2, 3, 5, 6), lambda n, x, d: n.add_pooling(x, "average", None), F16),
    "global-max-1d": _case((2, 3, 5), lambda n, x, d: n.add_pooling(x, "max", None)),
    "global-lp": _case((2, 3, 5, 5), lambda n, x, d: n.add_layer("Pooling", [x], {"type": "lp", "kernel": None, "p": 1})),
    "pool-indices": _case((1, 2, 4, 4), lambda n, x, d: n.add_layer("Pooling", [x], {
        "type": "max", "kernel": [2, 2], "stride": [2, 2], "return_indices": True}, num_outputs=2), fires=False),
    "softmax": _case((2, 3, 4), lambda n, x, d: n.add_softmax(x, 1)),
    "logsoftmax-f16": _case((2, 5), lambda n, x, d: n.add_softmax(x, -1, log=True), F16),
    "softmax-bad-axis": _case((2, 5), lambda n, x, d: n.add_softmax(x, 2), fires=False),
    "concat": _case((2, 3, 4), lambda n, x, d: n.add_concatenation([x, n.add_constant(_w((2, 5, 4), d)), x], 1)),
    "concat-1x1-maps": _case((2, 3, 1, 1), lambda n, x, d: n.add_concatenation([x, x], 1)),   # channels-last too
    "concat-slices": _case((2, 6, 4, 4), lambda n, x, d: n.add_concatenation(
        [_s(n, x, [0], [2], [1]), _s(n, x, [3], [6], [1]), x], 1)),
    "concat-expanded": _case((2, 1, 4), lambda n, x, d: n.add_concatenation(
        [n.add_layer("Expand", [x, n.add_constant(np.array([2, 3, 4]))]).output] * 2, 1)),
    "concat-transposed": _case((2, 3, 3), lambda n, x, d: n.add_concatenation([_t(n, x, [0, 2, 1]), x], 2)),
    "concat-int64": _case((2, 3), lambda n, x, d: n.add_concatenation([x, n.add_constant(_w((2, 1), d))], 1),
                          np.int64),
    "concat-transposed-3d": _case((2, 4, 3), lambda n, x, d: n.add_concatenation(
        [_t(n, x, [0, 2, 1]), n.add_constant(_w((2, 1, 4), d))], 1)),
    "concat-permuted-4d": _case((2, 4, 5, 3), lambda n, x, d: n.add_concatenation([_t(n, x, [0, 3, 1, 2])] * 2, 1),
                                fires=False),
    "concat-neg-axis": _case((2, 3), lambda n, x, d: n.add_concatenation([x, x], -1)),
    "concat-bad": _case((2, 3), lambda n, x, d: n.add_concatenation([x, n.add_constant(_w((3, 3), d))], 1),
                        fires=False),
    "scale-channel": _case((2, 3, 4, 4), lambda n, x, d: n.add_scale(x, _w((3,), d), _w((3,), d), _w((3,), d))),
    "scale-axis-last": _case((2, 5), lambda n, x, d: n.add_layer("Scale", [x, n.add_constant(_w((5,), d))],
                                                                 {"mode": "channel", "channel_axis": -1})),
    "scale-uniform": _case((2, 3), lambda n, x, d: n.add_layer("Scale", [x, None, n.add_constant(_w((1,), d))],
                                                               {"mode": "uniform"})),
    "scale-elementwise": _case((2, 3), lambda n, x, d: n.add_layer("Scale", [x, n.add_constant(_w((2, 3), d))],
                                                                   {"mode": "elementwise"})),
    "layernorm": _case((2, 5, 8), lambda n, x, d: n.add_normalization(x, _w((8,), d), _w((8,), d))),
    "layernorm-2axes": _case((2, 5, 8), lambda n, x, d: n.add_normalization(x, _w((5, 8), d), axis=1), F16),
    "rmsnorm-sum": _case((2, 8), lambda n, x, d: n.add_layer("Normalization", [x, n.add_constant(_w((8,), d)),
                                                                               None, None, None, x],
                                                             {"type": "rms", "sum_output": True}, num_outputs=2)),
    "instancenorm": _case((2, 3, 4, 4), lambda n, x, d: n.add_normalization(x, _w((3,), d), _w((3,), d),
                                                                            type="instance")),
    "groupnorm": _case((2, 6, 4), lambda n, x, d: n.add_normalization(x, _w((6,), d), _w((6,), d), type="group",
                                                                      num_groups=3)),
    "batchnorm": _case((2, 3, 4), lambda n, x, d: n.add_layer("Normalization", [x] + [
        n.add_constant(_w((3,), d)) for _ in range(4)], {"type": "batch"})),
    "layernorm-codes": _case((2, 8), lambda n, x, d: n.add_layer(      # 8-bit codes as a second output
        "Normalization", [x, n.add_constant(_w((8,), d))], {"type": "layer", "codes_scale": 0.05, "codes_to": "int8"},
        num_outputs=2), fires=False),
    "layernorm-odd-scale": _case((2, 5, 8), lambda n, x, d: n.add_normalization(x, _w((1, 8), d)), fires=False),
    "reduce-mean": _case((2, 3, 4), lambda n, x, d: n.add_reduce(x, "mean", [1])),
    "reduce-sum-nokeep": _case((2, 3, 4), lambda n, x, d: n.add_reduce(x, "sum", [0, -1], keepdims=False), F16),
    "reduce-all": _case((2, 3, 4), lambda n, x, d: n.add_reduce(x, "l2", None, keepdims=False)),
    "reduce-max-empty": _case((0, 3), lambda n, x, d: n.add_reduce(x, "max", [0])),
    "reduce-dup-axes": _case((2, 3), lambda n, x, d: n.add_reduce(x, "sum", [1, -1]), fires=False),
    "reduce-bad-axis": _case((2, 3), lambda n, x, d: n.add_reduce(x, "sum", [2]), fires=False),
}


def _net(shape, build, dtype):
    net = Network("case")
    x = net.add_input("x", np.dtype(dtype).name, list(shape))
    layer = build(net, x, dtype)
    return net, layer


def _described(v) -> Any:
    if not isinstance(v, torch.Tensor):
        return "unknown"
    return tuple(v.shape), v.stride(), v.dtype


def _evaluate(net, layer, shape, rules: bool, monkeypatch, strict: bool = False):
    monkeypatch.setattr(shape_rules, "enabled", rules)
    monkeypatch.setattr(shapes, "_MEMO", {})         # a memo hit would answer for the other path
    vals = shapes.evaluate(net, {"x": shape}, strict=strict)
    return [_described(vals.get(o.name)) for o in layer.outputs]


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_meta_evaluation(name, monkeypatch):
    shape, build, dtype, fires = CASES[name]
    net, layer = _net(shape, build, dtype)
    answered = []
    real = shape_rules.outputs
    monkeypatch.setattr(shape_rules, "outputs", lambda *a: answered.append(real(*a)) or answered[-1])
    got = _evaluate(net, layer, shape, True, monkeypatch)
    last = answered[-1]                                       # what the rules said of the layer under test
    want = _evaluate(net, layer, shape, False, monkeypatch)
    assert got == want
    assert (last is not None) == fires, answered              # the rule answered exactly where it should
    if fires:
        assert "unknown" not in got


@pytest.mark.parametrize("name", ["conv-too-small", "add-mismatch", "matmul-k-mismatch", "concat-bad"])
def test_strict_errors_are_the_tactics_own(name, monkeypatch):
    shape, build, dtype, _ = CASES[name]
    net, layer = _net(shape, build, dtype)
    messages = []
    for rules in (True, False):
        with pytest.raises(ShapeError) as e:
            _evaluate(net, layer, shape, rules, monkeypatch, strict=True)
        messages.append(str(e.value))
    assert messages[0] == messages[1] and layer.name in messages[0]


def test_each_rule_was_written_for_its_kinds_attributes():
    """A new attribute of a ruled kind (a fused extra that may change the outputs) needs its rule looked at."""
    from kiln.ir import shape_rules as rules
    from kiln.ir.layers import LAYER_KINDS
    assert {k: set(v) for k, v in rules._KNOWS.items()} == {k: set(LAYER_KINDS[k].attrs) for k in rules._KNOWS}


def test_a_layer_with_an_attribute_its_rule_does_not_know_goes_to_meta_evaluation():
    x = torch.empty(2, 3, device="meta")
    assert shape_rules.outputs("Activation", {"type": "relu"}, [x]) is not None
    assert shape_rules.outputs("Activation", {"type": "relu", "fused_extra": 1}, [x]) is None
    assert shape_rules.outputs("Activation", {"type": "relu", "fused_extra": None}, [x]) is not None


def _symbolic_net() -> Network:
    """x[N, 3, H, W] through the ruled kinds, with a transposed branch that stays on meta evaluation."""
    net = Network("sym")
    x = net.add_input("x", "float32", ["N", 3, "H", "W"])
    c = net.add_convolution(x, _w((8, 3, 3, 3)), _w((8,)), stride=[2, 2], pads=[1, 1, 1, 1]).output
    c = net.add_normalization(c, _w((8,)), _w((8,)), type="group", num_groups=4).output
    c = net.add_activation(c, "relu").output
    p = net.add_pooling(c, "max", [2, 2], stride=[2, 2], ceil_mode=True).output
    s = net.add_scale(p, _w((8,)), _w((8,))).output
    e = net.add_elementwise(p, s, "sum").output
    g = net.add_pooling(e, "average", None).output
    f = net.add_flatten(g, 1).output
    fc = net.add_fully_connected(f, _w((6, 8)), _w((6,))).output
    t = net.add_shuffle(e, first_transpose=[0, 2, 3, 1]).output              # non-contiguous: meta path
    m = net.add_matmul(t, _w((8, 4))).output
    r = net.add_reduce(m, "mean", [1, 2], keepdims=False).output
    cat = net.add_concatenation([fc, r], 1).output
    net.add_normalization(net.add_softmax(cat, -1).output, _w((10,)), _w((10,)))
    return net


def test_symbolic_shapes_are_the_same_with_and_without_rules(monkeypatch):
    inferred = []
    for rules in (True, False):
        monkeypatch.setattr(shape_rules, "enabled", rules)
        monkeypatch.setattr(shapes, "_MEMO", {})
        net = _symbolic_net()
        shapes.infer_shapes(net)
        inferred.append({t.name: (t.shape, t.dtype) for t in net.tensors.values()})
    assert inferred[0] == inferred[1]
    final = inferred[0][_symbolic_net().layers[-1].outputs[0].name]
    assert final == (("N", 10), "float32")
    # dims that follow H and W through the stride-2 conv and the ceil-mode pool are not either symbol
    conv_out = inferred[0][_symbolic_net().layers[0].outputs[0].name]
    assert conv_out[0][:2] == ("N", 8) and conv_out[0][2:] == (None, None)
