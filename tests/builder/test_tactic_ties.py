"""Tactic choice from timings: tied candidates resolve to the first registered, so equal-speed tactics do not
trade places between builds on timing noise; a clearly faster one still wins."""
from __future__ import annotations

from types import SimpleNamespace

from kiln.builder.tactics import TIE_MARGIN, _fastest


def _cands(*names: str) -> list:
    return [SimpleNamespace(name=n) for n in names]


def test_tied_candidates_pick_the_first_registered():
    cands = _cands("sdpa_cudnn", "sdpa", "reference")
    assert _fastest(cands, {"sdpa_cudnn": 0.101, "sdpa": 0.100, "reference": 0.5}) == "sdpa_cudnn"
    assert _fastest(cands, {"sdpa_cudnn": 0.100, "sdpa": 0.101, "reference": 0.5}) == "sdpa_cudnn"


def test_a_clearly_faster_candidate_wins():
    cands = _cands("a", "b")
    assert _fastest(cands, {"a": 0.100 * TIE_MARGIN * 1.01, "b": 0.100}) == "b"
    assert _fastest(cands, {"b": 0.1}) == "b"              # "a" failed to run or disagreed: not timed


def test_nothing_timed_gives_none():
    assert _fastest(_cands("a", "b"), {}) is None
    assert _fastest(_cands("a"), {"a": float("inf")}) is None


def test_a_cached_time_of_a_tactic_no_longer_offered_is_ignored():
    """The timing cache may hold a faster tactic this build does not offer (another device, a tactic switched off):
    the choice is among the candidates, not a StopIteration."""
    cands = _cands("a", "b")
    assert _fastest(cands, {"gone": 0.01, "a": 0.2, "b": 0.1}) == "b"
    assert _fastest(cands, {"gone": 0.01}) is None
