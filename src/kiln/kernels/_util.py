"""Small helpers shared by kernel modules."""
from __future__ import annotations

import torch

TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "bool": torch.bool, "complex64": torch.complex64, "complex128": torch.complex128,
    "uint16": getattr(torch, "uint16", None), "uint32": getattr(torch, "uint32", None),
    "uint64": getattr(torch, "uint64", None),
    # narrow ONNX types: float8 natively; sub-byte types by value in the smallest torch type that holds them
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e4m3fnuz": torch.float8_e4m3fnuz,
    "float8_e5m2": torch.float8_e5m2, "float8_e5m2fnuz": torch.float8_e5m2fnuz,
    "float8_e8m0fnu": getattr(torch, "float8_e8m0fnu", None),
    "int4": torch.int8, "int2": torch.int8, "uint4": torch.uint8, "uint2": torch.uint8, "float4_e2m1fn": torch.float32,
}


def per_tensor(cache: dict, key: torch.Tensor, make):
    """``make()`` once per tensor object (a layer's constant weight, passed again on every call):
    cached by id, with the tensor kept and checked by identity so a recycled id cannot hit."""
    hit = cache.get(id(key))
    if hit is None or hit[0] is not key:
        hit = cache[id(key)] = (key, make())
    return hit[1]


def zero_bias(cache: dict, w: torch.Tensor) -> torch.Tensor:
    """A zero bias of ``w``'s output channels, dtype and device, made once per weight: for the
    convolution kernels that always add one, on layers that have none."""
    return per_tensor(cache, w, lambda: torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))


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


def from_numpy(arr) -> torch.Tensor:
    """A numpy array as the torch tensor Kiln computes with: bfloat16 and float8 through their bits,
    sub-byte integer and float4 types by value (see kiln.ir.dtypes.NARROW_TYPES); 0-d stays 0-d."""
    import numpy as np
    name = arr.dtype.name
    if name == "bfloat16" or name.startswith("float8"):
        bits = np.require(arr, requirements="C").view(np.int16 if name == "bfloat16" else np.uint8)
        return torch.from_numpy(bits.copy()).view(torch_dtype(name))
    if name in ("int4", "int2", "uint4", "uint2", "float4_e2m1fn"):
        return torch.from_numpy(arr.astype(str(torch_dtype(name)).replace("torch.", "")))
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)


def to_numpy(t: torch.Tensor):
    """The inverse of ``from_numpy`` for torch dtypes numpy lacks (bfloat16, float8)."""
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).replace("torch.", "")
    if name == "bfloat16" or name.startswith("float8"):
        import ml_dtypes
        return t.view(torch.int16 if name == "bfloat16" else torch.uint8).numpy().view(getattr(ml_dtypes, name))
    return t.numpy()
