"""Small helpers the kernel modules share: weight caches, axes, host integers.

Data type conversions live in kiln.ir.dtypes.
"""
from __future__ import annotations

import torch


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
