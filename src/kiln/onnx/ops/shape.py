"""Reshaping, slicing, gathering, scattering, casting and tensor creation."""
from __future__ import annotations

import numpy as np

from kiln.errors import ParseError
from kiln.onnx.ops._common import const_value
from kiln.onnx.parser import onnx_dtype
from kiln.onnx.registry import converter

_SHUFFLE = {"first_transpose": None, "reshape": None, "second_transpose": None, "allowzero": False}


@converter("Reshape", since=1)
def reshape_v1(ctx, node):
    return ctx.add1("Shuffle", [node.input(0)], dict(_SHUFFLE, reshape=list(node.attr("shape"))))


@converter("Reshape", since=5)
def reshape(ctx, node):
    x, shape = node.input(0), node.input(1)
    allowzero = bool(node.attr("allowzero", 0))
    v = const_value(shape)
    if v is not None:
        return ctx.add1("Shuffle", [x], dict(_SHUFFLE, reshape=[int(d) for d in v.reshape(-1)], allowzero=allowzero))
    return ctx.add1("Shuffle", [x, shape], dict(_SHUFFLE, allowzero=allowzero))


@converter("Transpose", since=1)
def transpose(ctx, node):
    x = node.input(0)
    perm = node.attr("perm")
    if perm is None:
        if x.rank is None:       # rank known only at run time: the kernel reverses whatever it gets
            return ctx.add1("Shuffle", [x], dict(_SHUFFLE, first_transpose="reverse"), dtype=x.dtype)
        perm = list(reversed(range(x.rank)))
    return ctx.add1("Shuffle", [x], dict(_SHUFFLE, first_transpose=list(perm)))


@converter("Flatten", since=1)
def flatten(ctx, node):
    return ctx.add1("Flatten", [node.input(0)], {"axis": node.attr("axis", 1)})


@converter("Squeeze", since=1)
def squeeze_v1(ctx, node):
    return ctx.add1("Squeeze", [node.input(0)], {"axes": node.attr("axes")})


@converter("Squeeze", since=13)
def squeeze(ctx, node):
    v = const_value(node.input(1))
    if node.input(1) is None:
        return ctx.add1("Squeeze", [node.input(0)], {"axes": None})
    if v is not None:
        return ctx.add1("Squeeze", [node.input(0)], {"axes": [int(a) for a in v.reshape(-1)]})
    return ctx.add1("Squeeze", [node.input(0), node.input(1)], {"axes": None})


@converter("Unsqueeze", since=1)
def unsqueeze_v1(ctx, node):
    return ctx.add1("Unsqueeze", [node.input(0)], {"axes": list(node.attr("axes"))})


@converter("Unsqueeze", since=13)
def unsqueeze(ctx, node):
    v = const_value(node.input(1))
    if v is not None:
        return ctx.add1("Unsqueeze", [node.input(0)], {"axes": [int(a) for a in v.reshape(-1)]})
    return ctx.add1("Unsqueeze", [node.input(0), node.input(1)], {"axes": None})


@converter("Concat", since=1)
def concat(ctx, node):
    return ctx.add1("Concatenation", [t for t in node.inputs if t is not None], {"axis": node.attr("axis", 1)})


@converter("Split", since=1)
def split(ctx, node):
    x = node.input(0)
    sizes = node.attr("split")
    extra = []
    if node.input(1) is not None:
        v = const_value(node.input(1))
        if v is not None:
            sizes = [int(s) for s in v.reshape(-1)]
        else:
            extra = [node.input(1)]
    n = node.num_outputs
    return ctx.add("Split", [x] + extra, {"axis": node.attr("axis", 0), "split": list(sizes) if sizes else None,
                                          "num_outputs": n}, num_outputs=n,
                   output_dtypes=[x.dtype] * n).outputs


@converter("Slice", since=1)
def slice_v1(ctx, node):
    starts, ends = node.attr("starts"), node.attr("ends")
    axes = node.attr("axes") or list(range(len(starts)))
    return ctx.add1("Slice", [node.input(0), ctx.const(np.asarray(starts, np.int64)),
                              ctx.const(np.asarray(ends, np.int64)), ctx.const(np.asarray(axes, np.int64))])


