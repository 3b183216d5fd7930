"""Kiln: bake trained models into fast, device-specific inference engines.

    network = kiln.onnx.parse("model.onnx")
    engine = kiln.build(network, kiln.BuildConfig(precision="fp16", device="cuda"))
    engine.save("model.kiln")
    outputs = kiln.load("model.kiln").context().run({"input": batch})

Names are imported on first use, so ``import kiln`` (and ``kiln --help``) stays
instant; torch loads only when something needs it.
"""
from __future__ import annotations

import importlib
import os
import sys

__version__ = "0.1.0"

# CPU engines share the machine: torch's OpenMP worker threads sleep between parallel regions
# instead of spinning, which on a loaded machine stalls every region behind spinning threads (see
# docs/cpu.md). OpenMP reads this once, when torch loads; a value the user set is kept.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_LAZY = {
    "BuildConfig": ("kiln.builder", "BuildConfig"), "Profile": ("kiln.builder", "Profile"),
    "build": ("kiln.builder", "build"), "load": ("kiln.runtime", "load"),
    "Engine": ("kiln.runtime", "Engine"), "ExecutionContext": ("kiln.runtime", "ExecutionContext"),
    "Network": ("kiln.ir", "Network"), "Layer": ("kiln.ir", "Layer"), "Tensor": ("kiln.ir", "Tensor"),
    "Plugin": ("kiln.plugins", "Plugin"), "TensorDesc": ("kiln.plugins", "TensorDesc"),
    "field": ("kiln.plugins", "field"), "register": ("kiln.plugins", "register"),
    "KilnError": ("kiln.errors", "KilnError"), "errors": ("kiln.errors", None),
    "onnx": ("kiln.onnx", None), "view": ("kiln.viewer", "view"),
    "compare": ("kiln.comparison", "compare"), "CompareResult": ("kiln.comparison", "CompareResult"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    spec = _LAZY.get(name)
    if spec is None:
        raise AttributeError(f"module 'kiln' has no attribute {name!r}")
    module = importlib.import_module(spec[0])
    value = module if spec[1] is None else getattr(module, spec[1])
    globals()[name] = value
    return value


def __dir__():
    return __all__
