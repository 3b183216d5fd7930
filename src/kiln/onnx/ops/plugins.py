"""Standard ONNX ops that Kiln implements as built-in plugins (kiln.plugins.builtin).

RoiAlign, GridSample, AffineGrid, NonMaxSuppression and DeformConv have their own
GPU kernels, so they are Plugin layers rather than vocabulary kinds. Each converter
makes the plugin layer through the parser's one plugin path (``plugin_layer``: the plugin's
``onnx_fields`` owns the version differences, e.g. RoiAlign's default mode at opset 16).
A converter is registered only for plugins whose module ships with this Kiln, so
``kiln check`` never promises an op it cannot build.
"""
from __future__ import annotations

import importlib.util

from kiln.errors import UnsupportedOperatorError
from kiln.onnx.registry import converter

# ONNX op → (built-in module, first opset, plugin name in the "kiln" namespace)
_PLUGIN_OPS = {
    "RoiAlign": ("roi_align", 10, "RoiAlign"),
    "GridSample": ("grid_sample", 16, "GridSample"),
    "AffineGrid": ("grid_sample", 20, "AffineGrid"),
    "NonMaxSuppression": ("nms", 10, "NonMaxSuppression"),
    "DeformConv": ("deform_conv", 19, "ModulatedDeformConv2d"),
}


def _plugin_converter(op: str, plugin_name: str):
    def convert(ctx, node):
        from kiln.onnx.parser import plugin_layer
        from kiln.plugins import load_builtins, registry
        load_builtins()
        cls = registry.find(plugin_name, "kiln")
        if cls is None:
            raise UnsupportedOperatorError(
                f"Node {node.name!r} ({op}, opset {ctx.opset}) needs Kiln's built-in plugin kiln::{plugin_name}, "
                f"which is not registered; reinstall Kiln or supply a plugin named {plugin_name!r}.")
        attrs, inputs = dict(node.attrs), list(node.inputs)
        if op == "AffineGrid" and len(inputs) > 1 and inputs[1] is not None:
            # the output shape follows the values of 'size': a known one becomes a plugin field
            size = _known_size(inputs[1])
            if size is not None:
                attrs["size"] = size
                inputs = inputs[:1]
        return plugin_layer(ctx, node, cls, ctx.opset, attrs, inputs)
    convert.__name__ = f"{op.lower()}_plugin"
    return convert


def _known_size(t) -> list[int] | None:
    """AffineGrid's 'size' (4 or 5 elements) when known at parse time: a constant, or the Shape
    of a tensor whose spatial dims are static (an exported ``affine_grid(theta, x.size())``).
    Only the spatial entries matter (the batch comes from theta): unknown N or C become -1."""
    if t.is_constant:
        return [int(v) for v in t.value.reshape(-1)]
    layer = t.producer
    if layer is None or layer.kind != "Shape" or layer.attrs.get("start", 0) != 0 or layer.attrs.get("end") is not None:
        return None
    shape = layer.inputs[0].shape
    if shape is None or len(shape) not in (4, 5) or not all(isinstance(d, int) for d in shape[2:]):
        return None
    return [d if isinstance(d, int) else -1 for d in shape]


def _ships(module: str) -> bool:
    return importlib.util.find_spec(f"kiln.plugins.builtin.{module}") is not None


for _op, (_module, _since, _name) in _PLUGIN_OPS.items():
    if _ships(_module):
        converter(_op, since=_since)(_plugin_converter(_op, _name))
