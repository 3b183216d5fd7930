"""An execution context as the batcher runs it: its own CUDA stream on a GPU, and no run beside a capture.

A GPU context records a CUDA graph the first time it meets an input shape (and once more to bind its
input buffers). Recording in CUDA's global capture mode forbids other threads' synchronizing calls, so
a run that may record holds the process-wide capture lock alone; runs that replay share it.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np


class SharedExclusiveLock:
    """Many holders in shared mode, or one in exclusive mode."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            self._cond.wait_for(lambda: self._shared == 0)
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


CAPTURE = SharedExclusiveLock()


def may_record(graphs: Any, shapes: tuple[tuple[int, ...], ...]) -> bool:
    """Whether running these input shapes on a context with CUDA graph runner ``graphs`` can record a graph:
    no graph for them yet, or its input-bound graph not recorded yet."""
    if graphs is None:
        return False
    try:
        for key, entry in list(graphs.graphs.items()):
            if tuple(tuple(s) for s, _ in key) == shapes:
                return entry.get("bound") is None
    except (AttributeError, TypeError, ValueError):   # a runner laid out otherwise: assume it may record
        return True
    return True


class EngineInstance:
    """One execution context of an engine; on a GPU it runs on its own CUDA stream."""

    def __init__(self, engine: Any) -> None:
        self.ctx = engine.context()
        self.names = [t["name"] for t in engine.inputs]
        self.stream = None
        if engine.device == "cuda":
            import torch
            self.stream = torch.cuda.Stream()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.stream is None:
            return self.ctx.run(feeds)
        import torch
        shapes = tuple(tuple(feeds[n].shape) for n in self.names)
        lock = CAPTURE.exclusive() if may_record(self.ctx.graphs, shapes) else CAPTURE.shared()
        with lock, torch.cuda.stream(self.stream):
            return self.ctx.run(feeds)
