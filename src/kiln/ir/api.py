"""Typed helpers for building a Network by hand, in TensorRT's manner.

``network.add_convolution(x, weight, bias, stride=(2, 2), pads=(3, 3, 3, 3))``
returns the new Layer; its output is ``layer.output``. Weights may be numpy
arrays (they become constants) or Tensors.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from kiln.ir.network import Layer, Network, Tensor


def _t(net: "Network", v: Any) -> "Tensor | None":
    from kiln.ir.network import Tensor
    if v is None or isinstance(v, Tensor):
        return v
    return net.add_constant(np.asarray(v))


def _auto(mode: str | None) -> dict[str, str]:
    return {"auto_pad": mode} if mode else {}


def same_pads(mode: str, sizes: Sequence[int | None], kernel: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int]) -> list[int]:
    """Explicit pads (begins then ends) for auto_pad SAME_UPPER / SAME_LOWER, as ONNX Runtime computes
    them: an output of ceil(size / stride) per axis, the odd pixel at the end (UPPER) or the start
    (LOWER). A size may be None on an axis of stride 1, whose padding does not depend on it."""
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        span = (k - 1) * d + 1
        total = span - 1 if s == 1 else max(0, (-(-size // s) - 1) * s + span - size)
        small, big = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else big)
        ends.append(big if mode == "SAME_UPPER" else small)
    return begins + ends


class LayerAPI:
    """Mixed into Network; every method adds one layer and returns it."""

    def add_activation(self: "Network", x: "Tensor", type: str, alpha: float = 0.0, beta: float = 0.0,
                       name: str | None = None) -> "Layer":
        return self.add_layer("Activation", [x], {"type": type, "alpha": alpha, "beta": beta}, name=name)

    def add_convolution(self: "Network", x: "Tensor", weight: Any, bias: Any = None, *, stride: Sequence[int] | None = None,
                        pads: Sequence[int] | None = None, dilation: Sequence[int] | None = None, groups: int = 1,
                        auto_pad: str | None = None, name: str | None = None) -> "Layer":
        """N-d convolution (1-, 2- or 3-D by the weight's rank); weight [Cout, Cin/groups, k...].
        ``auto_pad`` "SAME_UPPER"/"SAME_LOWER" pads for an output of ceil(size / stride) (TensorRT's
        padding mode), worked out by the builder once the input's size is known."""
        w = _t(self, weight)
        nd = len(w.shape) - 2
        ins = [x, w] + ([_t(self, bias)] if bias is not None else [])
        return self.add_layer("Convolution", ins, {
            "stride": list(stride or [1] * nd), "pads": list(pads or [0] * (2 * nd)),
            "dilation": list(dilation or [1] * nd), "groups": groups, **_auto(auto_pad)}, name=name)

    def add_deconvolution(self: "Network", x: "Tensor", weight: Any, bias: Any = None, *,
                          stride: Sequence[int] | None = None, pads: Sequence[int] | None = None,
                          dilation: Sequence[int] | None = None, output_padding: Sequence[int] | None = None,
                          groups: int = 1, name: str | None = None) -> "Layer":
        w = _t(self, weight)
        nd = len(w.shape) - 2
        ins = [x, w] + ([_t(self, bias)] if bias is not None else [])
        return self.add_layer("Deconvolution", ins, {
            "stride": list(stride or [1] * nd), "pads": list(pads or [0] * (2 * nd)),
            "dilation": list(dilation or [1] * nd), "output_padding": list(output_padding or [0] * nd),
            "groups": groups}, name=name)

    def add_fully_connected(self: "Network", x: "Tensor", weight: Any, bias: Any = None,
                            name: str | None = None) -> "Layer":
        """y = x @ weight.T + bias over the last axis; weight is [out_features, in_features]."""
        ins = [x, _t(self, weight)] + ([_t(self, bias)] if bias is not None else [])
        return self.add_layer("FullyConnected", ins, {}, name=name)

    def add_elementwise(self: "Network", a: Any, b: Any, op: str, name: str | None = None) -> "Layer":
        return self.add_layer("ElementWise", [_t(self, a), _t(self, b)], {"op": op}, name=name)

    def add_unary(self: "Network", x: "Tensor", op: str, name: str | None = None) -> "Layer":
        return self.add_layer("Unary", [x], {"op": op}, name=name)

    def add_pooling(self: "Network", x: "Tensor", type: str, kernel: Sequence[int] | None, *,
                    stride: Sequence[int] | None = None, pads: Sequence[int] | None = None, ceil_mode: bool = False,
                    count_include_pad: bool = False, auto_pad: str | None = None, name: str | None = None) -> "Layer":
        """Max/average pooling; ``kernel=None`` pools globally; ``auto_pad`` as in add_convolution."""
        nd = len(kernel) if kernel else 0
        return self.add_layer("Pooling", [x], {
            "type": type, "kernel": list(kernel) if kernel else None, "stride": list(stride or kernel or []),
            "pads": list(pads or [0] * (2 * nd)), "dilation": [1] * nd, "ceil_mode": ceil_mode,
            "count_include_pad": count_include_pad, "p": 2, **_auto(auto_pad)}, name=name)

    def add_padding(self: "Network", x: "Tensor", pads: Sequence[int], mode: str = "constant", value: float = 0.0,
                    name: str | None = None) -> "Layer":
        return self.add_layer("Padding", [x], {"pads": list(pads), "mode": mode, "value": value}, name=name)

    def add_flatten(self: "Network", x: "Tensor", axis: int = 1, name: str | None = None) -> "Layer":
        return self.add_layer("Flatten", [x], {"axis": axis}, name=name)

    def add_lrn(self: "Network", x: "Tensor", size: int, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0,
                name: str | None = None) -> "Layer":
        return self.add_layer("LRN", [x], {"size": size, "alpha": alpha, "beta": beta, "bias": bias}, name=name)

    def add_softmax(self: "Network", x: "Tensor", axis: int = -1, log: bool = False, name: str | None = None) -> "Layer":
        return self.add_layer("SoftMax", [x], {"axis": axis, "log": log}, name=name)

    def add_concatenation(self: "Network", inputs: Sequence["Tensor"], axis: int = 0,
                          name: str | None = None) -> "Layer":
        return self.add_layer("Concatenation", list(inputs), {"axis": axis}, name=name)

    def add_scale(self: "Network", x: "Tensor", scale: Any = None, shift: Any = None, power: Any = None,
                  mode: str = "channel", name: str | None = None) -> "Layer":
        return self.add_layer("Scale", [x, _t(self, scale), _t(self, shift), _t(self, power)],
                              {"mode": mode, "channel_axis": 1}, name=name)

    def add_shuffle(self: "Network", x: "Tensor", *, first_transpose: Sequence[int] | None = None,
                    reshape: Sequence[int] | None = None, second_transpose: Sequence[int] | None = None,
                    name: str | None = None) -> "Layer":
        """Transpose, then reshape (0 copies the input dim, -1 infers), then transpose."""
        return self.add_layer("Shuffle", [x], {
            "first_transpose": list(first_transpose) if first_transpose is not None else None,
            "reshape": list(reshape) if reshape is not None else None,
            "second_transpose": list(second_transpose) if second_transpose is not None else None,
            "allowzero": False}, name=name)

    def add_squeeze(self: "Network", x: "Tensor", axes: Sequence[int], name: str | None = None) -> "Layer":
        return self.add_layer("Squeeze", [x], {"axes": list(axes)}, name=name)

    def add_unsqueeze(self: "Network", x: "Tensor", axes: Sequence[int], name: str | None = None) -> "Layer":
        return self.add_layer("Unsqueeze", [x], {"axes": list(axes)}, name=name)

    def add_matmul(self: "Network", a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False,
                   name: str | None = None) -> "Layer":
        return self.add_layer("MatMul", [_t(self, a), _t(self, b)],
                              {"transpose_a": transpose_a, "transpose_b": transpose_b}, name=name)

    def add_reduce(self: "Network", x: "Tensor", op: str, axes: Sequence[int] | None, keepdims: bool = True,
                   name: str | None = None) -> "Layer":
        return self.add_layer("Reduce", [x], {"op": op, "axes": list(axes) if axes is not None else None,
                                              "keepdims": keepdims, "noop_with_empty_axes": False}, name=name)

    def add_gather(self: "Network", x: Any, indices: Any, axis: int = 0, name: str | None = None) -> "Layer":
        return self.add_layer("Gather", [_t(self, x), _t(self, indices)], {"axis": axis}, name=name)

    def add_slice(self: "Network", x: "Tensor", starts: Sequence[int], ends: Sequence[int],
                  axes: Sequence[int] | None = None, steps: Sequence[int] | None = None,
                  name: str | None = None) -> "Layer":
        ins = [x, _t(self, np.asarray(starts, np.int64)), _t(self, np.asarray(ends, np.int64)),
               _t(self, np.asarray(axes if axes is not None else range(len(starts)), np.int64)),
               _t(self, np.asarray(steps if steps is not None else [1] * len(starts), np.int64))]
        return self.add_layer("Slice", ins, {}, name=name)

    def add_resize(self: "Network", x: "Tensor", *, scales: Sequence[float] | None = None,
                   sizes: Sequence[int] | None = None, mode: str = "nearest",
                   coordinate_transformation_mode: str = "asymmetric", nearest_mode: str = "floor",
                   name: str | None = None) -> "Layer":
        ins = [x, None, _t(self, np.asarray(scales, np.float32)) if scales is not None else None,
               _t(self, np.asarray(sizes, np.int64)) if sizes is not None else None]
        return self.add_layer("Resize", ins, {"mode": mode, "coordinate_transformation_mode":
                                              coordinate_transformation_mode, "nearest_mode": nearest_mode,
                                              "cubic_coeff_a": -0.75, "exclude_outside": 0,
                                              "extrapolation_value": 0.0}, name=name)

    def add_normalization(self: "Network", x: "Tensor", scale: Any = None, bias: Any = None, *, type: str = "layer",
                          axis: int = -1, epsilon: float = 1e-5, num_groups: int = 1,
                          name: str | None = None) -> "Layer":
        """Layer/instance/group/RMS normalization; statistics are always computed in FP32."""
        return self.add_layer("Normalization", [x, _t(self, scale), _t(self, bias)],
                              {"type": type, "axis": axis, "epsilon": epsilon, "num_groups": num_groups}, name=name)

    def add_cast(self: "Network", x: "Tensor", to: str, name: str | None = None) -> "Layer":
        layer = self.add_layer("Cast", [x], {"to": to}, name=name, output_dtypes=[to])
        return layer

    def add_shape(self: "Network", x: "Tensor", name: str | None = None) -> "Layer":
        return self.add_layer("Shape", [x], {"start": 0, "end": None}, name=name, output_dtypes=["int64"])

    def add_topk(self: "Network", x: "Tensor", k: int, axis: int = -1, largest: bool = True,
                 name: str | None = None) -> "Layer":
        return self.add_layer("TopK", [x, _t(self, np.asarray([k], np.int64))],
                              {"axis": axis, "largest": largest, "sorted": True}, num_outputs=2, name=name,
                              output_dtypes=[x.dtype, "int64"])

    def add_where(self: "Network", cond: Any, a: Any, b: Any, name: str | None = None) -> "Layer":
        return self.add_layer("Where", [_t(self, cond), _t(self, a), _t(self, b)], {}, name=name)

    def add_identity(self: "Network", x: "Tensor", name: str | None = None) -> "Layer":
        return self.add_layer("Identity", [x], {}, name=name)

    def add_rnn(self: "Network", x: "Tensor", W: Any, R: Any, B: Any = None, *, cell: str = "lstm",
                hidden_size: int, direction: str = "forward", initial_h: Any = None, initial_c: Any = None,
                name: str | None = None) -> "Layer":
        """ONNX-layout RNN/GRU/LSTM over x [seq, batch, input]; outputs Y, Y_h (and Y_c for LSTM)."""
        ins = [x, _t(self, W), _t(self, R), _t(self, B), None, _t(self, initial_h), _t(self, initial_c)]
        n_out = 3 if cell == "lstm" else 2
        return self.add_layer("RNN", ins, {"cell": cell, "hidden_size": hidden_size, "direction": direction,
                                           "activations": None, "activation_alpha": None, "activation_beta": None,
                                           "clip": None, "linear_before_reset": 0, "layout": 0, "input_forget": 0},
                              num_outputs=n_out, name=name)

    def add_plugin(self: "Network", plugin: Any, inputs: Sequence["Tensor"], name: str | None = None) -> "Layer":
        """A custom layer; ``plugin`` is a kiln.Plugin instance (its class must be registered to load)."""
        n_out = getattr(plugin, "num_outputs", None) or _plugin_num_outputs(plugin, inputs)
        return self.add_layer("Plugin", list(inputs), {"plugin": plugin}, num_outputs=n_out, name=name)

    def add_if(self: "Network", cond: "Tensor", then_branch: "Network", else_branch: "Network",
               name: str | None = None) -> "Layer":
        then_branch.outer = self
        else_branch.outer = self
        return self.add_layer("If", [cond], {"then_branch": then_branch, "else_branch": else_branch},
                              num_outputs=len(then_branch.outputs), name=name)


def _plugin_num_outputs(plugin: Any, inputs: Sequence["Tensor"]) -> int:
    from kiln.plugins.base import TensorDesc
    descs = [TensorDesc(tuple(t.shape or ()), t.dtype) for t in inputs]
    return len(plugin.output_descs(descs))
