"""TensorFlow Lite sparse tensors (``Tensor.sparsity``) expanded to their dense values.

A sparse tensor stores only its kept values, in the order of a walk over its dimensions in
``traversal_order`` (the tensor's dimensions, then the block dimensions of ``block_map``). Each level of the
walk is DENSE (every index up to ``dense_size``) or SPARSE_CSR (the indices ``array_indices`` lists between
this parent's ``array_segments`` bounds), as in schema.fbs's SparsityParameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_EXPANSION = 1024            # dense elements per stored value, at most (beyond: not a plausible sparse tensor)


@dataclass(frozen=True)
class Level:
    csr: bool
    dense_size: int
    segments: np.ndarray
    indices: np.ndarray


@dataclass(frozen=True)
class Sparsity:
    traversal_order: list[int]
    block_map: list[int]
    levels: list[Level]


def _children(level: Level, prev: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions, index values, children per parent) of one level below the parents ``prev``; more than
    ``limit`` children is an error, raised before they are made."""
    if not level.csr:
        size = level.dense_size
        if size < 0:
            raise ValueError(f"a dense level has size {size}")
        if len(prev) * size > limit:
            raise ValueError(f"its sparsity walk reaches more than the {limit} stored values")
        counts = np.full(len(prev), size, np.int64)
        pos = (prev[:, None] * size + np.arange(size)).reshape(-1)
        return pos, np.tile(np.arange(size, dtype=np.int64), len(prev)), counts
    seg = level.segments.astype(np.int64)
    if len(prev) and int(prev.max()) + 1 >= len(seg):
        raise ValueError("array_segments is shorter than the level above it")
    starts, counts = seg[prev], seg[prev + 1] - seg[prev]
    if (counts < 0).any() or (starts < 0).any():
        raise ValueError("array_segments is not ascending")
    if int(counts.sum()) > limit:
        raise ValueError(f"its sparsity walk reaches more than the {limit} stored values")
    pos = np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()), dtype=np.int64)
    if len(pos) and int(pos.max()) >= len(level.indices):
        raise ValueError("array_segments points past array_indices")
    return pos, level.indices.astype(np.int64)[pos], counts


def densify(values: np.ndarray, shape: list[int], sp: Sparsity) -> np.ndarray:
    """The dense tensor of ``shape`` whose kept ``values`` ``sp`` places; zeros elsewhere."""
    rank, order, block_map = len(shape), sp.traversal_order, sp.block_map
    if len(sp.levels) != len(order) or sorted(order) != list(range(len(order))) or \
            len(order) != rank + len(block_map) or not all(0 <= d < rank for d in block_map):
        raise ValueError("its sparsity parameters do not describe its shape")
    total = int(np.prod(shape, dtype=np.int64))
    if total > MAX_EXPANSION * max(values.size, 1):
        raise ValueError(f"{values.size} stored values cannot fill {total} elements")
    prev, cols = np.zeros(1, np.int64), []
    for level in sp.levels:
        prev, col, counts = _children(level, prev, values.size)
        cols = [np.repeat(c, counts) for c in cols] + [col]
    if len(prev) != values.size:
        raise ValueError(f"its sparsity walk reaches {len(prev)} positions for {values.size} stored values")
    index = [np.zeros(values.size, np.int64) for _ in range(rank)]
    for i in range(rank):
        index[order[i]] = cols[i]
    for i in range(rank, len(order)):
        j = order[i] - rank
        index[block_map[j]] = index[block_map[j]] * sp.levels[order.index(rank + j)].dense_size + cols[i]
    for d, ix in enumerate(index):
        if len(ix) and (int(ix.min()) < 0 or int(ix.max()) >= shape[d]):
            raise ValueError(f"its sparsity indices leave dimension {d} of size {shape[d]}")
    out = np.zeros(shape, values.dtype)
    out[tuple(index)] = values.reshape(-1)
    return out
