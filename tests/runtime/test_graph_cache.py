"""The CUDA-graph cache: one graph per input shape, at most ``graph_cache`` of them, least recently run
evicted first; the bound comes from the context option, else KILN_GRAPH_CACHE, else 16."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.errors import KilnError
from kiln.runtime.graphs import DEFAULT_GRAPHS, GRAPH_CACHE_ENV, GraphRunner, graph_cache_size


def _engine(device: str = "cpu"):
    net = kiln.Network("g")
    x = net.add_input("x", "float32", ("b", 8))
    h = net.add_fully_connected(x, np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32),
                                np.zeros(16, np.float32))
    net.mark_output(net.add_activation(h.output, "relu").output, "y")
    return kiln.build(net, kiln.BuildConfig(device=device, profiles={"x": ((1, 8), (4, 8), (8, 8))}))


class _Graph:
    def __init__(self, log: list, shape: tuple) -> None:
        self.log, self.shape = log, shape

    def replay(self) -> None:
        self.log.append(("replay", self.shape))


@pytest.fixture
def runner(monkeypatch):
    """A GraphRunner bounded at 2 shapes whose warm-up runs and recordings are faked (no GPU here): it logs them."""
    log: list = []

    def warm(self, tensors):
        log.append(("warm", tuple(tensors[0].shape)))
        return {"inputs": [t.clone() for t in tensors], "keepalive": {}, "pool": None}, []

    def record(self, entry, bind):
        shape = tuple(entry["inputs"][0].shape)
        log.append(("record", shape))
        out = {"graph": _Graph(log, shape), "outputs": []}
        return out if bind else {**out, "inputs": entry["inputs"]}
    monkeypatch.setattr(GraphRunner, "_warm", warm)
    monkeypatch.setattr(GraphRunner, "_record", record)
    r = GraphRunner(_engine().context().program, max_graphs=2)
    r.log = log
    return r


def _run(runner, batch: int) -> None:
    """A run on a new input tensor (kept alive, so no two runs share an address: none is bound in place)."""
    runner.keep = [*getattr(runner, "keep", []), torch.zeros(batch, 8)]
    runner.run([runner.keep[-1]])


def test_first_run_warms_up_second_records_then_replays(runner) -> None:
    for _ in range(3):
        _run(runner, 4)
    assert runner.log == [("warm", (4, 8)), ("record", (4, 8)), ("replay", (4, 8)), ("replay", (4, 8))]


def test_least_recently_run_shape_is_evicted(runner) -> None:
    for b in (1, 2, 1, 3):          # 2 was run longer ago than 1 when 3 arrives
        _run(runner, b)
    assert [k[0][0][0] for k in runner.graphs] == [1, 3]
    assert runner.evictions == 1
    assert runner.log == [("warm", (1, 8)), ("warm", (2, 8)), ("record", (1, 8)), ("replay", (1, 8)),
                          ("warm", (3, 8))]
    runner.log.clear()
    _run(runner, 3)                 # warmed up before: recorded and replayed
    _run(runner, 3)                 # recorded: replayed only
    _run(runner, 2)                 # evicted before: warmed up again, and 1 (least recent) goes
    assert runner.log == [("record", (3, 8)), ("replay", (3, 8)), ("replay", (3, 8)), ("warm", (2, 8))]
    assert [k[0][0][0] for k in runner.graphs] == [3, 2] and runner.evictions == 2


def test_bound_from_option_env_and_default(monkeypatch) -> None:
    monkeypatch.delenv(GRAPH_CACHE_ENV, raising=False)
    assert graph_cache_size() == DEFAULT_GRAPHS == 16
    monkeypatch.setenv(GRAPH_CACHE_ENV, "3")
    assert graph_cache_size() == 3 and graph_cache_size(5) == 5
    assert _engine().context().graph_cache == 3
    assert _engine().context(graph_cache=7).graph_cache == 7


@pytest.mark.parametrize("env, option", [("0", None), ("many", None), ("-2", None), ("2.5", None),
                                         (None, 0), (None, 1.5), (None, True), (None, "4")])
def test_bad_bounds_are_one_line_errors(monkeypatch, env, option) -> None:
    if env is None:
        monkeypatch.delenv(GRAPH_CACHE_ENV, raising=False)
    else:
        monkeypatch.setenv(GRAPH_CACHE_ENV, env)
    with pytest.raises(KilnError) as info:
        _engine().context(graph_cache=option)
    msg = str(info.value)
    assert "\n" not in msg and (GRAPH_CACHE_ENV if env is not None else "graph_cache") in msg, msg


@pytest.mark.gpu
def test_eviction_on_the_gpu_keeps_results_right() -> None:
    engine = _engine("cuda")
    ctx, eager = engine.context(graph_cache=2), engine.context(cuda_graph=False)
    for b in (1, 2, 3, 1, 2, 3):
        x = torch.randn(b, 8, device="cuda")
        torch.testing.assert_close(ctx.execute([x], copy=True)[0], eager.execute([x], copy=True)[0])
        assert ctx.graphs is not None and len(ctx.graphs.graphs) <= 2
    assert ctx.graphs.evictions == 4
