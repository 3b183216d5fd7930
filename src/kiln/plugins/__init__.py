"""Custom layers written in Python: the contract, the registry, the built-ins."""
from __future__ import annotations

from kiln.plugins.base import Field, Plugin, TensorDesc, describe_fields, field
from kiln.plugins.registry import ENTRY_POINT_GROUP, PluginRegistry, load, register, registry

__all__ = ["Field", "Plugin", "PluginRegistry", "TensorDesc", "describe_fields", "field", "load", "register",
           "registry", "ENTRY_POINT_GROUP", "load_builtins"]

def load_builtins() -> None:
    """Register Kiln's built-in plugins (RoiAlign, GridSample, AffineGrid, NMS, DCNv2)."""
    from kiln._discovery import import_submodules
    import_submodules("kiln.plugins.builtin")
