"""Small helpers shared by kernel modules."""
from __future__ import annotations

import torch

TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "bool": torch.bool, "complex64": torch.complex64, "complex128": torch.complex128,
    "uint16": getattr(torch, "uint16", None), "uint32": getattr(torch, "uint32", None),
    "uint64": getattr(torch, "uint64", None),
}


def torch_dtype(name: str) -> torch.dtype:
    dt = TORCH_DTYPES.get(name)
    if dt is None:
        from kiln.errors import BuildError
        raise BuildError(f"Data type {name!r} has no torch equivalent on this build.")
    return dt


def ints(t) -> list[int]:
    """A host tensor (or list) of integers as a Python list."""
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def is_float(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point
