"""CPU tactic timing on a loaded machine: candidates are timed in interleaved rounds and judged by a low
quantile of their per-call times, so a load spike that lasts a while falls on every candidate alike instead
of on one candidate's block of repeats; a close call gets more rounds, and a tie within CPU_TIE_MARGIN goes to
the first registered. Time comes from a fake clock that each fake candidate advances by its own cost, times the
machine's load at that call."""
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

    def __init__(self, load, by_name=None) -> None:
        self.now_ms, self.calls, self.load, self.by_name, self.log = 0.0, 0, load, by_name, []

    def perf_counter(self) -> float:
        return self.now_ms / 1e3

    def call(self, name: str, cost_ms: float) -> None:
        self.now_ms += cost_ms * (self.by_name(self.calls, name) if self.by_name else self.load(self.calls))
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


def _choose(monkeypatch, load, costs: dict[str, float], by_name=None,
            **fail_at) -> tuple[str | None, dict[str, float], Machine]:
    """(the tactic a CPU build picks among ``costs``' candidates, in registration order, their times, the machine)."""
    machine = Machine(load, by_name)
    monkeypatch.setattr(bt, "time", SimpleNamespace(perf_counter=machine.perf_counter))
    cands = [Fake(machine, n, c, fail_at.get(n)) for n, c in costs.items()]
    times = bt._layer_times(_layer(), cands, {}, "cpu", "cpu0/2 threads", TimingCache(), REPS)
    return bt._fastest(cands, times, bt.CPU_TIE_MARGIN), times, machine


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
    extra = machine.calls - 2 * CALLS_EACH       # a close call (within CLOSE_MARGIN): rounds again, within budget
    assert 0 < extra <= 2 * bt.CLOSE_ROUNDS * REPS


def test_the_clearly_faster_candidate_wins_under_scattered_spikes(monkeypatch):
    """Two calls in five (at random) take 2-4x as long; every candidate's low quantile is its cost."""
    rng = np.random.default_rng(7)
    slow = {i: float(rng.uniform(2, 4)) for i in range(200) if rng.random() < 0.4}
    costs = {"torch": 1.3, "onednn": 1.0, "gemm": 1.12}
    name, times, _ = _choose(monkeypatch, lambda i: slow.get(i, 1.0), costs)
    assert name == "onednn" and times == pytest.approx(costs)


def test_a_clear_winner_gets_no_extra_rounds(monkeypatch):
    _, _, machine = _choose(monkeypatch, lambda i: 1.0, {"torch": 1.0, "onednn": bt.CLOSE_MARGIN * 1.01})
    assert machine.calls == 2 * CALLS_EACH       # as many calls as timing each in its own block: same build time


def test_close_call_set():
    assert bt._close_call([1.0, 1.2, 2.0, float("inf")]) == [0, 1]
    assert bt._close_call([2.0, 1.0, bt.CLOSE_MARGIN]) == [1, 2]
    assert bt._close_call([1.0, 1.3 * bt.CLOSE_MARGIN]) == []       # a clear winner
    assert bt._close_call([1.0]) == [] and bt._close_call([]) == []
    assert bt._close_call([float("inf"), float("inf")]) == []
    assert bt.close_call_rounds(REPS, 0.001) == (bt.CLOSE_ROUNDS * REPS, bt.CLOSE_MIN_S)
    assert bt.close_call_rounds(REPS, 5.0) == (bt.CLOSE_ROUNDS * REPS, 5.0)


def test_a_close_call_misjudged_in_the_first_rounds_is_decided_on_all_of_them(monkeypatch):
    """'onednn' is 10% faster, but every one of its calls in the first rounds is slowed 1.3x (load that happens
    to line up with it): on those rounds alone 'torch' wins; the close call's extra rounds (all of them: the calls
    are cheap) give 'onednn' back, by its quantile and by its wins in 30 of the 40 rounds."""
    first = 2 * CALLS_EACH

    def unlucky(i: int, name: str) -> float:
        return 1.3 if i < first and name == "onednn" else 1.0
    name, times, machine = _choose(monkeypatch, lambda i: 1.0, {"torch": 0.1, "onednn": 0.09}, by_name=unlucky)
    assert machine.calls == first + 2 * bt.CLOSE_ROUNDS * REPS
    assert name == "onednn" and times["onednn"] == pytest.approx(0.09)


def test_extra_rounds_stop_at_their_budget(monkeypatch):
    """Slow candidates (20 ms a call): the extra rounds may take about as long as the first rounds, not 3x."""
    _, _, machine = _choose(monkeypatch, lambda i: 1.0, {"torch": 20.0, "onednn": 20.0})
    assert machine.calls - 2 * CALLS_EACH <= 2 * (REPS + 1)


@pytest.mark.parametrize("times,want", [({"torch": 1.0, "onednn": 1.0}, "torch"),
                                        ({"torch": 1.04, "onednn": 1.0}, "torch"),      # within noise: the first
                                        ({"torch": 1.06, "onednn": 1.0}, "onednn")])
def test_a_cpu_tie_within_its_margin_goes_to_the_first_registered(times, want):
    cands = [SimpleNamespace(name="torch"), SimpleNamespace(name="onednn")]
    assert bt.CPU_TIE_MARGIN == pytest.approx(1.05)
    assert bt._fastest(cands, times, bt.CPU_TIE_MARGIN) == want


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


