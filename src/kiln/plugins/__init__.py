"""Custom layers written in Python: the contract, the registry, the built-ins."""
from __future__ import annotations

from kiln.plugins.base import Field, Plugin, TensorDesc, describe_fields, field
from kiln.plugins.registry import ENTRY_POINT_GROUP, PluginRegistry, load, register, registry

__all__ = ["Field", "Plugin", "PluginRegistry", "TensorDesc", "describe_fields", "field", "load", "register",
           "registry", "ENTRY_POINT_GROUP", "load_builtins"]

_builtins_loaded = False


def load_builtins() -> None:
    """Register Kiln's built-in plugins (RoiAlign, GridSample, AffineGrid, NMS, DCNv2)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    import importlib
    import pkgutil

    from kiln.plugins import builtin
    for info in pkgutil.iter_modules(builtin.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{builtin.__name__}.{info.name}")
