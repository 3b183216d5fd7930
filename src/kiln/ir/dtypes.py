"""Data types by their numpy names; the one vocabulary shared by every part.

The torch conversions (``torch_dtype``, ``from_numpy``, ``to_numpy``) import torch when first
called: NOTE kiln.ir must not import torch when it is imported.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from kiln.errors import BuildError, NetworkError

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
# the 8-bit layers of passes/fold_qdq.py run at int8 or fp8
LAYER_PRECISIONS = PRECISIONS + tuple(f"{p} (fp32 accum)" for p in PRECISIONS if p != "fp32") + ("int8", "fp8")


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


# Sub-byte integer types and float4 travel by value in the smallest torch type that holds them.
_BY_VALUE = {"int4": "int8", "int2": "int8", "uint4": "uint8", "uint2": "uint8", "float4_e2m1fn": "float32"}
_TORCH: dict[str, Any] = {}


def _torch_types() -> dict[str, Any]:
    """Kiln type name → torch dtype (None where this torch lacks it), made on first use."""
    if not _TORCH:
        import torch
        for name in ALL_TYPES:
            if name != "string":
                _TORCH[name] = getattr(torch, _BY_VALUE.get(name, name), None)
    return _TORCH


def torch_dtype(name: str) -> Any:
    """The torch dtype Kiln computes ``name`` in (float8 natively, sub-byte types by value)."""
    dt = (_TORCH or _torch_types()).get(name)
    if dt is None:
        raise BuildError(f"Data type {name!r} has no torch equivalent on this build.")
    return dt


def from_numpy(arr: np.ndarray) -> Any:
    """A numpy array as the torch tensor Kiln computes with: bfloat16 and float8 through their bits,
    sub-byte integer and float4 types by value (see NARROW_TYPES); 0-d stays 0-d."""
    import torch
    name = arr.dtype.name
    if name == "bfloat16" or name.startswith("float8"):
        bits = np.require(arr, requirements="C").view(np.int16 if name == "bfloat16" else np.uint8)
        return torch.from_numpy(bits.copy()).view(torch_dtype(name))
    if name in _BY_VALUE:
        return torch.from_numpy(arr.astype(_BY_VALUE[name]))
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)


def to_numpy(t: Any) -> np.ndarray:
    """The inverse of ``from_numpy`` for torch dtypes numpy lacks (bfloat16, float8)."""
    import torch
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).replace("torch.", "")
    if name == "bfloat16" or name.startswith("float8"):
        import ml_dtypes
        return t.view(torch.int16 if name == "bfloat16" else torch.uint8).numpy().view(getattr(ml_dtypes, name))
    return t.numpy()