def _two_fc_model(path) -> str:
    """x [4, 8] -> FC 8x8 + ReLU (256 FLOPs·2) and y [64, 256] -> FC 256x256 + ReLU (8.4 MFLOP)."""
    from onnx import TensorProto, helper, numpy_helper, save
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 8)), ("b1", (8,)), ("w2", (256, 256)), ("b2", (256,)))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Gemm", ["y", "w2", "b2"], ["k"], transB=1), helper.make_node("Relu", ["k"], ["b"])]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "two_fc", [vi("x", TensorProto.FLOAT, [4, 8]), vi("y", TensorProto.FLOAT, [64, 256])],
                              [vi("a", TensorProto.FLOAT, [4, 8]), vi("b", TensorProto.FLOAT, [64, 256])], inits)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_a_small_layer_is_timed_on_the_one_thread_it_runs_on(monkeypatch, tmp_path):
    """On 2 threads, the runtime runs a GEMM-like layer under SMALL_LAYER_FLOPS on one thread
    (kiln.kernels.cpu_threads.layer_threads), so its tactics are timed there and cached under one thread; a large
    one is timed on the build's 2. The thread count is the build's again afterwards."""
    import json

    import torch

    import kiln
    import kiln.onnx
    from kiln.kernels.cpu_threads import SMALL_LAYER_FLOPS, layer_flops, set_default_threads
    assert layer_flops("FullyConnected", [(4, 8), (8, 8)], [(4, 8)]) < SMALL_LAYER_FLOPS
    assert layer_flops("FullyConnected", [(64, 256), (256, 256)], [(64, 256)]) > SMALL_LAYER_FLOPS
    seen: dict[tuple, int] = {}

    def fake_interleaved(fns, args, reps):
        seen[tuple(args[0].shape)] = torch.get_num_threads()
        return [1.0] * len(fns)
    monkeypatch.setattr(bt, "_time_cpu_interleaved", fake_interleaved)
    before = torch.get_num_threads()
    set_default_threads(2)
    try:
        cache = tmp_path / "t.cache"
        kiln.build(kiln.onnx.parse(_two_fc_model(tmp_path / "m.onnx")),
                   kiln.BuildConfig(device="cpu", timing_cache=str(cache)))
        assert torch.get_num_threads() == 2
    finally:
        set_default_threads(None)
        torch.set_num_threads(before)
    if (4, 8) not in seen or (64, 256) not in seen:
        pytest.skip("this torch offers one FullyConnected tactic on the CPU: nothing is timed")
    assert seen == {(4, 8): 1, (64, 256): 2}
    entries = json.loads(cache.read_text())
    keys = [k for k in entries.get("entries", entries) if "|FullyConnected|" in k and "|threads:" not in k]
    assert sorted(k.split("|")[0].split("/")[-1] for k in keys) == ["1 threads", "2 threads"]
    assert any("(4, 8)" in k and "/1 threads|" in k for k in keys)


def test_clearly_faster_is_a_sign_test_over_shared_rounds():
    n = 40                                     # needs n/2 + SIGN_Z * sqrt(n)/2 = 26.3 wins at SIGN_Z 2.0
    need = int(np.ceil(n / 2 + bt.SIGN_Z * np.sqrt(n) / 2))
    slow = [1.0] * n

    def wins(k: int) -> list[float]:
        return [0.9] * k + [1.1] * (n - k)
    assert bt.clearly_faster(wins(n), slow) and bt.clearly_faster(wins(need), slow)
    assert not bt.clearly_faster(wins(need - 1), slow) and not bt.clearly_faster(wins(n // 2), slow)
    assert not bt.clearly_faster([], [])


def test_a_faster_candidate_within_noise_reports_the_earlier_ones_time():
    """'b' has the lower quantile but beats 'a' in only 24 of 40 rounds: reported as fast as 'a', so the tie rule
    keeps 'a'; 'c' beats 'a' in every round and keeps its own time."""
    a = [1.0 + 0.01 * (i % 7) for i in range(40)]
    b = [x * (0.95 if i < 24 else 1.05) for i, x in enumerate(a)]
    c = [x * 0.8 for x in a]
    times = bt.within_noise([a, b, c], [0, 1, 2])
    assert times[0] == times[1] == pytest.approx(bt._quantile(a))
    assert times[2] == pytest.approx(bt._quantile(c)) and times[2] < times[0]
    assert bt.within_noise([a, b], [0, 1])[1] == times[0]
    assert bt.within_noise([b, a], [0, 1]) == [bt._quantile(b), bt._quantile(a)]     # slower later: untouched


@pytest.mark.parametrize("slow,cost,want", [(1.0, 0.93, "onednn"), (1.3, 0.93, "torch"), (1.3, 0.8, "onednn")])
def test_a_small_lead_that_wins_half_the_rounds_is_noise_and_the_first_registered_stays(monkeypatch, slow, cost,
                                                                                        want):
    """'onednn' is 7% faster (beyond CPU_TIE_MARGIN). On a quiet machine (``slow`` 1.0) it wins every shared round
    and is chosen. Where load slows every other call of each candidate by 1.3x, out of step (so each wins half the
    rounds), its low quantile still leads by 7% but its wins are a coin's: 'torch' (registered first) is kept. A
    20% lead (beyond NOISE_MARGIN) stands on the quantiles however many rounds it wins."""
    calls: dict[str, int] = {}

    def load(i: int, name: str) -> float:
        k = calls[name] = calls.get(name, 0) + 1
        return slow if (k % 2 == 0) == (name == "torch") else 1.0
    name, times, _ = _choose(monkeypatch, lambda i: 1.0, {"torch": 1.0, "onednn": cost}, by_name=load)
    assert name == want
    assert times["onednn"] == pytest.approx(cost if want == "onednn" else 1.0)
