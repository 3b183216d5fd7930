"""The numeric, stateless corner of the ai.onnx.ml domain: Binarizer and ArrayFeatureExtractor.

String-keyed ops (LabelEncoder on strings) and model ops (TreeEnsemble, SVM, ...) are not
an inference-engine's tensors; they stay unsupported and ``kiln check`` lists them.
"""
from __future__ import annotations

from kiln.onnx.registry import converter

ML = "ai.onnx.ml"


@converter("Binarizer", since=1, domain=ML)
def binarizer(ctx, node):
    x = node.input(0)
    above = ctx.add1("ElementWise", [x, ctx.const(node.attr("threshold", 0.0), x.dtype)], {"op": "greater"},
                     dtype="bool")
    return ctx.add1("Cast", [above], {"to": x.dtype, "saturate": 1}, dtype=x.dtype)


@converter("ArrayFeatureExtractor", since=1, domain=ML)
def array_feature_extractor(ctx, node):
    """Select entries of the last axis by index (a 1-D input counts as one row)."""
    x, idx = node.input(0), node.input(1)
    if x.rank == 1:
        x = ctx.add1("Unsqueeze", [x], {"axes": [0]}, dtype=x.dtype)
    flat = ctx.add1("Shuffle", [idx], {"first_transpose": None, "reshape": [-1], "second_transpose": None,
                                       "allowzero": False}, dtype=idx.dtype)
    return ctx.add1("Gather", [x, flat], {"axis": -1}, dtype=x.dtype)