@converter("Slice", since=10)
def slice_v10(ctx, node):
    return ctx.add1("Slice", list(node.inputs[:5]))


@converter("Gather", since=1)
def gather(ctx, node):
    return ctx.add1("Gather", [node.input(0), node.input(1)], {"axis": node.attr("axis", 0)})


@converter("GatherElements", since=11)
def gather_elements(ctx, node):
    return ctx.add1("GatherElements", [node.input(0), node.input(1)], {"axis": node.attr("axis", 0)})


@converter("GatherND", since=11)
def gather_nd(ctx, node):
    return ctx.add1("GatherND", [node.input(0), node.input(1)], {"batch_dims": node.attr("batch_dims", 0)})


@converter("ScatterND", since=11)
def scatter_nd(ctx, node):
    return ctx.add1("ScatterND", list(node.inputs[:3]), {"reduction": node.attr("reduction", "none")})


@converter("ScatterElements", since=11)
def scatter_elements(ctx, node):
    return ctx.add1("ScatterElements", list(node.inputs[:3]), {"axis": node.attr("axis", 0),
                                                               "reduction": node.attr("reduction", "none")})


converter("Scatter", since=9)(scatter_elements)


@converter("Shape", since=1)
def shape(ctx, node):
    return ctx.add1("Shape", [node.input(0)], {"start": node.attr("start", 0), "end": node.attr("end")}, dtype="int64")


@converter("Size", since=1)
def size(ctx, node):
    return ctx.add1("Size", [node.input(0)], {}, dtype="int64")


@converter("Expand", since=8)
def expand(ctx, node):
    return ctx.add1("Expand", [node.input(0), node.input(1)])


@converter("Tile", since=6)
def tile(ctx, node):
    return ctx.add1("Tile", [node.input(0), node.input(1)])


@converter("ConstantOfShape", since=9)
def constant_of_shape(ctx, node):
    value = node.attr("value")
    if value is None:
        value = np.zeros(1, np.float32)
    return ctx.add1("ConstantOfShape", [node.input(0)], {"value": np.asarray(value)}, dtype=_dt(np.asarray(value)))


def _dt(arr):
    from kiln.ir.dtypes import dtype_name
    return dtype_name(arr.dtype)


@converter("Constant", since=1)
def constant(ctx, node):
    a = node.attrs
    if "value" in a:
        v = np.asarray(a["value"])
    elif "value_float" in a:
        v = np.asarray(a["value_float"], np.float32)
    elif "value_floats" in a:
        v = np.asarray(a["value_floats"], np.float32)
    elif "value_int" in a:
        v = np.asarray(a["value_int"], np.int64)
    elif "value_ints" in a:
        v = np.asarray(a["value_ints"], np.int64)
    elif "value_string" in a:
        v = np.asarray(a["value_string"], object)
    elif "value_strings" in a:
        v = np.asarray(a["value_strings"], object)
    elif "sparse_value" in a:
        v = np.asarray(a["sparse_value"])
    else:
        raise ParseError(f"Node {node.name!r} (Constant) has no value attribute.")
    return ctx.net.add_constant(v, name=ctx.net.unique_name(node.output_names[0] or node.name))


@converter("Range", since=11)
def range_(ctx, node):
    return ctx.add1("Range", list(node.inputs[:3]), dtype=node.input(0).dtype)


