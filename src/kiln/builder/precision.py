"""Precision assignment: run float work in FP16/BF16, keep interfaces and statistics in FP32.

Network inputs and outputs keep their declared dtype (a Cast sits at each edge);
float constants read by device layers are stored in the low precision, inside If branches and
Loop/Scan bodies too, and layers whose float output type is an attribute (Cast, DequantizeLinear,
Window, MelWeightMatrix) produce the low precision; kernels for
SoftMax, normalization and reductions accumulate in FP32 whatever the layer precision.
A layer that computes a float32 network output from one float activation, element-wise or as a
statistic (activations, element-wise arithmetic, SoftMax, normalizations, reductions), runs in FP32
from its low-precision input, so the output is not rounded to FP16/BF16 and then widened back (as a reformat-free FP32
output binding does in TensorRT); so does a recurrent layer that outputs its state (a streaming model
feeds it back on the next call, where rounding it each call would compound). Layers the user names (``BuildConfig.fp32_layers``) and plugins without a low-precision
implementation run in FP32 between casts: their weights stay FP32, an FP32 network input reaches
them unrounded, and neighbouring FP32 layers pass FP32 tensors to each other.
"""
from __future__ import annotations

import fnmatch

import numpy as np

from kiln.builder.placement import host_layers
from kiln.errors import BuildError
from kiln.ir.dtypes import np_dtype
from kiln.ir.layers import LAYER_KINDS
from kiln.ir.network import Network, subgraphs
from kiln.plugins.base import TensorDesc


