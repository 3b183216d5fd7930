"""An execution context as the batcher runs it: its own CUDA stream on a GPU, no run beside a capture, and
its reusable batch buffers.

A GPU context records a CUDA graph the first time it meets an input shape (and once more to bind its
input buffers). Recording in CUDA's global capture mode forbids other threads' synchronizing calls, so
a run that may record holds the process-wide capture lock alone; runs that replay share it.

Batch buffers. Each instance keeps, per batch shape (every input's shape and dtype), the host arrays a
batch is copied into, request by request, straight from the requests' slots or payloads. A GPU instance
("staged") also keeps, per shape, pinned host input buffers, device input buffers and pinned host output
buffers: a run copies the inputs to the device asynchronously on the instance's stream, runs on the same
device buffers every time (so the CUDA graph recorded for them reads them in place), copies the outputs
back into the pinned output buffers and waits on a blocking event (the thread sleeps rather than spins).
The outputs it returns are views of those buffers, valid until the instance's next run. An instance runs
one batch at a time, so no two batches share a buffer; two instances never share one. The buffers of at
most ``BUFFER_SHAPES`` shapes are kept, and at most ``BUFFER_BYTES`` of host memory: beyond either, the
least recently used shape's buffers are dropped (a shape larger than the byte limit alone is still run,
with buffers kept until the next shape comes).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import numpy as np

BUFFER_SHAPES = 16              # batch shapes whose buffers one instance keeps (the CUDA graph cache's default)
BUFFER_BYTES = 512 << 20        # host bytes one instance's batch buffers may hold
# dtypes whose host buffers numpy and torch share one to one (a staged run needs them for every input and output)
STAGED_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"})


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


def may_record(graphs: Any, shapes: tuple[tuple[int, ...], ...], where: tuple | None = None) -> bool:
    """Whether running these input shapes on a context with CUDA graph runner ``graphs`` can record a graph:
    no graph for them yet, or its input-bound graph not recorded yet, or (``where``: the device inputs'
    addresses as the runner keys them) bound to other addresses than these."""
    if graphs is None:
        return False
    try:
        for key, entry in list(graphs.graphs.items()):
            if tuple(tuple(s) for s, _ in key) == shapes:
                bound = entry.get("bound")
                return bound is None or (where is not None and bound.get("where") != where)
    except (AttributeError, TypeError, ValueError):   # a runner laid out otherwise: assume it may record
        return True
    return True


class Buffers:
    """One batch shape's buffers on one instance: ``host`` (name -> array) is what a batch is copied into;
    ``filled`` counts the rows past which ``host`` holds zeros; ``nbytes`` counts host inputs and outputs."""

    __slots__ = ("host", "filled", "nbytes", "host_t", "device", "out", "out_t")

    def __init__(self, host: dict[str, np.ndarray], host_t: list | None = None, device: list | None = None) -> None:
        self.host, self.host_t, self.device = host, host_t, device
        self.filled = 0
        self.nbytes = sum(a.nbytes for a in host.values())
        self.out: dict[str, np.ndarray] | None = None
        self.out_t: list | None = None


class EngineInstance:
    """One execution context of an engine; on a GPU it runs on its own CUDA stream.

    ``staged`` (default: on for a CUDA engine whose inputs and outputs are all plain numeric dtypes) runs
    batches through pinned host and fixed device buffers (see the module docstring); a CPU engine may be
    staged too (no pinning, no stream), which is how the tests exercise that path."""

    def __init__(self, engine: Any, staged: bool | None = None) -> None:
        self.ctx = engine.context()
        self.names = [t["name"] for t in engine.inputs]
        self.out_names = [t["name"] for t in engine.outputs]
        self.stream = self._done = None
        self.cuda = engine.device == "cuda"
        plain = all(t["dtype"] in STAGED_DTYPES for t in [*engine.inputs, *engine.outputs])
        self.staged = bool(self.cuda if staged is None else staged) and plain
        self.reuses_outputs = self.staged           # run_batch's outputs are views of buffers reused next run
        self._buffers: dict[tuple, Buffers] = {}    # least recently used first
        self._bytes = 0
        if self.cuda:
            import torch
            self.stream = torch.cuda.Stream()
            self._done = torch.cuda.Event(blocking=True)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.stream is None:
            return self.ctx.run(feeds)
        import torch
        shapes = tuple(tuple(feeds[n].shape) for n in self.names)
        lock = CAPTURE.exclusive() if may_record(self.ctx.graphs, shapes) else CAPTURE.shared()
        with lock, torch.cuda.stream(self.stream):
            return self.ctx.run(feeds)

    # ---- batch buffers ------------------------------------------------------------------
    def buffers(self, shapes: tuple[tuple[str, tuple[int, ...], np.dtype], ...]) -> Buffers:
        """The buffers for a batch of these (name, shape, dtype) inputs, in the engine's input order."""
        held = self._buffers.pop(shapes, None)
        if held is None:
            held = self._new(shapes)
        self._buffers[shapes] = held                 # now the most recently used
        return held

    def _new(self, shapes: tuple[tuple[str, tuple[int, ...], np.dtype], ...]) -> Buffers:
        """New buffers for these inputs, after dropping the least recently used sets over the limits. On a GPU
        this holds the capture lock shared: allocating and freeing device or pinned memory while another
        thread records a graph would break that recording."""
        want = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in shapes)
        with CAPTURE.shared() if self.cuda else nullcontext():
            while self._buffers and (len(self._buffers) >= BUFFER_SHAPES or self._bytes + want > BUFFER_BYTES):
                self._drop(next(iter(self._buffers)))
            if not self.staged:
                held = Buffers({n: np.zeros(s, d) for n, s, d in shapes})
            else:
                import torch
                host_t = [torch.zeros(s, dtype=_torch_dtype(d), pin_memory=self.cuda) for _, s, d in shapes]
                device = [torch.empty(s, dtype=t.dtype, device=self.ctx.engine.device) for (_, s, _), t
                          in zip(shapes, host_t)]
                held = Buffers({n: t.numpy() for (n, _, _), t in zip(shapes, host_t)}, host_t, device)
        self._bytes += held.nbytes
        return held

    def _drop(self, key: tuple) -> None:
        held = self._buffers.pop(key)
        self._bytes -= held.nbytes

    def run_batch(self, held: Buffers) -> dict[str, np.ndarray]:
        """Runs the batch in ``held.host``. Staged: the outputs are views of ``held``'s output buffers, valid
        until this instance's next run; otherwise arrays of their own."""
        if not self.staged:
            return self.run(held.host)
        import torch
        shapes = tuple(tuple(t.shape) for t in held.device)
        where = tuple((t.data_ptr(), t.stride(), t.device) for t in held.device)     # as the graph runner keys them
        lock = CAPTURE.exclusive() if may_record(self.ctx.graphs, shapes, where) else CAPTURE.shared()
        with lock, (torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()):
            for dev, host in zip(held.device, held.host_t):
                dev.copy_(host, non_blocking=True)
            outs = self.ctx.execute(held.device)
            if held.out_t is None or any(h.shape != o.shape or h.dtype != o.dtype for h, o in zip(held.out_t, outs)):
                before = sum(a.nbytes for a in (held.out or {}).values())
                held.out_t = [torch.empty(o.shape, dtype=o.dtype, pin_memory=self.cuda) for o in outs]
                held.out = {n: t.numpy() for n, t in zip(self.out_names, held.out_t)}
                grown = sum(a.nbytes for a in held.out.values()) - before
                held.nbytes += grown
                self._bytes += grown
            for host, out in zip(held.out_t, outs):
                host.copy_(out, non_blocking=True)
            if self._done is not None:
                self._done.record(self.stream)
                self._done.synchronize()
        return held.out

    def warm(self, feeds: dict[str, np.ndarray]) -> None:
        """Runs these feeds twice through the batch buffers of their shape: the second run of a GPU engine
        records the CUDA graph bound to those buffers."""
        held = self.buffers(tuple((n, tuple(feeds[n].shape), feeds[n].dtype) for n in self.names))
        for n in self.names:
            held.host[n][...] = feeds[n]
        held.filled = max((a.shape[0] for a in held.host.values() if a.ndim), default=0)
        for _ in range(2):
            self.run_batch(held)


def _torch_dtype(dt: np.dtype) -> Any:
    import torch
    return torch.from_numpy(np.empty(0, dt)).dtype
