"""The dynamic batcher: one bounded queue per model, merged batches, one worker per execution context.

Requests wait in arrival order. A free worker takes the oldest request and every later one with
the same merge key (the same shape past the batch axis) while the rows fit one profile and the
merge limit; it runs at once when the batch reaches the limit or a preferred size, else waits up
to the queue delay (counted from the oldest request's arrival) for more. Outputs are split back
by rows. A merged batch that fails is re-run one request at a time, so a request's error is its own.
Each request's inputs are copied once, straight into the instance's reusable batch buffer for that
batch shape (kiln.serve.instance); an input held in system shared memory is read once, on the worker
thread, straight into it. A lone request on a CPU instance runs where its arrays lie, without a copy.

With batch buckets (GPU engines), the batch a free instance takes at the delay's end is every compatible
queued request, run padded with zero rows up to the next bucket size when at least 3/4 of that size is
real rows (``PAD_FILL``); otherwise the longest prefix whose rows are a bucket size runs and the rest
wait for the next free instance. Padded rows never reach an answer.

A batch runs on its instance's own thread (one per execution context: the batch goes over in one
queue put, its results come back in one loop callback), except on a CPU engine when it is the only work the
batcher has (one request, nothing queued, no other batch running) and runs of its shape (rows
and merge key) took under ``INLINE_MAX_S``: then it runs on the event loop itself, which saves
the two thread hand-offs (to the instance's thread, and back through ``call_soon_threadsafe``) that would
cost more than the run. With ``inline_batches`` (the engine process of ``--frontends``, whose
loop has no protocol work to overlap with a run) any such short batch runs there while no other
batch runs. A GPU engine always runs on its thread (a first run at a shape records a CUDA graph).

A request is queued with ``submit`` and a callback that gets its outputs or its error once, on the
event loop (the engine process of ``--frontends`` answers from it, with no task per request);
``infer`` is the same as a coroutine. A callback submitted with ``borrow=True`` must copy what it keeps
before it returns: it may get views of an instance's output buffers, which the instance's next batch
overwrites; every other request gets outputs of its own.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Protocol

import numpy as np

from kiln.errors import KilnError
from kiln.serve.errors import BadRequest, DeadlineExceeded, InternalError, ServeError, Unavailable
from kiln.serve.metrics import ModelStats
from kiln.serve.model import ServedModel
from kiln.serve.shm import gather_into, materialize

log = logging.getLogger("kiln.serve")
INLINE_MAX_S = 0.0005          # longest recent run (per shape) that may block the event loop
RUN_TIMES = 64                 # shapes whose recent run time is remembered
COMPACT_AT = 1024              # deadline entries kept before those of finished requests are dropped
PAD_FILL = 0.75                # least share of real rows in a batch padded up to a bucket size


class Instance(Protocol):
    """One execution context of the model (with its CUDA stream on a GPU)."""

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(eq=False, slots=True, weakref_slot=True)
class Pending:
    """A queued request; ``done`` gets its outputs (a dict) or its error (a ServeError), once."""

    feeds: dict[str, Any]               # arrays, or ShmTensor inputs read when the batch runs
    rows: int
    key: tuple
    done: Callable[[Any], None]
    arrived: float = field(default_factory=time.monotonic)
    finished: bool = False
    queued: bool = True
    timeout_s: float | None = None
    borrows: bool = False               # ``done`` copies what it keeps before returning (see the module docstring)

    def finish(self, result: Any) -> None:
        if not self.finished:
            self.finished = True
            try:
                self.done(result)
            except Exception:                  # noqa: BLE001 - a bug in the caller's callback: not the batcher's
                log.exception("a request's answer callback failed")


class _Runner:
    """One instance's own thread: runs the calls handed to it in order, each result posted back to the loop."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """``fn(*args)`` on the thread; the future gets its result or its exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._calls.put((loop, future, fn, args))
        return future

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            loop, future, fn, args = item
            try:
                result = fn(*args)
            except BaseException as exc:       # noqa: BLE001 - handed to the waiting coroutine
                result = exc
            try:
                loop.call_soon_threadsafe(_settle, future, result)
            except RuntimeError:               # the loop is closed: no one is waiting
                pass

    def close(self) -> None:
        self._calls.put(None)
        self._thread.join()