def saturate(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast a float32 constant down, clamping finite values to the type's range (as TensorRT does):
    a mask constant like -3.4e38 must stay finite, or ``0 * -inf`` makes the whole softmax NaN."""
    import ml_dtypes
    info = ml_dtypes.finfo(dtype)
    finite = np.isfinite(value)
    return np.where(finite, np.clip(value, float(info.min), float(info.max)), value).astype(dtype)


FLOATS = ("float32", "float16", "bfloat16")


def fp32_matches(net: Network, patterns) -> set[int]:
    """ids of the layers (subgraph layers included) whose name or any ONNX node fused into them matches one
    of ``patterns``; a pattern that matches nothing is an error (a typo would otherwise change nothing,
    silently)."""
    keep: set[int] = set()
    layers = [layer for g in _networks(net) for layer in g.layers]
    for pat in patterns:
        hits = [layer for layer in layers
                if any(fnmatch.fnmatchcase(n, pat) for n in [layer.name, *layer.origin])]
        if not hits:
            raise BuildError(f"--fp32-layers pattern {pat!r} matches no layer; patterns are fnmatch patterns over the "
                             f"ONNX node names (`kiln inspect MODEL.onnx` lists them), e.g. '/layer1/*'.")
        keep.update(id(layer) for layer in hits)
    return keep


QUANTIZERS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "IntegerOp", "DynamicQuantizeLSTM")


def quantized_layers(g: Network) -> set[int]:
    """ids of the layers of ``g`` that a low-precision build keeps in FP32 because they belong to the model's
    quantization: the quantizers themselves (DynamicQuantizeLSTM too: it quantizes its activations); an integer
    op's int32 result cast to float and what combines that cast with its scales (int32 sums overflow FP16); and a layer between DequantizeLinear and
    QuantizeLinear (its FP16 rounding would move values across quantization steps). These layers compute what
    ONNX Runtime computes for them, in FP32: on CPU all of them, on CUDA those the 8-bit fold
    (passes/fold_qdq.py) leaves."""
    keep = {id(layer) for layer in g.layers if layer.kind in QUANTIZERS}

    def made_by(t, kinds) -> bool:
        return t is not None and t.producer is not None and t.producer.kind in kinds
    for layer in g.layers:
        if layer.kind == "Cast" and made_by(layer.inputs[0], ("IntegerOp",)):
            keep.add(id(layer))
            keep.update(id(u) for u, _ in layer.outputs[0].uses)
        elif layer.kind not in QUANTIZERS and any(u.kind == "QuantizeLinear" for o in layer.outputs for u, _ in o.uses):
            acts = [t for t in layer.inputs if t is not None and not t.is_constant and t.dtype in FLOATS]
            if acts and all(made_by(t, ("DequantizeLinear",)) for t in acts):
                keep.add(id(layer))
    return keep


# kinds whose work per output element is cheap element-wise math or an FP32 statistic: computing a network
# output in FP32 there costs a cast of the inputs instead of one of the output, and saves the output's rounding;
# and recurrent layers: a state they output is what a streaming caller feeds back on its next call, so FP16
# rounding there would compound from call to call
OUTPUT_FP32_KINDS = ("Activation", "Unary", "ElementWise", "Pointwise", "Scale", "SoftMax", "Normalization", "Reduce",
                     "RNN")


def output_layers(net: Network) -> set[int]:
    """ids of the top-level layers of ``OUTPUT_FP32_KINDS`` that make a float32 network output and read one
    float activation (the output's cast moves to that input; a residual sum's two inputs would need two)."""
    found = set()
    for t in net.outputs:
        layer = t.producer
        if t.dtype != "float32" or layer is None or layer.kind not in OUTPUT_FP32_KINDS:
            continue
        acts = {id(x) for x in layer.inputs if x is not None and not x.is_constant and x.dtype in FLOATS
                and not (x in net.inputs and x.dtype == "float32")}       # FP32 network inputs need no cast
        if len(acts) == 1 or layer.kind == "RNN":
            found.add(id(layer))
    return found


def assign_precision(net: Network, precision: str, fp32_layers=()) -> None:
    """Label every layer (subgraph layers included) with its precision; for FP16/BF16, narrow what
    low-precision layers read and make, and place the casts at the network's edges."""
    low = {"fp16": "float16", "bf16": "bfloat16"}.get(precision)
    nets = _networks(net)
    hosts = set().union(*(host_layers(g) for g in nets))
    keep = (fp32_matches(net, fp32_layers) | set().union(*(quantized_layers(g) for g in nets))
            | output_layers(net)) if low else set()
    for g in nets:
        for layer in g.layers:
            if id(layer) in hosts or id(layer) in keep:
                layer.precision = "fp32"
            elif low and LAYER_KINDS[layer.kind].fp32_internal:
                layer.precision = f"{precision} (fp32 accum)"
            else:
                layer.precision = precision if precision != "tf32" else "tf32"
    if low is None:
        return
    for g in nets:
        _narrow(g, low, hosts | keep, top=g is net)
    # inputs: cast right after each float32 input (readers inside subgraphs included)
    for t in net.inputs:
        uses = [(layer, i) for layer, i in t.uses if id(layer) not in hosts and id(layer) not in keep]
        if t.dtype != "float32" or not uses:
            continue
        cast = net.add_layer("Cast", [t], {"to": low}, name=net.unique_name(f"{t.name}/to_{low}"),
                             output_dtypes=[low])
        net.layers.remove(cast)
        net.layers.insert(0, cast)
        cast.precision = precision
        for layer, i in uses:
            layer.set_input(i, cast.outputs[0])
    # outputs: back to the declared float32
    for k, t in enumerate(list(net.outputs)):
        if t.dtype == "float32" and not (t.producer is not None and (t.producer.kind == "Cast"
                                                                      or id(t.producer) in keep)):
            name = t.name
            net.rename(t, net.unique_name(name + f"_{low}"))
            cast = net.add_layer("Cast", [t], {"to": "float32"}, name=net.unique_name(f"{name}/to_float32"),
                                 output_names=[name], output_dtypes=["float32"])
            cast.precision = "fp32"
            net.outputs[k] = cast.outputs[0]
    for g in nets:
        _run_in_fp32(g, [layer for layer in g.layers if id(layer) in keep], low, precision, hosts | keep)
    # plugins that cannot take the low precision run in FP32 between casts
    for g in nets:
        for layer in [layer for layer in g.layers if layer.kind == "Plugin"]:
            _plugin_in_fp32(g, layer, low)


def _networks(net: Network) -> list[Network]:
    """``net`` and every subgraph (If branches, Loop/Scan bodies) nested in it, outermost first."""
    found = [net]
    for g in found:
        found.extend(sub for layer in g.layers for sub in subgraphs(layer))
    return found


# layers whose float output type is an attribute ("to"), and the attribute's default
TYPED_OUTPUT = {"Cast": None, "DequantizeLinear": None, "Window": "float32", "MelWeightMatrix": "float32"}


def _narrow(g: Network, low: str, fp32: set[int], top: bool) -> None:
    """In one network ``g``, for its low-precision layers: float32 constants they read become ``low``
    constants (one per constant), and a float32 output type set by an attribute becomes ``low`` (not for
    the top network's outputs, which keep their declared type)."""
    low_np = np_dtype(low)
    narrowed: dict[int, object] = {}
    for layer in list(g.layers):
        if id(layer) in fp32:
            continue
        host_pos = set(LAYER_KINDS[layer.kind].host_inputs)
        for i, t in enumerate(list(layer.inputs)):
            if t is None or i in host_pos or not t.is_constant or t.dtype != "float32":
                continue
            c = narrowed.get(id(t))
            if c is None:
                c = narrowed[id(t)] = g.add_constant(saturate(t.value, low_np),
                                                     name=g.unique_name(t.name + "_" + low))
            layer.set_input(i, c)
        if layer.kind in TYPED_OUTPUT and layer.attrs.get("to", TYPED_OUTPUT[layer.kind]) == "float32" \
                and not (top and layer.outputs[0] in g.outputs):
            layer.attrs["to"] = low
            layer.outputs[0].dtype = low
        if layer.kind == "ConstantOfShape":
            v = np.asarray(layer.attrs.get("value", np.zeros(1, np.float32)))
            if v.dtype == np.float32:
                layer.attrs["value"] = saturate(v, low_np)
                layer.outputs[0].dtype = low


def _plugin_in_fp32(net: Network, layer, low: str) -> None:
    """A plugin that cannot take ``low`` on some input runs in FP32 between casts."""
    plugin = layer.attrs["plugin"]
    n_in = len(layer.inputs)
    if all(t is None or t.dtype != low or plugin.supports(i, TensorDesc(tuple(t.shape or ()), low), n_in)
           for i, t in enumerate(layer.inputs)):
        return
    layer.precision = "fp32"
    for i, t in enumerate(list(layer.inputs)):
        if t is not None and t.dtype == low:
            layer.set_input(i, _cast_at(net, t, "float32", f"{layer.name}/in{i}_fp32", layer).outputs[0])
    for o in list(layer.outputs):
        if o.dtype == "float32" and o.uses:
            uses = list(o.uses)
            c = _cast_at(net, o, low, f"{layer.name}/out_{low}", layer, after=True)
            for ul, ui in uses:
                ul.set_input(ui, c.outputs[0])


def _cast_at(net: Network, t, to: str, name: str, layer, after: bool = False, precision: str | None = None):
    """A Cast of ``t`` to ``to``, placed right before (or after) ``layer`` in the layer order."""
    c = net.add_layer("Cast", [t], {"to": to}, name=net.unique_name(name), output_dtypes=[to])
    if precision is not None:
        c.precision = precision
    net.layers.remove(c)
    net.layers.insert(net.layers.index(layer) + int(after), c)
    return c


def _run_in_fp32(net: Network, layers, low: str, precision: str, fp32: set[int]) -> None:
    """Casts around user-constrained FP32 layers: a float input made by a low-precision layer is cast
    up once per tensor; each float output read by low-precision layers is cast down once."""
    up: dict[int, object] = {}
    for layer in layers:
        for i, t in enumerate(list(layer.inputs)):
            if t is None or t.is_constant or t.dtype not in FLOATS or (t in net.inputs and t.dtype == "float32") \
                    or (t.producer is not None and id(t.producer) in fp32):
                continue
            c = up.get(id(t))
            if c is None:
                c = up[id(t)] = _cast_at(net, t, "float32", f"{t.name}/to_float32", layer, precision="fp32")
            layer.set_input(i, c.outputs[0])
        for o in list(layer.outputs):
            uses = [(u, i) for u, i in o.uses if id(u) not in fp32 and u.kind != "Cast"]
            if o.dtype not in FLOATS or not uses:
                continue
            c = _cast_at(net, o, low, f"{o.name}/to_{low}", layer, after=True, precision=precision)
            for u, i in uses:
                u.set_input(i, c.outputs[0])


def absorb_input_casts(net: Network) -> None:
    """On the GPU, a stem convolution reads the FP32 network input itself and converts as it loads
    (kernels/conv_stem.py): the separate cast would write and re-read the whole input. Applies to an
    input's cast whose every reader is such a convolution (other tactics convert first)."""
    from kiln.passes.fuse_stem_pool import is_stem
    for cast in list(net.layers):
        if cast.kind != "Cast" or cast.inputs[0] not in net.inputs or cast.inputs[0].dtype != "float32":
            continue
        y = cast.outputs[0]
        if y in net.outputs or not y.uses or not all(
                layer.kind == "Convolution" and i == 0 and is_stem(layer) for layer, i in y.uses):
            continue
        for layer, i in list(y.uses):
            layer.set_input(i, cast.inputs[0])
        net.remove_layer(cast)          # nothing reads it now, and it reads a network input
