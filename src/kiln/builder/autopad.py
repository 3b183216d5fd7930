"""auto_pad SAME on Convolution and Pooling layers, turned into explicit pads once sizes are known.

The parser keeps ``auto_pad`` (SAME_UPPER / SAME_LOWER) on a layer whose input size it does not
know (exporters write dynamic dims; only network inputs have shapes at parse time). Shape inference
pads such a layer for whatever size it meets (``padded_attrs``), and ``resolve`` then writes the
pads into the layer, per spatial axis: from the input's static size, or, at a stride of 1, from the
kernel alone (the same for every size). An axis left dynamic by the profile under a larger stride
has no single padding, and the build stops with one line naming the layer and the input dims to fix.
Pads follow ONNX Runtime (``kiln.ir.api.same_pads``).
"""
from __future__ import annotations

from typing import Any

from kiln.builder.memory import layer_error
from kiln.ir.api import same_pads
from kiln.ir.network import Layer, Network, subgraphs

KINDS = ("Convolution", "Pooling")


def _window(layer: Layer, kernel: list[int]) -> tuple[list[int], list[int]]:
    nd = len(kernel)
    return list(layer.attrs.get("stride") or [1] * nd), list(layer.attrs.get("dilation") or [1] * nd)


def _kernel(layer: Layer, weight_shape: Any) -> list[int] | None:
    if layer.kind == "Pooling":
        return list(layer.attrs["kernel"]) if layer.attrs.get("kernel") else None
    if weight_shape is None or not all(isinstance(d, int) for d in weight_shape[2:]):
        return None
    return [int(d) for d in weight_shape[2:]]


def padded_attrs(layer: Layer, args: list) -> dict[str, Any]:
    """The layer's attrs with SAME pads for the input sizes in ``args`` (tensors), for running it once."""
    mode = layer.attrs.get("auto_pad")
    if not mode or layer.kind not in KINDS or not args or not hasattr(args[0], "dim"):
        return layer.attrs
    kernel = _kernel(layer, tuple(args[1].shape) if layer.kind == "Convolution" and len(args) > 1 else None)
    if kernel is None or args[0].dim() != len(kernel) + 2:
        return layer.attrs
    stride, dilation = _window(layer, kernel)
    attrs = {k: v for k, v in layer.attrs.items() if k != "auto_pad"}
    attrs["pads"] = same_pads(mode, [int(d) for d in args[0].shape[2:]], kernel, stride, dilation)
    return attrs


def resolve(net: Network, where: str = "") -> None:
    """Write explicit pads into every layer with auto_pad SAME (subgraphs included), using the shapes
    shape inference gave; refuse a layer whose padding depends on a size the profile leaves open."""
    for layer in net.layers:
        for g in subgraphs(layer):
            resolve(g, f"{where}{layer.name}/")
        mode = layer.attrs.get("auto_pad")
        if not mode or layer.kind not in KINDS:
            continue
        x = layer.inputs[0]
        w = layer.inputs[1] if layer.kind == "Convolution" else None
        kernel = _kernel(layer, w.shape if w is not None else None)
        if kernel is None:
            raise layer_error(layer, f"Layer {layer.name!r} ({layer.kind}) uses auto_pad={mode} but its kernel size is "
                                     f"not known at build time; give the weight a static shape.")
        stride, dilation = _window(layer, kernel)
        spatial = list(x.shape[2:]) if x.shape is not None and len(x.shape) == len(kernel) + 2 else [None] * len(kernel)
        sizes = [d if isinstance(d, int) else None for d in spatial]
        open_axes = [i for i, (d, s) in enumerate(zip(sizes, stride)) if d is None and s != 1]
        if open_axes:
            raise layer_error(layer, _unresolved(net, layer, mode, stride, spatial, open_axes, where))
        layer.attrs["pads"] = same_pads(mode, sizes, kernel, stride, dilation)
        del layer.attrs["auto_pad"]


def _unresolved(net: Network, layer: Layer, mode: str, stride: list[int], spatial: list, axes: list[int],
                where: str) -> str:
    node = f", ONNX node {layer.origin[0]!r}" if layer.origin and layer.origin[0] != layer.name else ""
    shown = "[" + ", ".join("?" if d is None else str(d) for d in spatial) + "]"
    symbols = {d for i, d in enumerate(spatial) if i in axes and isinstance(d, str)}
    dims = []
    root = net
    while root.outer is not None:
        root = root.outer
    for t in root.inputs:
        hit = [i for i, d in enumerate(t.shape or ()) if not isinstance(d, int) and (not symbols or d in symbols)]
        if hit:
            dims.append(f"{t.name!r} dim{'s' if len(hit) > 1 else ''} {', '.join(map(str, hit))}")
    fix = (f"fix {' and '.join(dims)} to one size in the profile (min = max)" if dims
           else "give the inputs static shapes in the profile (min = max)")
    return (f"Layer {where}{layer.name!r} ({layer.kind}{node}) uses auto_pad={mode} with stride "
            f"{[stride[i] for i in axes]} on spatial axes {axes} whose sizes the profile leaves open (input spatial "
            f"dims {shown}); its padding depends on them: {fix}, or export the model with explicit pads.")