def _settle(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


class Batcher:
    """Queues requests for one model and runs them, merged, on the model's execution contexts."""

    def __init__(self, model: ServedModel, instances: list[Instance], stats: ModelStats,
                 inline_batches: bool = False) -> None:
        self.model = model
        self.stats = stats
        opts = model.options
        self._merge = model.batch_axis and opts.batching and model.max_batch > 1
        self._delay = opts.max_queue_delay_us / 1e6
        self._preferred = sorted({p for p in opts.preferred_batch_sizes if p <= model.max_batch})
        self._queue: list[Pending] = []
        self._arrived = asyncio.Event()
        self._form_lock = asyncio.Lock()
        self._closed = False
        self._running = 0                           # batches being computed now
        self._inline = getattr(model.engine, "device", "cpu") != "cuda"
        self.inline_batches = inline_batches        # any short batch, not only a lone request, may run inline
        self._run_s: dict[tuple, float] = {}        # (rows, merge key) -> recent run time, seconds
        # requests' deadlines: a heap of (deadline, sequence number, weak reference), one loop timer at the earliest
        self._deadlines: list[tuple[float, int, weakref.ref]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._compact_at = COMPACT_AT
        self._seq = itertools.count()
        self._runners = [_Runner(f"kiln-serve-{model.name}-{k}") for k in range(len(instances))]
        self._workers = [asyncio.get_running_loop().create_task(self._worker(i, r))
                         for i, r in zip(instances, self._runners)]

    @property
    def depth(self) -> int:
        return len(self._queue)

    # ---- the caller's side -------------------------------------------------------------------
    async def infer(self, feeds: dict[str, Any], rows: int, key: tuple,
                    timeout_s: float | None) -> dict[str, np.ndarray]:
        """The outputs for one checked request; raises Unavailable when the queue is full or closed."""
        future = asyncio.get_running_loop().create_future()
        pending = self.submit(feeds, rows, key, timeout_s, partial(_settle, future))
        try:
            return await future
        finally:
            self.withdraw(pending)              # the caller went away: its queue slot is freed

    def submit(self, feeds: dict[str, Any], rows: int, key: tuple, timeout_s: float | None,
               done: Callable[[Any], None], borrow: bool = False) -> Pending:
        """Queues one checked request; ``done`` is called on the event loop with its outputs or error (with
        ``borrow``, outputs it must copy before returning). Raises Unavailable when the queue is full or closed."""
        name = self.model.name
        if self._closed:
            raise Unavailable(f"Model {name!r} is unloading or the server is shutting down; retry on another "
                              f"server or after it is loaded again.")
        if len(self._queue) >= self.model.options.max_queue:
            raise Unavailable(f"Model {name!r} has {len(self._queue)} requests queued, its limit (--max-queue); "
                              f"retry later, or serve it with more --instances or a larger --max-queue.")
        pending = Pending(feeds, rows, key, done, borrows=borrow)
        self._queue.append(pending)
        self.stats.queue_depth = len(self._queue)
        self._arrived.set()
        if timeout_s is not None:
            self._watch(pending, timeout_s)
        return pending

    def _watch(self, pending: Pending, timeout_s: float) -> None:
        """Fails ``pending`` at its deadline unless it has finished by then."""
        loop = asyncio.get_running_loop()
        pending.timeout_s = timeout_s
        deadline = loop.time() + timeout_s
        heap = self._deadlines
        if len(heap) >= self._compact_at:        # entries of finished requests go; amortized O(1) per request
            heap[:] = [e for e in heap if (p := e[2]()) is not None and not p.finished]
            heapq.heapify(heap)
            self._compact_at = max(COMPACT_AT, 2 * len(heap))
        heapq.heappush(heap, (deadline, next(self._seq), weakref.ref(pending)))
        if deadline < self._timer_at:
            self._arm(deadline)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = asyncio.get_running_loop().call_at(at, self._sweep), at

    def _sweep(self) -> None:
        """Fails every request whose deadline has passed; sets the timer for the next one."""
        self._timer, self._timer_at = None, math.inf
        heap, now = self._deadlines, asyncio.get_running_loop().time()
        while heap:
            deadline, _, ref = heap[0]
            p = ref()
            if p is not None and not p.finished:
                if deadline > now:
                    self._arm(deadline)
                    return
                self._expire(p, p.timeout_s or 0.0)
            heapq.heappop(heap)

    def cancel(self, pending: Pending, exc: BaseException) -> None:
        """Fails a request now (its queue slot is freed; a run it is part of finishes without it)."""
        pending.finish(exc)
        self.withdraw(pending)

    def withdraw(self, pending: Pending) -> None:
        """Drops a request without answering it (its caller went away), freeing its queue slot."""
        pending.finished = True
        if pending.queued:
            pending.queued = False
            self._queue.remove(pending)
            self.stats.queue_depth = len(self._queue)
            self._arrived.set()                  # a batch being formed around it looks again

    def _expire(self, pending: Pending, timeout_s: float) -> None:
        """The request's time is up: it fails."""
        self.cancel(pending, DeadlineExceeded(
            f"The request to model {self.model.name!r} did not finish within {timeout_s * 1e3:.0f} ms; give it a "
            f"longer timeout or lower the load."))

    def hurry(self) -> None:
        """Queued requests stop waiting for company: each runs with what is queued now (shutdown)."""
        self._delay = 0.0
        self._arrived.set()

    async def close(self) -> None:
        """Stops taking requests, finishes every queued one, then stops the workers."""
        self._closed = True
        self._arrived.set()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        for runner in self._runners:
            runner.close()

    # ---- the workers' side -------------------------------------------------------------------
    async def _worker(self, instance: Instance, runner: _Runner) -> None:
        while True:
            async with self._form_lock:
                batch = await self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            self.stats.queue_depth = len(self._queue)
            started = time.monotonic()
            for p in batch:
                self.stats.queue_seconds.observe(started - p.arrived)
            size = self._padded(sum(p.rows for p in batch), batch[0].key)
            shape = (size, batch[0].key)
            alone = len(batch) == 1 and not self._queue
            inline = (self._inline and not self._running and (alone or self.inline_batches)
                      and self._run_s.get(shape, INLINE_MAX_S) < INLINE_MAX_S)
            self._running += 1
            try:
                if inline:
                    results, ran = self._timed(instance, batch, size)
                else:
                    results, ran = await runner.call(self._timed, instance, batch, size)
                self._note_run(shape, ran)
            except Exception as exc:           # noqa: BLE001 - never leave a request waiting
                log.exception("model %s: batch failed", self.model.name)
                results = [InternalError(f"Model {self.model.name!r} failed on a batch ({type(exc).__name__}); "
                                         f"please report it.")] * len(batch)
            finally:
                self._running -= 1
            self.stats.compute_seconds.observe(time.monotonic() - started)
            self.stats.batch_size.observe(sum(max(p.rows, 1) for p in batch))
            for p, r in zip(batch, results):
                p.finish(r)

    def _note_run(self, shape: tuple, seconds: float) -> None:
        """Remembers how long a one-request run of this shape took (an average weighted to recent runs)."""
        if shape not in self._run_s and len(self._run_s) >= RUN_TIMES:
            self._run_s.clear()
        before = self._run_s.get(shape)
        self._run_s[shape] = seconds if before is None else 0.75 * before + 0.25 * seconds

    async def _next_batch(self) -> list[Pending] | None:
        while True:
            if not self._queue:
                if self._closed:
                    return None
                self._arrived.clear()
                await self._arrived.wait()
                continue
            head = self._queue[0]
            if not self._merge:
                return self._take([head])
            while not head.finished:
                group, ready = self._group(head)
                wait = head.arrived + self._delay - time.monotonic()
                if ready or wait <= 0 or self._closed:
                    return self._take(group if ready else self._bucket(group))
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), wait)
                except asyncio.TimeoutError:
                    pass

    def _group(self, head: Pending) -> tuple[list[Pending], bool]:
        """Compatible queued requests from ``head`` on, and whether they should run now (the merge limit
        or a preferred size reached)."""
        group, rows, sizes = [head], head.rows, [head.rows]
        if rows >= self.model.max_batch:
            return group, True
        for p in self._queue[1:]:
            if p.key == head.key and self.model.merged_fits(rows + p.rows, head.key):
                group.append(p)
                rows += p.rows
                sizes.append(rows)
                if rows >= self.model.max_batch:
                    return group, True
        for size in reversed(self._preferred):
            if size in sizes:
                return group[:sizes.index(size) + 1], True
        return group, False

    def _bucket(self, group: list[Pending]) -> list[Pending]:
        """The whole group when its rows fill at least ``PAD_FILL`` of the bucket size it is padded to, else the
        longest prefix whose rows are one of the model's bucket sizes (the head alone if none is)."""
        if not self.model.buckets:
            return group
        total = sum(p.rows for p in group)
        if total >= PAD_FILL * self._padded(total, group[0].key):
            return group
        rows, best = 0, 1
        for i, p in enumerate(group):
            rows += p.rows
            if rows in self.model.buckets:
                best = i + 1
        return group[:best]

    def _take(self, group: list[Pending]) -> list[Pending]:
        for p in group:
            p.queued = False
        self._queue = [p for p in self._queue if p.queued] if len(group) < len(self._queue) else []
        live = [p for p in group if not p.finished]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("model %s: batch of %d requests, %d rows, %d queued", self.model.name, len(live),
                      sum(p.rows for p in live), len(self._queue))
        return live

    def _padded(self, rows: int, key: tuple) -> int:
        """The rows a batch of ``rows`` real rows runs with: the smallest bucket size that holds them (and fits a
        profile), else ``rows``."""
        for size in self.model.buckets:
            if size >= rows:
                return size if size == rows or self.model.merged_fits(size, key) else rows
        return rows

    def _timed(self, instance: Instance, batch: list[Pending], size: int) -> tuple[list[Any], float]:
        """The batch's results and the seconds its run took where it ran (no thread hand-off counted)."""
        t0 = time.perf_counter()
        results = self._compute(instance, batch, size)
        return results, time.perf_counter() - t0

    def _compute(self, instance: Instance, batch: list[Pending], size: int) -> list[Any]:
        """Runs on a worker thread: one run of the batch copied into its buffer (``size`` rows, zero rows past
        the requests'), split by rows; one run per request if that fails. A lone request on an instance that
        is not staged runs on its own arrays."""
        if not batch:
            return []
        staged = getattr(instance, "staged", False)
        if len(batch) > 1 or staged or size != batch[0].rows:
            try:
                outs = self._run_merged(instance, batch, size)
                lent = getattr(instance, "reuses_outputs", False)
                if not self.model.batch_axis:          # one request (nothing merges): its outputs whole
                    return [{n: v if batch[0].borrows or not lent else np.array(v) for n, v in outs.items()}]
                if all(isinstance(v, np.ndarray) and v.ndim and v.shape[0] == size for v in outs.values()):
                    results, start = [], 0
                    for p in batch:
                        stop = start + p.rows
                        results.append({n: v[start:stop] if p.borrows or not lent else v[start:stop].copy()
                                        for n, v in outs.items()})
                        start = stop
                    return results
                log.warning("model %s: an output's first dimension is not the batch; running requests one by one",
                            self.model.name)
            except Exception as exc:           # noqa: BLE001 - isolate the request that caused it below
                log.debug("model %s: merged batch failed (%s); running its requests one by one",
                          self.model.name, exc)
        return [self._one(instance, p) for p in batch]

    def _run_merged(self, instance: Instance, batch: list[Pending], size: int) -> dict[str, Any]:
        """Copies the batch's inputs into the instance's buffer for this batch shape (a fresh one when the
        instance keeps none), zeroes the rows past the requests', and runs it."""
        first = batch[0].feeds                 # in the engine's input order, whatever order the request gave
        shapes = tuple((n, (size, *first[n].shape[1:]) if self.model.batch_axis else tuple(first[n].shape),
                        first[n].dtype) for n in self.model.input_names)
        take = getattr(instance, "buffers", None)
        held = take(shapes) if take is not None else None
        host = held.host if held is not None else {n: np.empty(s, d) for n, s, d in shapes}
        filled = held.filled if held is not None else size
        rows = 0
        for n, buf in host.items():
            rows = gather_into([p.feeds[n] for p in batch], buf)
            if filled > rows:
                buf[rows:filled] = 0
        if held is not None:
            held.filled = rows
            return instance.run_batch(held)
        return instance.run(host)

    def _one(self, instance: Instance, p: Pending) -> Any:
        try:
            return instance.run(materialize(p.feeds))
        except ServeError as exc:
            return exc
        except KilnError as exc:
            return BadRequest(str(exc))
        except Exception as exc:               # noqa: BLE001 - a bug: the request fails, the server stays up
            log.exception("model %s: inference failed", self.model.name)
            return InternalError(f"Model {self.model.name!r} failed on this request ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); please report it.")
