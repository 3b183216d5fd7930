"""TFLite sparsity expansion on hand-encoded tensors (schema.fbs's CSR and block-sparse layouts)."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.viewer.formats._tflite_sparse import Level, Sparsity, densify


def dense(n: int) -> Level:
    return Level(False, n, np.zeros(0, np.int32), np.zeros(0, np.int32))


def csr(segments, indices) -> Level:
    return Level(True, 0, np.array(segments, np.int32), np.array(indices, np.uint8))


def test_csr_rows():
    """Rows dense, columns CSR: row 0 keeps columns 1 and 3, row 1 none, row 2 column 0."""
    sp = Sparsity([0, 1], [], [dense(3), csr([0, 2, 2, 3], [1, 3, 0])])
    got = densify(np.array([5.0, 6.0, 7.0], np.float32), [3, 4], sp)
    np.testing.assert_array_equal(got, [[0, 5, 0, 6], [0, 0, 0, 0], [7, 0, 0, 0]])


def test_column_major_traversal():
    """traversal_order (1, 0): the walk goes over columns first, so the values fill the transpose."""
    sp = Sparsity([1, 0], [], [dense(2), csr([0, 1, 3], [2, 0, 1])])
    got = densify(np.array([1, 2, 3], np.int8), [3, 2], sp)
    np.testing.assert_array_equal(got, [[0, 2], [0, 3], [1, 0]])


def test_two_by_two_blocks():
    """A 4x4 matrix of 2x2 blocks, only the diagonal blocks kept, each stored row-major."""
    sp = Sparsity([0, 1, 2, 3], [0, 1], [dense(2), csr([0, 1, 2], [0, 1]), dense(2), dense(2)])
    got = densify(np.arange(1, 9, dtype=np.float32), [4, 4], sp)
    np.testing.assert_array_equal(got, [[1, 2, 0, 0], [3, 4, 0, 0], [0, 0, 5, 6], [0, 0, 7, 8]])


@pytest.mark.parametrize("sp, why", [
    (Sparsity([0, 1], [], [dense(3), csr([0, 2], [1, 3])]), "shorter than the level above"),
    (Sparsity([0, 1], [], [dense(3), csr([0, 2, 2, 3], [1, 3])]), "past array_indices"),
    (Sparsity([0, 1], [], [dense(3), csr([0, 2, 2, 3], [1, 9, 0])]), "leave dimension 1"),
    (Sparsity([0, 0], [], [dense(3), dense(4)]), "do not describe its shape"),
    (Sparsity([0, 1], [], [dense(3), csr([0, 2, 1, 3], [1, 3, 0])]), "not ascending"),
])
def test_damaged_parameters_are_refused(sp, why):
    with pytest.raises(ValueError, match=why):
        densify(np.array([5.0, 6.0, 7.0], np.float32), [3, 4], sp)


def test_expansion_is_bounded():
    sp = Sparsity([0], [], [dense(1 << 20)])
    with pytest.raises(ValueError, match="cannot fill"):
        densify(np.array([1.0], np.float32), [1 << 20], sp)
    huge = Sparsity([0, 1], [], [dense(1 << 40), dense(1)])          # refused before any index is made
    with pytest.raises(ValueError, match="more than the 3 stored values"):
        densify(np.array([5.0, 6.0, 7.0], np.float32), [3, 1], huge)
