"""Whole-engine CUDA graphs: record the engine's launches once per input shape, replay after.

The first run at a new input shape runs the plan eagerly and returns that run's outputs: it is the warm-up
(cuDNN/cuBLAS plans and handles, lazy module loads, and the host values the plan moves to the device, which it
collects). The second run at that shape records the plan under capture into a private memory pool — torch's
graph pool reuses activation blocks by liveness, so the pool is the engine's planned activation arena for that
shape — and replays it; later runs copy new inputs in, replay, and return the static outputs. A shape run once
thus never pays for both the warm-up and the capture. Engines with data-dependent layers (If/Loop, NonZero, NMS
with dynamic outputs) stay eager.

Input binding: a caller that passes the same device buffers on consecutive runs (a serving
loop that refills its input tensor, as TensorRT users bind addresses once) gets a second graph,
recorded to read those buffers in place, and no copy of a large input. The bound graph shares the first one's memory pool (the two
never run at once: runs hold the context's lock and share one stream), so binding costs no
second activation arena. Other buffers take the copying graph again.

The cache is bounded: at most ``max_graphs`` input-shape signatures keep their graphs (default 16, or
the ``KILN_GRAPH_CACHE`` environment variable, or the context's ``graph_cache`` option). A run at a
new shape beyond that releases the least recently run shape's graphs (and, once the caller drops
its outputs, their memory pool); that shape is recorded again if it returns.
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch

from kiln.errors import KilnError

DEFAULT_GRAPHS = 16
GRAPH_CACHE_ENV = "KILN_GRAPH_CACHE"


def graph_cache_size(value: int | None = None) -> int:
    """How many input shapes keep a recorded graph: ``value``, else $KILN_GRAPH_CACHE, else 16."""
    where = "graph_cache"
    if value is None:
        text = os.environ.get(GRAPH_CACHE_ENV, "").strip()
        if not text:
            return DEFAULT_GRAPHS
        where = GRAPH_CACHE_ENV
        value = int(text) if text.isdigit() else text        # type: ignore[assignment]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise KilnError(f"{where} is the number of input shapes that keep a CUDA graph, a whole number >= 1; got "
                        f"{value!r}. Give e.g. {DEFAULT_GRAPHS}.")
    return value


class CaptureError(RuntimeError):
    """The plan could not be recorded (a layer synchronizes with the host); run eagerly."""


class GraphRunner:
    """One captured graph per input-shape signature, least recently run first in ``graphs``."""

    def __init__(self, program, max_graphs: int = DEFAULT_GRAPHS) -> None:
        self.program = program
        self.graphs: dict[tuple, dict[str, Any]] = {}
        self.max_graphs = graph_cache_size(max_graphs)
        self.evictions = 0
        self.capturable = not any(s.dynamic for s in program.steps)
        self.last_record: dict[str, float] = {}
        self._stream: torch.cuda.Stream | None = None      # the warm-up runs' stream

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            raise CaptureError("sequence or optional inputs are not captured")
        key = tuple((tuple(t.shape), t.dtype) for t in tensors)
        where = tuple((t.data_ptr(), t.stride(), t.device) for t in tensors)
        entry = self.graphs.pop(key, None)
        if entry is None:
            while len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))
                self.evictions += 1
            entry, outputs = self._guard(self._warm, tensors)
            entry["last"] = where
            self.graphs[key] = entry            # now the most recently run
            return outputs
        self.graphs[key] = entry
        bound = entry.get("bound")
        if bound is not None and bound["where"] == where:
            bound["graph"].replay()
            return bound["outputs"]
        if entry.get("last") == where:
            # the same input buffers twice in a row: record a graph that reads them where they are
            entry["bound"] = {**self._guard(self._record, {**entry, "inputs": list(tensors)}, True), "where": where}
            entry["bound"]["graph"].replay()
            return entry["bound"]["outputs"]
        entry["last"] = where
        for buf, t in zip(entry["inputs"], tensors):
            buf.copy_(t, non_blocking=True)
        if "graph" not in entry:                # warmed up by the first run at this shape: record now
            entry.update(self._guard(self._record, entry, False))
        entry["graph"].replay()
        return entry["outputs"]

    @staticmethod
    def _guard(fn, *args):
        try:
            return fn(*args)
        except CaptureError:
            raise
        except Exception as exc:
            raise CaptureError(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") \
                from exc

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _warm(self, tensors: list[torch.Tensor]) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Run the plan once eagerly on copies of ``tensors`` (which become the graph's static inputs), collecting
        the host values it moves to the device; returns the shape's unrecorded entry and the run's outputs. Its
        wall time goes to ``last_record`` (ms)."""
        static_in = [t.clone() for t in tensors]
        stream = self._side_stream()
        stream.wait_stream(torch.cuda.current_stream())
        cache: dict = {}
        self.program.move_cache = cache
        t0 = time.perf_counter()
        try:
            self.program.move_mode = "collect"
            with torch.cuda.stream(stream):
                outputs = self.program.run_env({}, static_in)
                if not all(isinstance(t, torch.Tensor) for t in outputs):
                    raise CaptureError("sequence or optional outputs are not captured")
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
        finally:
            self.program.move_mode = None
            self.program.move_cache = None
        self.last_record = {"eager_ms": (time.perf_counter() - t0) * 1e3}
        entry = {"inputs": static_in, "keepalive": cache, "pool": torch.cuda.graph_pool_handle()}
        return entry, list(outputs)

    def _record(self, entry: dict[str, Any], bind: bool) -> dict[str, Any]:
        """Record the plan on ``entry``'s inputs into its memory pool, reading the host values its warm-up run
        collected. Returns the graph and its outputs (with the inputs it reads unless ``bind``); its wall time
        goes to ``last_record`` (ms)."""
        cache = entry["keepalive"]
        self.program.move_cache = cache
        t0 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        try:
            self.program.move_mode = "replay"
            with torch.cuda.graph(graph, pool=entry["pool"]):
                static_out = self.program.run_env({}, entry["inputs"])
        finally:
            self.program.move_mode = None
            self.program.move_cache = None
        self.last_record = {"record_ms": (time.perf_counter() - t0) * 1e3}
        out = {"graph": graph, "outputs": static_out}
        return out if bind else {**out, "inputs": entry["inputs"]}

    def nbytes(self) -> int:
        return 0
