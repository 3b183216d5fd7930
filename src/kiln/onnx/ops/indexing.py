"""Selection and small tensor utilities: Unique, Compress, ReverseSequence, TensorScatter,
EyeLike, CenterCropPad, BitCast, Col2Im, TfIdfVectorizer (integer tokens)."""
from __future__ import annotations

from kiln.onnx.parser import onnx_dtype
from kiln.onnx.registry import converter


@converter("Unique", since=11)
def unique(ctx, node):
    x = node.input(0)
    layer = ctx.add("Unique", [x], {"axis": node.attr("axis"), "sorted": node.attr("sorted", 1)}, num_outputs=4,
                    output_dtypes=[x.dtype, "int64", "int64", "int64"])
    return layer.outputs[:node.num_outputs]


@converter("Compress", since=9)
def compress(ctx, node):
    x = node.input(0)
    return ctx.add1("Compress", [x, node.input(1)], {"axis": node.attr("axis")}, dtype=x.dtype)


@converter("ReverseSequence", since=10)
def reverse_sequence(ctx, node):
    x = node.input(0)
    return ctx.add1("ReverseSequence", [x, node.input(1)], {"batch_axis": node.attr("batch_axis", 1),
                                                            "time_axis": node.attr("time_axis", 0)}, dtype=x.dtype)


@converter("TensorScatter", since=24)
def tensor_scatter(ctx, node):
    x = node.input(0)
    ins = [x, node.input(1)] + ([node.input(2)] if node.input(2) is not None else [])
    return ctx.add1("TensorScatter", ins, {"axis": node.attr("axis", -2), "mode": node.attr("mode", "linear")},
                    dtype=x.dtype)


@converter("EyeLike", since=9)
def eye_like(ctx, node):
    x = node.input(0)
    dt = node.attr("dtype")
    dtype = onnx_dtype(dt, f"Node {node.name!r} (EyeLike) ") if dt is not None else x.dtype
    return ctx.add1("EyeLike", [x], {"k": node.attr("k", 0)}, dtype=dtype)


@converter("CenterCropPad", since=18)
def center_crop_pad(ctx, node):
    x = node.input(0)
    return ctx.add1("CenterCropPad", [x, node.input(1)], {"axes": node.attr("axes")}, dtype=x.dtype)


@converter("BitCast", since=26)
def bit_cast(ctx, node):
    to = onnx_dtype(node.attr("to"), f"Node {node.name!r} (BitCast) ")
    return ctx.add1("BitCast", [node.input(0)], {"to": to}, dtype=to)


@converter("Col2Im", since=18)
def col2im(ctx, node):
    x = node.input(0)
    return ctx.add1("Col2Im", [x, node.input(1), node.input(2)],
                    {"dilations": node.attr("dilations"), "pads": node.attr("pads"), "strides": node.attr("strides")},
                    dtype=x.dtype)


@converter("TfIdfVectorizer", since=9)
def tfidf_vectorizer(ctx, node):
    if node.attr("pool_strings") is not None:
        from kiln.errors import ParseError
        raise ParseError(f"Node {node.name!r} (TfIdfVectorizer) uses a string pool; Kiln engines take numeric "
                         f"tensors only, so map tokens to ids before the model.")
    attrs = {k: node.attr(k) for k in ("pool_int64s", "ngram_counts", "ngram_indexes", "min_gram_length",
                                       "max_gram_length", "max_skip_count", "weights")}
    attrs["mode"] = node.attr("mode", "TF")
    return ctx.add1("TfIdfVectorizer", [node.input(0)], attrs, dtype="float32")