@converter("Cast", since=1)
def cast(ctx, node):
    to = node.attr("to")
    to = onnx_dtype(to, f"Node {node.name!r} (Cast) ") if isinstance(to, int) else {
        "FLOAT": "float32", "FLOAT16": "float16", "DOUBLE": "float64", "INT64": "int64", "INT32": "int32",
        "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}.get(str(to).upper(), str(to).lower())
    return ctx.add1("Cast", [node.input(0)], {"to": to, "saturate": node.attr("saturate", 1),
                                              "round_mode": node.attr("round_mode", "up")}, dtype=to)


@converter("CastLike", since=15)
def cast_like(ctx, node):
    to = node.input(1).dtype
    return ctx.add1("Cast", [node.input(0)], {"to": to, "saturate": node.attr("saturate", 1),
                                              "round_mode": node.attr("round_mode", "up")}, dtype=to)


@converter("Identity", since=1)
def identity(ctx, node):
    return ctx.add1("Identity", [node.input(0)], dtype=node.input(0).dtype)


@converter("Dropout", since=1)
def dropout(ctx, node):
    x = node.input(0)
    y = ctx.add1("Identity", [x], dtype=x.dtype)
    if node.num_outputs > 1 and node.output_names[1]:
        shape = ctx.add1("Shape", [x], {"start": 0, "end": None}, dtype="int64")
        mask = ctx.add1("ConstantOfShape", [shape], {"value": np.ones(1, np.bool_)}, dtype="bool")
        return [y, mask]
    return [y]


@converter("DepthToSpace", since=1)
def depth_to_space(ctx, node):
    return ctx.add1("DepthToSpace", [node.input(0)], {"blocksize": node.attr("blocksize"),
                                                      "mode": node.attr("mode", "DCR")})


@converter("SpaceToDepth", since=1)
def space_to_depth(ctx, node):
    return ctx.add1("SpaceToDepth", [node.input(0)], {"blocksize": node.attr("blocksize"),
                                                      "mode": node.attr("mode", "DCR")})


@converter("Trilu", since=14)
def trilu(ctx, node):
    return ctx.add1("Trilu", [node.input(0), node.input(1)], {"upper": node.attr("upper", 1)})


@converter("OneHot", since=9)
def one_hot(ctx, node):
    return ctx.add1("OneHot", list(node.inputs[:3]), {"axis": node.attr("axis", -1)}, dtype=node.input(2).dtype)


@converter("NonZero", since=9)
def non_zero(ctx, node):
    return ctx.add1("NonZero", [node.input(0)], dtype="int64")


_RESIZE_DEFAULTS = {"coordinate_transformation_mode": "half_pixel", "cubic_coeff_a": -0.75, "exclude_outside": 0,
                    "extrapolation_value": 0.0, "mode": "nearest", "nearest_mode": "round_prefer_floor",
                    "antialias": 0, "axes": None, "keep_aspect_ratio_policy": "stretch"}


def _resize_attrs(node, **over):
    attrs = {k: node.attr(k, v) for k, v in _RESIZE_DEFAULTS.items()}
    attrs.update(over)
    return attrs


@converter("Resize", since=10)
def resize_v10(ctx, node):
    mode = node.attr("mode", "nearest")
    return ctx.add1("Resize", [node.input(0), None, node.input(1), None],
                    _resize_attrs(node, coordinate_transformation_mode="asymmetric", nearest_mode="floor",
                                  mode="linear" if mode in ("linear", "bilinear") else mode))


@converter("Resize", since=11)
def resize(ctx, node):
    x, roi, scales, sizes = (node.inputs + [None] * 4)[:4]
    if scales is not None and scales.is_constant and scales.value.size == 0:
        scales = None
    if sizes is not None and sizes.is_constant and sizes.value.size == 0:
        sizes = None
    if roi is not None and roi.is_constant and roi.value.size == 0:
        roi = None
    return ctx.add1("Resize", [x, roi, scales, sizes], _resize_attrs(node))


@converter("Upsample", since=7)
def upsample(ctx, node):
    mode = node.attr("mode", "nearest")
    attrs = _resize_attrs(node, coordinate_transformation_mode="asymmetric", nearest_mode="floor",
                          mode="linear" if mode in ("linear", "bilinear") else mode)
    if node.input(1) is not None:
        return ctx.add1("Resize", [node.input(0), None, node.input(1), None], attrs)
    return ctx.add1("Resize", [node.input(0), None, ctx.const(np.asarray(node.attr("scales"), np.float32)), None],
                    attrs)
