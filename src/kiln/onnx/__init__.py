"""ONNX front end: parse models into Networks; the converter registry; support checks."""
from __future__ import annotations

from typing import Any

__all__ = ["parse", "converter", "lookup", "supported_ops", "check"]


def __getattr__(name: str) -> Any:
    # the parser and the registry load on first use: kiln.onnx.proto (the viewer's ONNX reader too) needs neither
    if name == "parse":
        from kiln.onnx.parser import parse
        return parse
    if name in ("converter", "lookup", "supported_ops"):
        from kiln.onnx import registry
        return getattr(registry, name)
    raise AttributeError(f"module 'kiln.onnx' has no attribute {name!r}")


def check(model, plugins=(), fallback=None, shapes=None, device="cpu"):
    """List every node Kiln cannot map (name, op, domain, opset), without building; with
    ``fallback="onnxruntime"``, whether each would run in ONNX Runtime instead; with ``shapes`` (a
    build profile) or static inputs, also what a build at those shapes would refuse."""
    # kiln.onnx.check (the module, callable like this function) adds a reason to each of
    # kiln.onnx.support's findings; importing it rebinds this name to the module, which is fine
    from kiln.onnx.check import check as _check
    return _check(model, plugins=plugins, fallback=fallback, shapes=shapes, device=device)
