"""Sequence and optional layers: values are Python lists of tensors, and None for an empty optional.

Every tactic here is ``dynamic``: the number of elements is data, so these layers
are neither constant-folded nor captured in a CUDA graph. Lists are never
mutated in place, because a sequence value may be read by several layers.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.errors import ShapeError
from kiln.kernels._util import ints, norm_axis
from kiln.kernels.registry import tactic


def _index(pos: torch.Tensor | None, n: int, default: int, allow_end: bool, what: str) -> int:
    """An ONNX sequence position: negative counts from the end; ``allow_end`` admits ``n`` (insert)."""
    if pos is None:
        return default
    p = int(pos.reshape(-1)[0].item())
    hi = n if allow_end else n - 1
    if not -n <= p <= hi:
        raise ShapeError(f"{what} position {p} is outside the sequence of {n} elements.")
    return p + n if p < 0 else p


@tactic("SequenceEmpty", dynamic=True)
def make_sequence_empty(attrs, ctx):
    return lambda: ([],)


@tactic("SequenceConstruct", dynamic=True)
def make_sequence_construct(attrs, ctx):
    return lambda *xs: (list(xs),)


@tactic("SequenceAt", dynamic=True)
def make_sequence_at(attrs, ctx):
    def run(seq, pos):
        return (seq[_index(pos, len(seq), 0, False, "SequenceAt")],)
    return run


@tactic("SequenceInsert", dynamic=True)
def make_sequence_insert(attrs, ctx):
    def run(seq, x, pos=None):
        i = _index(pos, len(seq), len(seq), True, "SequenceInsert")
        return (list(seq[:i]) + [x] + list(seq[i:]),)
    return run


@tactic("SequenceErase", dynamic=True)
def make_sequence_erase(attrs, ctx):
    def run(seq, pos=None):
        i = _index(pos, len(seq), len(seq) - 1, False, "SequenceErase")
        return (list(seq[:i]) + list(seq[i + 1:]),)
    return run


@tactic("SequenceLength", dynamic=True)
def make_sequence_length(attrs, ctx):
    return lambda seq: (torch.tensor(len(seq), dtype=torch.int64),)


@tactic("SplitToSequence", dynamic=True)
def make_split_to_sequence(attrs, ctx):
    axis0 = attrs.get("axis", 0)
    keepdims = attrs.get("keepdims", 1)

    def run(x, split=None):
        axis = norm_axis(axis0, x.dim())
        if split is None:
            parts = list(torch.split(x, 1, axis))
            return ([p.squeeze(axis) for p in parts] if not keepdims else parts,)
        sizes = ints(split)
        if split.dim() == 0:       # one chunk size; the last chunk may be smaller
            return (list(torch.split(x, sizes[0], axis)),)
        return (list(torch.split(x, sizes, axis)),)
    return run


@tactic("ConcatFromSequence", dynamic=True)
def make_concat_from_sequence(attrs, ctx):
    axis0 = attrs.get("axis", 0)
    new_axis = attrs.get("new_axis", 0)

    def run(seq):
        if not seq:
            raise ShapeError("ConcatFromSequence got an empty sequence; it needs at least one tensor.")
        if new_axis:
            return (torch.stack(list(seq), norm_axis(axis0, seq[0].dim() + 1)),)
        return (torch.cat(list(seq), norm_axis(axis0, seq[0].dim())),)
    return run


@tactic("SequenceMap", dynamic=True)
def make_sequence_map(attrs, ctx):
    body = attrs["body"]
    outer = attrs.get("outer", [])

    def run(*args):
        n_in = attrs.get("num_inputs", len(args) - len(outer))
        ins, outer_vals = args[:n_in], args[n_in:]
        env = dict(zip(outer, outer_vals))
        n = len(ins[0])
        for s in ins[1:]:
            if isinstance(s, list) and len(s) != n:
                raise ShapeError(f"SequenceMap got sequences of {n} and {len(s)} elements; they must match.")
        results: list[list[Any]] = [[] for _ in body.outputs]
        for i in range(n):
            outs = body.run_env(env, [s[i] if isinstance(s, list) else s for s in ins])
            for acc, v in zip(results, outs):
                acc.append(v)
        return tuple(results)
    return run


@tactic("Optional", dynamic=True)
def make_optional(attrs, ctx):
    return lambda x=None: (x,)


@tactic("OptionalHasElement", dynamic=True)
def make_optional_has_element(attrs, ctx):
    return lambda x=None: (torch.tensor(x is not None),)


@tactic("OptionalGetElement", dynamic=True)
def make_optional_get_element(attrs, ctx):
    def run(x):
        if x is None:
            raise ShapeError("OptionalGetElement read an empty optional; check OptionalHasElement first.")
        return (x,)
    return run
