"""Convolution, pooling, normalization, padding."""
from __future__ import annotations

import numpy as np

from kiln.errors import ParseError
from kiln.onnx.ops._common import const_value, window_pads
from kiln.onnx.registry import converter


def _kernel_from_weight(node, w):
    ks = node.attr("kernel_shape")
    if ks:
        return list(ks)
    if w.shape is None or not all(isinstance(d, int) for d in w.shape[2:]):
        raise ParseError(f"Node {node.name!r} ({node.op_type}) needs kernel_shape or a weight of known shape.")
    return list(w.shape[2:])


@converter("Conv", since=1)
def conv(ctx, node):
    x, w, b = node.input(0), node.input(1), node.input(2)
    k = _kernel_from_weight(node, w)
    nd = len(k)
    strides = node.attr("strides") or [1] * nd
    dil = node.attr("dilations") or [1] * nd
    return ctx.add1("Convolution", [x, w] + ([b] if b is not None else []),
                    {"stride": list(strides), **window_pads(node, x, k, strides, dil), "dilation": list(dil),
                     "groups": node.attr("group", 1)})


@converter("ConvTranspose", since=1)
def conv_transpose(ctx, node):
    x, w, b = node.input(0), node.input(1), node.input(2)
    k = _kernel_from_weight(node, w)
    nd = len(k)
    strides = node.attr("strides") or [1] * nd
    dil = node.attr("dilations") or [1] * nd
    out_pad = list(node.attr("output_padding") or [0] * nd)
    pads = node.attr("pads")
    out_shape = node.attr("output_shape")
    auto = node.attr("auto_pad", "NOTSET")
    if out_shape or auto in ("SAME_UPPER", "SAME_LOWER"):
        if out_shape and (x.shape is None or not all(isinstance(d, int) for d in x.shape[2:])):
            raise ParseError(f"Node {node.name!r} (ConvTranspose) with output_shape needs static spatial dims; its "
                             f"input has {list(x.shape[2:]) if x.shape is not None else 'unknown'}.")
        begins, ends = [], []
        for i in range(nd):
            span = (k[i] - 1) * dil[i] + 1
            if out_shape:
                total = strides[i] * (x.shape[2 + i] - 1) + out_pad[i] + span - list(out_shape)[-nd:][i]
            else:       # SAME: size * stride, whatever the size; a kernel shorter than the stride gives
                # (size - 1) * stride + span, no padding (ONNX Runtime does not grow the output)
                total = max(0, out_pad[i] + span - strides[i])
            if total < 0:       # output_shape beyond the natural size: the extra rows are output padding
                out_pad[i] -= total
                total = 0
            if auto == "SAME_UPPER" or (out_shape and auto != "SAME_LOWER"):
                begins.append(total // 2)
                ends.append(total - total // 2)
            else:
                begins.append(total - total // 2)
                ends.append(total // 2)
        pads = begins + ends
    elif auto == "VALID" or not pads:
        pads = [0] * (2 * nd)
    return ctx.add1("Deconvolution", [x, w] + ([b] if b is not None else []),
                    {"stride": list(strides), "pads": list(pads), "dilation": list(dil), "groups": node.attr("group", 1),
                     "output_padding": out_pad})


def _pool(ptype):
    def fn(ctx, node):
        x = node.input(0)
        k = list(node.attr("kernel_shape"))
        nd = len(k)
        strides = node.attr("strides") or [1] * nd
        dil = node.attr("dilations") or [1] * nd
        attrs = {"type": ptype, "kernel": k, "stride": list(strides), **window_pads(node, x, k, strides, dil),
                 "dilation": list(dil),
                 "ceil_mode": bool(node.attr("ceil_mode", 0)), "count_include_pad": bool(node.attr("count_include_pad", 0)),
                 "p": node.attr("p", 2)}
        if ptype == "max" and node.num_outputs > 1 and node.output_names[1]:
            attrs["return_indices"] = True
            attrs["storage_order"] = node.attr("storage_order", 0)
            return ctx.add("Pooling", [x], attrs, num_outputs=2, output_dtypes=[x.dtype, "int64"]).outputs
        return ctx.add1("Pooling", [x], attrs)
    return fn


converter("MaxPool", since=1)(_pool("max"))
converter("AveragePool", since=1)(_pool("average"))
converter("LpPool", since=1)(_pool("lp"))


def _global(ptype):
    def fn(ctx, node):
        return ctx.add1("Pooling", [node.input(0)], {"type": ptype, "kernel": None, "p": node.attr("p", 2)})
    return fn


converter("GlobalAveragePool", since=1)(_global("average"))
converter("GlobalMaxPool", since=1)(_global("max"))
converter("GlobalLpPool", since=1)(_global("lp"))


@converter("BatchNormalization", since=1)
def batch_norm(ctx, node):
    x, scale, bias, mean, var = (node.inputs + [None] * 5)[:5]
    if node.attr("training_mode", 0):     # batch statistics; also the updated running mean and variance
        n = max(1, min(3, node.num_outputs))
        layer = ctx.add("BatchNormTraining", [x, scale, bias, mean, var],
                        {"epsilon": node.attr("epsilon", 1e-5), "momentum": node.attr("momentum", 0.9)},
                        num_outputs=3, output_dtypes=[x.dtype, mean.dtype, var.dtype])
        return layer.outputs[:n]
    return ctx.add1("Normalization", [x, scale, bias, mean, var], {"type": "batch",
                                                                    "epsilon": node.attr("epsilon", 1e-5)})


@converter("InstanceNormalization", since=1)
def instance_norm(ctx, node):
    return ctx.add1("Normalization", [node.input(0), node.input(1), node.input(2)],
                    {"type": "instance", "epsilon": node.attr("epsilon", 1e-5)})


@converter("LayerNormalization", since=17)
def layer_norm(ctx, node):
    if node.num_outputs > 1 and any(node.output_names[1:]):
        stash = node.attr("stash_type", 1)
        x = node.input(0)
        stat = ("float64" if x.dtype == "float64" else "float32") if stash == 1 else x.dtype
        layer = ctx.add("LayerNormStats", [x, node.input(1), node.input(2)],
                        {"axis": node.attr("axis", -1), "epsilon": node.attr("epsilon", 1e-5), "stash_type": stash},
                        num_outputs=3, output_dtypes=[x.dtype, stat, stat])
        return layer.outputs[:node.num_outputs]
    return ctx.add1("Normalization", [node.input(0), node.input(1), node.input(2)],
                    {"type": "layer", "axis": node.attr("axis", -1), "epsilon": node.attr("epsilon", 1e-5)})


@converter("GroupNormalization", since=18)
def group_norm(ctx, node):
    return ctx.add1("Normalization", [node.input(0), node.input(1), node.input(2)],
                    {"type": "group", "epsilon": node.attr("epsilon", 1e-5), "num_groups": node.attr("num_groups")})


@converter("RMSNormalization", since=23)
def rms_norm(ctx, node):
    return ctx.add1("Normalization", [node.input(0), node.input(1)],
                    {"type": "rms", "axis": node.attr("axis", -1), "epsilon": node.attr("epsilon", 1e-5)})


@converter("LRN", since=1)
def lrn(ctx, node):
    return ctx.add1("LRN", [node.input(0)], {"size": node.attr("size"), "alpha": node.attr("alpha", 1e-4),
                                             "beta": node.attr("beta", 0.75), "bias": node.attr("bias", 1.0)})


@converter("Pad", since=1)
def pad_v1(ctx, node):
    return ctx.add1("Padding", [node.input(0)], {"pads": list(node.attr("paddings") or node.attr("pads")),
                                                 "mode": node.attr("mode", "constant"),
                                                 "value": node.attr("value", 0.0)})


@converter("Pad", since=11)
def pad_v11(ctx, node):
    x, pads, value, axes = node.input(0), node.input(1), node.input(2), node.input(3)
    attrs = {"pads": None, "mode": node.attr("mode", "constant"), "value": 0.0}
    v = const_value(value)
    if v is not None and np.asarray(v).size:
        attrs["value"] = np.asarray(v).reshape(-1)[0].item()
        value = None
    return ctx.add1("Padding", [x, pads, value, axes], attrs)


@converter("MaxUnpool", since=9)
def max_unpool(ctx, node):
    k = list(node.attr("kernel_shape"))
    return ctx.add1("MaxUnpool", [node.input(0), node.input(1), node.input(2)],
                    {"kernel": k, "stride": list(node.attr("strides") or [1] * len(k)),
                     "pads": list(node.attr("pads") or [0] * (2 * len(k)))}, dtype=node.input(0).dtype)


@converter("CausalConvWithState", since=27)
def causal_conv_with_state(ctx, node):
    """Stateful causal depthwise 1-D convolution, as the Concat → Conv → Slice it replaces.

    The past state (zeros when absent) is prepended along the length axis, a depthwise
    convolution without padding gives the output, and the last k-1 positions of the
    padded sequence are the present state. SiLU runs in FP32, as the reference does.
    """
    x, w, b, past = node.input(0), node.input(1), node.input(2), node.input(3)
    if w.shape is None or not all(isinstance(d, int) for d in w.shape):
        raise ParseError(f"Node {node.name!r} (CausalConvWithState) needs a weight of known shape (channels, 1, k).")
    channels, k = w.shape[0], w.shape[2]
    if past is None:
        padded = ctx.add1("Padding", [x], {"pads": [0, 0, k - 1, 0, 0, 0], "mode": "constant", "value": 0.0},
                          dtype=x.dtype)
    else:
        padded = ctx.add1("Concatenation", [past, x], {"axis": 2}, dtype=x.dtype)
    y = ctx.add1("Convolution", [padded, w] + ([b] if b is not None else []),
                 {"stride": [1], "pads": [0, 0], "dilation": [1], "groups": channels}, dtype=x.dtype)
    if node.attr("activation", "none") in ("silu", "swish"):
        wide = x.dtype in ("float16", "bfloat16")
        if wide:
            y = ctx.add1("Cast", [y], {"to": "float32"}, dtype="float32")
        y = ctx.add1("Activation", [y], {"type": "silu"}, dtype=y.dtype)
        if wide:
            y = ctx.add1("Cast", [y], {"to": x.dtype}, dtype=x.dtype)
    big = np.iinfo(np.int64).max
    start = -(k - 1) if k > 1 else big        # k == 1 keeps no state: an empty slice
    state = ctx.add1("Slice", [padded, ctx.const([start], np.int64), ctx.const([big], np.int64),
                               ctx.const([2], np.int64)], {}, dtype=x.dtype)
    return [y, state]
