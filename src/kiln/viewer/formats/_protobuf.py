"""The protobuf reader the viewer's formats use: :mod:`kiln.protobuf` (kiln.onnx reads ONNX files with it too)."""
from __future__ import annotations

from kiln.protobuf import *  # noqa: F401,F403
from kiln.protobuf import _varint  # noqa: F401
