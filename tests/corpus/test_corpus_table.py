"""scripts/corpus_table.py's FP16 error measure: pooled over input sets, the worst output counting, and the
L2 norm of the error for an output whose reference is zero everywhere; checked against numpy by hand."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location(
    "corpus_table", Path(__file__).resolve().parents[2] / "scripts" / "corpus_table.py")
ct = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ct)


def test_error_is_pooled_over_the_input_sets() -> None:
    refs = [{"y": np.array([3.0, 4.0])}, {"y": np.array([0.0, 0.0])}]
    outs = [{"y": np.array([3.0, 4.5])}, {"y": np.array([0.5, 0.0])}]
    # pooled: sqrt((0.25 + 0.25) / 25); the second set alone would be undefined, the first alone 0.1
    assert np.isclose(ct.pooled_rel_l2(outs, refs), np.sqrt(0.5 / 25.0))


def test_the_worst_output_counts() -> None:
    refs = [{"a": np.array([1.0, 0.0]), "b": np.array([10.0])}]
    outs = [{"a": np.array([1.0, 0.1]), "b": np.array([10.5])}]
    assert np.isclose(ct.pooled_rel_l2(outs, refs), 0.1)


def test_an_all_zero_reference_counts_the_error_norm() -> None:
    refs = [{"p": np.zeros(4)}, {"p": np.zeros(4)}]
    outs = [{"p": np.array([0.0, 3e-8, 0.0, 0.0])}, {"p": np.array([4e-8, 0.0, 0.0, 0.0])}]
    assert np.isclose(ct.pooled_rel_l2(outs, refs), 5e-8)
    assert ct.pooled_rel_l2([{"p": np.ones(4)}, {"p": np.zeros(4)}], refs) == 2.0
