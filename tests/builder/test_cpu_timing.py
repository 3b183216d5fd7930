"""CPU tactic timing on a loaded machine: candidates are timed in interleaved rounds and judged by a low
quantile of their per-call times, so a load spike that lasts a while falls on every candidate alike instead
of on one candidate's block of repeats. Time comes from a fake clock that each fake candidate advances by
its own cost, times the machine's load at that call."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import kiln.builder.tactics as bt
from kiln.builder.timing_cache import TimingCache

REPS = 10                   # a default-level build's repeats per candidate
CALLS_EACH = 1 + 2 + REPS   # the agreement check, two warm-ups, the timed calls


class Machine:
    """A fake clock and a load schedule: call number ``i`` (counted over all candidates) takes its
    candidate's cost times ``load(i)`` milliseconds."""

    def __init__(self, load) -> None:
        self.now_ms, self.calls, self.load, self.log = 0.0, 0, load, []

    def perf_counter(self) -> float:
        return self.now_ms / 1e3

    def call(self, name: str, cost_ms: float) -> None:
        self.now_ms += cost_ms * self.load(self.calls)
        self.calls += 1
        self.log.append(name)


class Fake:
    """A tactic that returns ``2 * x`` after ``cost_ms`` of fake time; raises from its ``fail_at``-th call on."""

    def __init__(self, machine: Machine, name: str, cost_ms: float, fail_at: int | None = None) -> None:
        self.machine, self.name, self.cost_ms, self.fail_at, self.calls = machine, name, cost_ms, fail_at, 0

    def make(self, attrs, ctx):
        def run(x):
            self.calls += 1
            if self.fail_at is not None and self.calls >= self.fail_at:
                raise RuntimeError("out of scratch memory")
            self.machine.call(self.name, self.cost_ms)
            return (x * 2.0,)
        return run


def _layer():
    x = SimpleNamespace(name="x", is_constant=True, value=np.ones((4, 4), np.float32), producer=None)
    return SimpleNamespace(kind="Convolution", attrs={}, precision="fp32", name="conv", inputs=[x],
                           outputs=[SimpleNamespace(dtype="float32")])


def _choose(monkeypatch, load, costs: dict[str, float], **fail_at) -> tuple[str | None, dict[str, float], Machine]:
    """(the tactic a CPU build picks among ``costs``' candidates, in registration order, their times, the machine)."""
    machine = Machine(load)
    monkeypatch.setattr(bt, "time", SimpleNamespace(perf_counter=machine.perf_counter))
    cands = [Fake(machine, n, c, fail_at.get(n)) for n, c in costs.items()]
    times = bt._layer_times(_layer(), cands, {}, "cpu", "cpu0/2 threads", TimingCache(), REPS)
    return bt._fastest(cands, times), times, machine


def _spike_in_first_half(n_cands: int):
    """The machine runs at a third of its speed for the first half of the layer's timing calls."""
    return lambda i: 3.0 if i < n_cands * CALLS_EACH // 2 else 1.0


@pytest.mark.parametrize("costs", [{"onednn": 1.0, "torch": 1.1},       # the first clearly faster
                                   {"onednn": 1.0, "torch": 1.0}])      # tied: the first registered
def test_a_load_spike_over_one_candidates_block_does_not_pick_the_other(monkeypatch, costs):
    """Timed one block after the other (median of each), the spike covers all of the first candidate's repeats
    and none of the second's, and the second wins; interleaved, both see the spike in the same rounds."""
    name, times, machine = _choose(monkeypatch, _spike_in_first_half(2), costs)
    assert name == "onednn"
    assert times == pytest.approx(costs)
    assert machine.calls == 2 * CALLS_EACH       # as many calls as timing each in its own block: same build time


def test_the_clearly_faster_candidate_wins_under_scattered_spikes(monkeypatch):
    """Two calls in five (at random) take 2-4x as long; every candidate's low quantile is its cost."""
    rng = np.random.default_rng(7)
    slow = {i: float(rng.uniform(2, 4)) for i in range(200) if rng.random() < 0.4}
    costs = {"torch": 1.3, "onednn": 1.0, "gemm": 1.12}
    name, times, _ = _choose(monkeypatch, lambda i: slow.get(i, 1.0), costs)
    assert name == "onednn" and times == pytest.approx(costs)


def test_rounds_time_one_call_of_each_candidate_in_rotating_order(monkeypatch):
    _, _, machine = _choose(monkeypatch, lambda i: 1.0, {"a": 1.0, "b": 2.0, "c": 3.0})
    timed = machine.log[3 + 3 * 2:]               # after the agreement checks and the warm-ups
    assert machine.log[:9] == ["a", "b", "c", "a", "a", "b", "b", "c", "c"]
    assert [timed[3 * r:3 * r + 3] for r in range(3)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert len(timed) == 3 * REPS


def test_a_candidate_that_fails_while_timed_is_no_tactic(monkeypatch):
    """'gemm' passes its agreement check and warm-ups, then raises in the fifth round."""
    name, times, _ = _choose(monkeypatch, lambda i: 1.0, {"torch": 1.5, "gemm": 1.0}, gemm=8)
    assert name == "torch" and times == {"torch": pytest.approx(1.5), "gemm": float("inf")}


def test_a_candidate_that_fails_its_warm_up_is_no_tactic(monkeypatch):
    name, times, _ = _choose(monkeypatch, lambda i: 1.0, {"torch": 1.5, "gemm": 1.0}, gemm=2)
    assert name == "torch" and times == {"torch": pytest.approx(1.5), "gemm": float("inf")}
