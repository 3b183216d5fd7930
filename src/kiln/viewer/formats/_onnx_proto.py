"""ONNX's messages as the viewer reads them: :mod:`kiln.onnx.proto` (the ONNX parser reads models with it too)."""
from __future__ import annotations

from kiln.onnx.proto import *  # noqa: F401,F403
from kiln.onnx.proto import DTYPES as _DTYPES  # noqa: F401  (the viewer's name for the element-type table)
