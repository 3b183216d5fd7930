"""Kiln: bake trained models into fast, device-specific inference engines.

    network = kiln.onnx.parse("model.onnx")
    engine = kiln.build(network, kiln.BuildConfig(precision="fp16", device="cuda"))
    engine.save("model.kiln")
    outputs = kiln.load("model.kiln").context().run({"input": batch})
"""
from __future__ import annotations

__version__ = "0.1.0"

from kiln import errors
from kiln.builder import BuildConfig, Profile, build
from kiln.engine import load
from kiln.errors import KilnError
from kiln.ir import Layer, Network, Tensor
from kiln.plugins import Plugin, TensorDesc, field, register

__all__ = ["BuildConfig", "KilnError", "Layer", "Network", "Plugin", "Profile", "Tensor", "TensorDesc", "build",
           "errors", "field", "load", "onnx", "register", "view", "__version__"]


def __getattr__(name: str):
    if name == "onnx":
        import importlib
        return importlib.import_module("kiln.onnx")
    if name == "view":
        from kiln.viewer import view
        return view
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
