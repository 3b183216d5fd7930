"""The per-shape cache of ShapeConstant steps (kiln.runtime.shape_cache): one computation per input shape, a
bound that follows the CUDA-graph cache's policy, outputs read on the device kept there, and the outputs a
recorded graph reads kept alive by the graph's cache entry (the program's move cache) after the cache drops
them."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from kiln.errors import KilnError
from kiln.runtime.graphs import GRAPH_CACHE_ENV
from kiln.runtime.shape_cache import PINNED, ShapeCache, cached_per_shape, set_up_shape_caches


class _Program:
    """What the cache reads of its program: the graph recorder's move mode and move cache, its device and steps."""
    move_mode = None
    move_cache = None
    device = "cpu"
    steps: list = []


class _Step:
    def __init__(self, fn, ins: list, targets: list, outs: list) -> None:
        self.fn, self.ins, self.targets, self.outs = fn, ins, targets, outs


def _grid(x: torch.Tensor) -> tuple[torch.Tensor]:
    return (torch.arange(x.shape[-1], dtype=torch.float32),)


def test_one_computation_per_shape_and_the_least_recently_run_goes_first():
    calls = []
    cache = ShapeCache(lambda x: calls.append(tuple(x.shape)) or _grid(x), _Program(), size=2)
    a, b, c = torch.zeros(1, 3), torch.zeros(1, 4), torch.zeros(1, 5)
    kept = cache(a)[0]
    assert cache(torch.ones(1, 3))[0] is kept               # values do not matter, only the shape
    cache(b)
    cache(a)                                                # a is now the most recently run
    cache(c)                                                # drops b
    assert calls == [(1, 3), (1, 4), (1, 5)] and cache.computed == 3
    assert list(cache.entries) == [(torch.Size([1, 3]),), (torch.Size([1, 5]),)]
    cache(b)
    assert calls[-1] == (1, 4) and len(cache.entries) == 2
    torch.testing.assert_close(cache(c)[0], torch.arange(5, dtype=torch.float32))


def test_the_size_follows_the_graph_cache(monkeypatch):
    monkeypatch.setenv(GRAPH_CACHE_ENV, "3")
    assert ShapeCache(_grid, _Program()).size == 3
    monkeypatch.delenv(GRAPH_CACHE_ENV)
    assert ShapeCache(_grid, _Program()).size == 16
    monkeypatch.setenv(GRAPH_CACHE_ENV, "0")
    with pytest.raises(KilnError, match=GRAPH_CACHE_ENV):
        ShapeCache(_grid, _Program())


def test_outputs_a_recorded_graph_reads_outlive_the_cache():
    program = _Program()
    cache = ShapeCache(_grid, program, size=1)
    program.move_mode, program.move_cache = "collect", {}
    cache(torch.zeros(2))                       # warm-up runs record nothing
    assert PINNED not in program.move_cache
    program.move_mode = "replay"                # the run a CUDA graph records
    (read,) = cache(torch.zeros(2))
    assert program.move_cache[PINNED] == [(read,)]
    alive = weakref.ref(read)
    keepalive, program.move_mode, program.move_cache = program.move_cache, None, None
    del read
    cache(torch.zeros(3))                       # the cache drops the shape the graph reads
    gc.collect()
    assert alive() is not None                  # the graph's entry still holds it
    del keepalive
    gc.collect()
    assert alive() is None


def test_only_shape_constant_steps_are_cached():
    fn = _grid
    assert cached_per_shape("Range", fn, _Program()) is fn
    assert isinstance(cached_per_shape("ShapeConstant", fn, _Program()), ShapeCache)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_outputs_every_reader_reads_on_the_device_are_kept_there(device):
    """("meta" stands for the GPU here.) ``grid`` is read on the device only: moved once and kept there;
    ``target`` is read on the host, ``both`` on the host and on the device: they stay where the body made them."""
    program = _Program()
    program.device = device
    cache = ShapeCache(lambda x: (torch.arange(3.0), torch.tensor([2, 3]), torch.zeros(2)), program)
    program.steps = [_Step(cache, ["x"], [None], ["grid", "target", "both"]),
                     _Step(_grid, ["grid", "target", "both"], [device, "cpu", device], ["y"]),
                     _Step(_grid, ["both"], ["cpu"], ["z"])]
    set_up_shape_caches(program, 4)
    grid, target, both = cache(torch.zeros(5))
    assert (grid.device.type, target.device.type, both.device.type) == (device, "cpu", "cpu")
    assert cache.size == 4 and cache(torch.zeros(5))[0] is grid
