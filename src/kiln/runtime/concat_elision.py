"""Concatenation without the copy: producers write straight into the concatenated buffer.

A channel concatenation of channels-last maps (YOLOv5's C3 blocks, SPPF, every FPN/PAN neck)
otherwise costs a full read and write of its output. As TensorRT does, the engine instead gives each producer a
channel slice of the concatenation's buffer to write its output into, and the concatenation only
copies the inputs whose producers could not (several consumers, a graph output, a tactic that
cannot write into a strided slice).

Decided when an engine is loaded, from the plan alone (no change to the file format): a
Concatenation over axis 1 of rank-4 tensors whose inputs all have static channel counts; an
input qualifies when its only consumer is this concatenation, it is not a graph output, and its
producer's tactic is registered with ``writes_into``. Such a producer is called with
``out=alloc``; ``alloc(shape, dtype, device)`` returns its slice of a buffer allocated by the
first producer of each run (so warm-up and CUDA-graph capture each get their own). A producer
may still return a tensor of its own (its fast path did not apply): the concatenation checks
each input and copies whatever is not already in place, so the result is always the
concatenation.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.kernels import get_tactic


class ConcatBuffer:
    """The buffer one concatenation's producers write into during one run."""

    __slots__ = ("offsets", "channels", "total", "current", "fallback")

    def __init__(self, channels: list[int], fallback) -> None:
        self.channels = channels
        self.offsets = [sum(channels[:i]) for i in range(len(channels))]
        self.total = sum(channels)
        self.current: torch.Tensor | None = None
        self.fallback = fallback

    def slot(self, i: int):
        def alloc(shape, dtype, device) -> torch.Tensor:
            n, c, h, w = shape
            buf = self.current
            if (buf is None or buf.shape[0] != n or tuple(buf.shape[2:]) != (h, w) or buf.dtype != dtype
                    or buf.device != torch.device(device)):
                buf = torch.empty((n, h, w, self.total), dtype=dtype, device=device).permute(0, 3, 1, 2)
                self.current = buf
            if c != self.channels[i]:
                raise RuntimeError(f"concatenation input {i} has {c} channels; the plan says {self.channels[i]}")
            return buf[:, self.offsets[i]:self.offsets[i] + c]
        return alloc

    def gather(self, *xs) -> tuple[torch.Tensor]:
        buf, self.current = self.current, None
        if buf is None or any(x is None or x.dim() != 4 or x.shape[0] != buf.shape[0]
                              or x.shape[2:] != buf.shape[2:] or x.dtype != buf.dtype for x in xs):
            return self.fallback(*xs)       # nothing was written in place, or torch.cat's own error
        for x, off, c in zip(xs, self.offsets, self.channels):
            dst = buf[:, off:off + c]
            if x.shape[1] != c:
                return self.fallback(*xs)
            if x.data_ptr() == dst.data_ptr() and x.stride() == dst.stride():
                continue                    # its producer wrote it in place
            dst.copy_(x)
        return (buf,)


def _static_channels(tensors: dict, name: str | None) -> int | None:
    shape = (tensors.get(name) or {}).get("shape") if name else None
    if not isinstance(shape, list) or len(shape) != 4 or not isinstance(shape[1], int):
        return None
    return shape[1]


def elide_concats(program: Any, plan: dict, device: str) -> list[ConcatBuffer]:
    """Rewire ``program.steps`` (parallel to ``plan["layers"]``) so qualifying producers write into their
    concatenation's buffer; returns the buffers, whose ``current`` the program resets before each run."""
    if device != "cuda":
        return []
    tensors = plan.get("tensors", {})
    layers = plan["layers"]
    producer: dict[str, int] = {}
    uses: dict[str, int] = {}
    for i, step in enumerate(program.steps):
        for n in step.outs:
            producer[n] = i
        for n in step.ins:
            if n is not None:
                uses[n] = uses.get(n, 0) + 1
    outputs = set(program.outputs)
    buffers = []
    for i, step in enumerate(program.steps):
        layer = layers[i]
        if step.kind != "Concatenation" or layer.get("host") or not step.ins or None in step.ins:
            continue
        axis = (layer.get("attrs") or {}).get("axis")
        if not isinstance(axis, int) or axis not in (1, -3):
            continue
        channels = [_static_channels(tensors, n) for n in step.ins]
        if None in channels or _static_channels(tensors, step.outs[0]) != sum(channels):
            continue
        direct = []
        for k, n in enumerate(step.ins):
            p = producer.get(n)
            if p is None or uses.get(n) != 1 or n in outputs or n in program.constants:
                continue
            prod = program.steps[p]
            if prod.outs != [n] or layers[p].get("host") or not get_tactic(prod.kind, prod.tactic).writes_into:
                continue
            direct.append((k, p))
        if not direct:
            continue
        buf = ConcatBuffer(channels, step.fn)
        for k, p in direct:
            prod = program.steps[p]
            prod.fn = _with_out(prod.fn, buf.slot(k))
        step.fn = buf.gather
        buffers.append(buf)
    return buffers


def _with_out(fn, alloc):
    def run(*args):
        return fn(*args, out=alloc)
    return run
