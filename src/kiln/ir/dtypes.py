"""Data types by their numpy names; the one vocabulary shared by every part."""
from __future__ import annotations

import numpy as np

from kiln.errors import NetworkError

FLOAT_TYPES = ("float32", "float16", "bfloat16", "float64")
INT_TYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")
# Narrow ONNX types (ml_dtypes names). Inside engines float8 types are torch's own; the sub-byte integer
# types travel as int8/uint8 holding their values and float4_e2m1fn as float32 holding its values.
NARROW_TYPES = ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
                "int4", "uint4", "int2", "uint2", "float4_e2m1fn")
ALL_TYPES = FLOAT_TYPES + INT_TYPES + ("bool", "complex64", "complex128", "string") + NARROW_TYPES
# What an engine computes in: a build's precision, and a layer's (``fp16 (fp32 accum)`` for layers whose
# statistics stay in FP32 in a low-precision build).
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
LAYER_PRECISIONS = PRECISIONS + tuple(f"{p} (fp32 accum)" for p in PRECISIONS if p != "fp32")


def np_dtype(name: str) -> np.dtype:
    """numpy dtype for a Kiln dtype name (bfloat16 through ml_dtypes)."""
    if name == "bfloat16" or name in NARROW_TYPES:
        import ml_dtypes
        return np.dtype(getattr(ml_dtypes, name))
    if name == "string":
        return np.dtype(object)
    try:
        return np.dtype(name)
    except TypeError:
        raise NetworkError(f"Unknown data type {name!r}; use one of {', '.join(ALL_TYPES)}.") from None


def dtype_name(dt) -> str:
    """Kiln dtype name for a numpy dtype, torch dtype or name."""
    if isinstance(dt, str):
        if dt in ALL_TYPES or is_container(dt):
            return dt
    s = str(dt)
    if s.startswith("torch."):
        s = s[6:]
        return {"bool": "bool", "float": "float32", "half": "float16", "double": "float64",
                "long": "int64", "int": "int32", "short": "int16"}.get(s, s)
    if s == "bfloat16":
        return "bfloat16"
    if s == "object" or s.startswith("<U") or s.startswith("|S") or s.startswith("<S"):
        return "string"
    return np.dtype(dt).name


def is_float(name: str) -> bool:
    return name in FLOAT_TYPES


def is_container(name: str) -> bool:
    """True for ONNX sequence/optional value types, written ``sequence(float32)``, ``optional(sequence(int64))``.

    They flow through the runtime as Python lists of tensors (sequences) or None (empty optionals).
    """
    return isinstance(name, str) and name.startswith(("sequence(", "optional(")) and name.endswith(")")


def is_type_name(name: object, strings: bool = True) -> bool:
    """True for a name of the closed type table: one of ALL_TYPES, or sequences/optionals of one.

    ``strings=False`` also refuses string tensors (engines take and return numeric tensors only).
    """
    while is_container(name):
        name = element_type(name)
    return isinstance(name, str) and name in ALL_TYPES and (strings or name != "string")


def element_type(name: str) -> str:
    """The type inside one level of ``sequence(...)``/``optional(...)``; a tensor type is its own element."""
    return name[name.index("(") + 1:-1] if is_container(name) else name
