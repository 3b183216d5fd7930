"""Which layers a post-training quantization quantizes, and the Q/DQ layers put around them.

As TensorRT does by default: convolutions, fully-connected layers, and GEMMs/matmuls whose second operand is
a constant weight; grouped (depthwise) convolutions and stems over at most 3 input channels (image channels) stay in
the build's float precision. Each such layer reads its weight as an 8-bit constant with per-output-channel symmetric
scales through DequantizeLinear, and its float activation through a QuantizeLinear/DequantizeLinear pair with
one per-tensor scale (shared by every quantized reader of that tensor); a residual add after a quantized layer
reads its shortcut through the shortcut's pair too, where it has one. The result is an explicitly quantized
network, which any build runs (dequantized where no 8-bit kernel exists).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np

from kiln.errors import BuildError
from kiln.ir.dtypes import np_dtype
from kiln.ir.network import Layer, Network

# the 8-bit types: (Kiln dtype, largest magnitude a symmetric scale maps amax to)
TYPES = {"int8": ("int8", 127.0), "fp8": ("float8_e4m3fn", 448.0)}
STEM_CHANNELS = 3          # convolutions over at most this many input channels (an image stem) stay float
QDQ = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "IntegerOp")


class Target(NamedTuple):
    """A layer to quantize: its activation input positions, its weight input position and the weight's
    output-channel axis."""

    layer: Layer
    acts: tuple[int, ...]
    weight: int
    axis: int


def _target(layer: Layer) -> Target | None:
    ins = layer.inputs

    def const_float(i: int) -> bool:
        return len(ins) > i and ins[i] is not None and ins[i].is_constant and ins[i].dtype == "float32"

    def act(i: int) -> bool:
        return len(ins) > i and ins[i] is not None and not ins[i].is_constant and ins[i].dtype == "float32"
    if not (act(0) and const_float(1)):
        return None
    k, a = layer.kind, layer.attrs
    if k == "Convolution" and a.get("groups", 1) > 1:
        return None      # grouped/depthwise: no 8-bit kernel, and FP16 costs a memory-bound conv little
    if k == "Convolution" and ins[1].value.ndim > 1 and ins[1].value.shape[1] <= STEM_CHANNELS:
        return None      # a stem over image channels: the 8-bit kernel would pad them to a tensor-core tile
    if k in ("Convolution", "FullyConnected") and len(ins) <= 3:      # no fused residual input
        return Target(layer, (0,), 1, 0)
    if k == "MatMul" and ins[1].value.ndim >= 2:
        return Target(layer, (0,), 1, ins[1].value.ndim - (2 if a.get("transpose_b") else 1))
    if k == "Gemm" and ins[1].value.ndim == 2 and not a.get("trans_a"):
        return Target(layer, (0,), 1, 0 if a.get("trans_b") else 1)
    return None


def corrects_bias(t: Target) -> bool:
    """Whether bias correction covers the target: convolutions and fully-connected layers (matmuls and GEMMs have
    no bias input of their own)."""
    return t.layer.kind in ("Convolution", "FullyConnected")


def targets(net: Network, exclude: set[int]) -> list[Target]:
    """The layers of ``net`` (top level) to quantize, leaving out the ids in ``exclude``."""
    return [t for layer in net.layers if id(layer) not in exclude and (t := _target(layer)) is not None]


def refuse_quantized(net: Network) -> None:
    """A model that already carries quantization takes its scales as given, not a calibration."""
    found = next((layer for layer in net.layers if layer.kind in QDQ), None)
    if found is not None:
        raise BuildError(f"The model is already quantized (layer {found.name!r} is {found.kind}); build it without "
                         f"--int8/--fp8 and Kiln takes its scales as given.")


def weight_scales(w: np.ndarray, axis: int, qmax: float) -> np.ndarray:
    """Per-channel symmetric scales along ``axis``: max |w| over the other axes / qmax (1 for an all-zero
    channel), float32."""
    other = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w.astype(np.float64)).max(axis=other) if other else np.abs(w.astype(np.float64))
    return np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)


def act_scale(amax: float, qmax: float) -> np.float32:
    """The per-tensor symmetric scale for range ``amax`` (1 for a tensor that was always zero)."""
    return np.float32(amax / qmax if amax > 0 and np.isfinite(amax) else 1.0)


def quantize_weight(w: np.ndarray, scale: np.ndarray, axis: int, qmax: float, dtype: str = "int8") -> np.ndarray:
    """``w / scale`` as ``dtype`` codes, as ONNX QuantizeLinear computes them in float32: int8 rounds half to
    even and clamps to ±qmax; float8_e4m3fn saturates to ±448 and rounds to the nearest E4M3 value."""
    shape = [1] * w.ndim
    shape[axis] = -1
    x = w.astype(np.float32) / scale.reshape(shape)
    if dtype == "int8":
        return np.clip(np.rint(x), -qmax, qmax).astype(np.int8)
    return np.clip(x, -qmax, qmax).astype(np_dtype(dtype))


def insert(net: Network, chosen: list[Target], amax: dict[str, float], mode: str = "int8",
           means: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, dict]:
    """Rewrite ``net`` in place: each target reads its weight dequantized from 8-bit codes of ``mode`` and its
    activations through a shared Q/DQ pair with the scale ``amax[name] / qmax`` (127 for int8, 448 for fp8).
    With ``means`` (per layer name: the float and quantized mean input of each weight position, from
    calibrate.window_means), each convolution and fully-connected layer named there gets bias correction
    (``corrected_bias``). Returns each target's scales by layer name
    (the layer record of kiln.engine.quant_record)."""
    dtype, qmax = TYPES[mode]
    pairs: dict[str, object] = {}
    scales: dict[str, dict] = {}
    for t in chosen:
        layer = t.layer
        acts = {}
        for i in t.acts:
            x = layer.inputs[i]
            acts[x.name] = float(act_scale(amax[x.name], qmax))
            if x.name not in pairs:
                pairs[x.name] = _qdq(net, x, act_scale(amax[x.name], qmax), dtype)
            layer.set_input(i, pairs[x.name])
        w = layer.inputs[t.weight]
        s = weight_scales(w.value, t.axis, qmax)
        scales[layer.name] = {"type": dtype, "inputs": acts, "weight": {"tensor": w.name, "axis": t.axis,
                                                                          "count": int(s.size), "min": float(s.min()),
                                                                          "max": float(s.max())}}
        codes = quantize_weight(w.value, s, t.axis, qmax, dtype)
        if means and layer.name in means:
            _correct_bias(net, layer, corrected_bias(layer, w.value, dequantize(codes, s, t.axis), *means[layer.name]))
        q = net.add_constant(codes, name=net.unique_name(f"{w.name}_{dtype}"))
        dq = net.add_layer("DequantizeLinear", [q, net.add_constant(s, name=net.unique_name(f"{w.name}_scale")),
                                                net.add_constant(np.zeros(s.shape, np_dtype(dtype)),
                                                                 name=net.unique_name(f"{w.name}_zero_point"))],
                           {"axis": t.axis, "to": "float32", "block_size": 0},
                           name=net.unique_layer_name("DequantizeLinear", f"{layer.name}/weight_dequantize"),
                           output_dtypes=["float32"])
        dq.outputs[0].shape = w.shape
        layer.set_input(t.weight, dq.outputs[0])
    _quantized_shortcuts(net, chosen, pairs)
    net.remove_unused_constants()
    net.toposort()
    return scales


def dequantize(codes: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """8-bit weight ``codes`` times their per-channel ``scale`` along ``axis``, in float64."""
    shape = [1] * codes.ndim
    shape[axis] = -1
    return codes.astype(np.float64) * scale.astype(np.float64).reshape(shape)


def corrected_bias(layer: Layer, w: np.ndarray, wq: np.ndarray, mean: np.ndarray, qmean: np.ndarray
                   ) -> np.ndarray | None:
    """Bias correction (Nagel et al., "Data-Free Quantization", 2019; NNCF's and Sony MCT's PTQ do it by default):
    the bias of a convolution or fully-connected ``layer`` (weight ``w`` [out, in, *kernel], quantized ``wq``) less
    the shift quantization adds to each output channel's mean, ``sum(wq * E[Q(x)]) - sum(w * E[x])`` over each
    weight position, from the mean input each weight position reads in float (``mean``) and quantized (``qmean``),
    shaped ``w.shape[1:]`` (or flat). None for a layer whose bias is not a constant."""
    b = layer.inputs[2] if len(layer.inputs) > 2 else None
    if b is not None and not b.is_constant:
        return None
    if mean.size != qmean.size or mean.size != int(np.prod(w.shape[1:])):
        raise BuildError(f"Layer {layer.name!r} has {int(np.prod(w.shape[1:]))} weights per output channel but its "
                         f"calibration statistics hold {mean.size}; give a new --calib-cache path to calibrate again.")
    flat = lambda a: a.astype(np.float64).reshape(a.shape[0], -1)  # noqa: E731
    shift = flat(wq) @ qmean.astype(np.float64).ravel() - flat(w) @ mean.astype(np.float64).ravel()
    bias = b.value.astype(np.float64) if b is not None else np.zeros(w.shape[0])
    return (bias - shift).astype(np.float32)


def _correct_bias(net: Network, layer: Layer, bias: np.ndarray | None) -> None:
    """Give ``layer`` (a convolution or fully-connected layer) the constant ``bias`` as its bias input."""
    if bias is None:
        return
    while len(layer.inputs) < 3:
        layer.inputs.append(None)
    layer.set_input(2, net.add_constant(bias, name=net.unique_name(f"{layer.name}_bias_corrected")))


def _quantized_shortcuts(net: Network, chosen: list[Target], pairs: dict[str, object]) -> None:
    """A residual add of a quantized layer's output (through batch norms) and a shortcut that is already quantized
    for another reader reads the shortcut through that same Q/DQ pair, as TensorRT places Q/DQ on a residual
    add: the build then fuses the add into the layer's epilogue reading the shortcut as 8-bit codes, and the
    shortcut tensor is stored once, as codes (no float copy for the add). No new range is needed: the scale is
    the one the shortcut's other readers use."""
    quantized = {id(t.layer) for t in chosen}

    def from_quantized(x) -> bool:
        while x is not None and x.producer is not None and x.producer.kind == "Normalization" \
                and x.producer.attrs.get("type") == "batch":
            x = x.producer.inputs[0]
        return x is not None and x.producer is not None and id(x.producer) in quantized

    for layer in list(net.layers):
        if layer.kind != "ElementWise" or layer.attrs.get("op") != "sum" or len(layer.inputs) != 2:
            continue
        for i in (0, 1):
            y, r = layer.inputs[i], layer.inputs[1 - i]
            if r is not None and r.name in pairs and from_quantized(y):
                layer.set_input(1 - i, pairs[r.name])
                break


def _qdq(net: Network, x, scale: np.float32, dtype: str):
    """QuantizeLinear → DequantizeLinear of activation ``x`` with one scale and a zero zero point."""
    s = net.add_constant(np.asarray(scale, np.float32), name=net.unique_name(f"{x.name}_scale"))
    zp = net.add_constant(np.zeros((), np_dtype(dtype)), name=net.unique_name(f"{x.name}_zero_point"))
    q = net.add_layer("QuantizeLinear", [x, s, zp], {"axis": 1, "to": dtype, "block_size": 0, "saturate": 1},
                      name=net.unique_layer_name("QuantizeLinear", f"{x.name}/quantize"), output_dtypes=[dtype])
    dq = net.add_layer("DequantizeLinear", [q.outputs[0], s, zp], {"axis": 1, "to": "float32", "block_size": 0},
                       name=net.unique_layer_name("DequantizeLinear", f"{x.name}/dequantize"),
                       output_dtypes=["float32"])
    q.outputs[0].shape = dq.outputs[0].shape = x.shape
    return dq.outputs[0]
