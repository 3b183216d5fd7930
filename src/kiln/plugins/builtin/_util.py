"""Helpers the built-in plugins share: workspace carving, ONNX attribute decoding, Triton checks.

Not a plugin module (the leading underscore keeps ``load_builtins`` from importing it as one).
Plugin modules take ``triton``/``tl`` and the launch helpers from ``kiln.triton_support``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from kiln.errors import PluginError
from kiln.triton_support import HAS_TRITON, cdiv

ALIGN = 256  # bytes; every workspace slice starts on this boundary (cuBLAS/TMA friendly)


def require_triton(plugin: str) -> None:
    """Fail with a sentence, not an AttributeError deep in a launch, when Triton is missing."""
    if not HAS_TRITON:
        raise PluginError(f"Plugin {plugin!r} tactic 'triton' needs the triton package, which is not installed; "
                          f"install it (pip install 'kiln[triton]') or use the 'torch' tactic.")


def aligned(nbytes: int) -> int:
    return cdiv(nbytes, ALIGN) * ALIGN


def itemsize(dtype: str) -> int:
    return {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "float16": 2, "bfloat16": 2,
            "int16": 2, "int8": 1, "uint8": 1, "bool": 1}[dtype]


def concrete(plugin: str, shape: Sequence[Any], what: str) -> tuple[int, ...]:
    """Shape as ints, or a PluginError naming the symbolic dimension (workspace needs real sizes)."""
    if any(not isinstance(d, int) for d in shape):
        raise PluginError(f"Plugin {plugin!r} needs concrete {what} dimensions to size its workspace, got "
                          f"{tuple(shape)}; call workspace_size() with the profile's maximum shapes.")
    return tuple(int(d) for d in shape)


def workspace_bytes(parts: Sequence[tuple[int, int]]) -> int:
    """Total bytes for ``[(numel, itemsize), ...]`` carved in order with ALIGN padding."""
    return sum(aligned(n * s) for n, s in parts)


def carve(workspace: Any, parts: Sequence[tuple[Sequence[int], Any]], device: Any, plugin: str) -> list[Any]:
    """Typed views of the workspace, in order, each ALIGN-aligned.

    Without a big-enough workspace this allocates, which is fine eagerly but would break
    CUDA-graph capture, so it refuses while a capture is in progress.
    """
    import torch

    sizes = [math.prod(shape) * dt.itemsize for shape, dt in parts]
    total = sum(aligned(s) for s in sizes)
    if workspace is None or workspace.numel() < total:
        if getattr(device, "type", "cpu") == "cuda" and torch.cuda.is_current_stream_capturing():
            have = 0 if workspace is None else workspace.numel()
            raise PluginError(f"Plugin {plugin!r} needs {total} workspace bytes but got {have} during CUDA-graph "
                              f"capture; give it a buffer of workspace_size() bytes.")
        workspace = torch.empty(total, dtype=torch.uint8, device=device)
    views, off = [], 0
    for (shape, dt), size in zip(parts, sizes):
        views.append(workspace[off:off + size].view(dt).view(tuple(shape)))
        off += aligned(size)
    return views


def attr_str(value: Any) -> str:
    """ONNX string attributes may arrive as bytes."""
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def opt(inputs: Sequence[Any], i: int) -> Any:
    """Optional input ``i``: absent from a short list, or given as None."""
    return inputs[i] if len(inputs) > i else None


def same_device(tensors: Sequence[Any]) -> Any:
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise PluginError(f"Plugin inputs live on several devices {sorted(map(str, devs))}; move them to one.")
    return next(iter(devs))
