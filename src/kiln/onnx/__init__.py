"""ONNX front end: parse models into Networks; the converter registry; support checks."""
from __future__ import annotations

from kiln.onnx.parser import parse
from kiln.onnx.registry import converter, lookup, supported_ops

__all__ = ["parse", "converter", "lookup", "supported_ops", "check"]


def check(model, plugins=()):
    """List every node Kiln cannot map (name, op, domain, opset), without building."""
    from kiln.onnx.support import check as _check   # not kiln.onnx.check: that name is this function
    return _check(model, plugins=plugins)
