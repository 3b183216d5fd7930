"""What every `kiln` command is built from: the Tool base and registry, the shared argument groups and
argument checks, engine-input helpers and the progress bar."""
from __future__ import annotations

from kiln.cli.base.groups import (ArgGroup, Device, Fallback, Fp32Layers, Inputs, Json, Plugins, Precision,
                                  Quantize, Shapes, Threads)
from kiln.cli.base.tool import MissingTool, Tool, register

__all__ = ["ArgGroup", "Device", "Fallback", "Fp32Layers", "Inputs", "Json", "MissingTool", "Plugins", "Precision",
           "Quantize", "Shapes", "Threads", "Tool", "register"]
