"""The thread count a CPU engine runs on by default, chosen at build by timing the engine.

Every torch CPU kernel of a run is a parallel region: on a small model (an audio VAD step, a byte classifier)
the threads' start and join cost more than the work they share, and on a machine whose other cores are busy
each join waits for a descheduled thread. The build times the finished engine on one thread and on all usable
cores and records the faster in the header (``build.cpu_threads``); contexts use it unless a thread count is
given (``ctx``'s ``threads``, ``--threads``). Engines whose single run already takes longer than ``LONG_RUN_S``
skip the measurement (their layers are big enough to share) and run on all usable cores.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

LONG_RUN_S = 0.05       # a run at least this long: no measurement, all cores
ROUNDS, BLOCK = 3, 5     # timed runs per thread count: ROUNDS blocks of BLOCK runs, alternating
BUDGET_S = 0.5          # no further round once the measurement has taken this long
ONE_THREAD_MARGIN = 1.10    # all cores must beat one thread by more than this factor to be chosen
MIN_SAVING_S = 20e-6        # and save at least this much per run (timing noise on microsecond runs)


def _zeros(engine: Any) -> dict[str, np.ndarray] | None:
    """Zero inputs at the first profile's opt shapes (static inputs at their shapes); None for inputs
    that zeros cannot stand for (strings, sequences)."""
    from kiln.errors import KilnError
    from kiln.ir.dtypes import is_container, np_dtype
    profile = engine.profiles[0] if engine.profiles else {}
    feeds = {}
    for spec in engine.inputs:
        name, shape, dtype = spec["name"], spec.get("shape") or [], spec.get("dtype")
        dims = profile[name]["opt"] if name in profile else shape
        if dtype == "string" or not isinstance(dtype, str) or is_container(dtype) or \
                any(not isinstance(d, int) for d in dims):
            return None
        try:
            feeds[name] = np.zeros(dims, np_dtype(dtype))
        except (KilnError, KeyError, TypeError, ValueError):
            return None
    return feeds


def choose_threads(engine: Any, cores: int) -> int | None:
    """1 or ``cores``: the thread count on which ``engine`` (a CPU engine) ran faster on zero inputs, one thread
    winning unless all cores save more than ONE_THREAD_MARGIN and MIN_SAVING_S; None where there is nothing to
    choose (one core, a long run, inputs zeros cannot stand for, a run that fails on zeros)."""
    if cores <= 1:
        return None
    feeds = _zeros(engine)
    if feeds is None:
        return None
    import torch

    from kiln.kernels.cpu_threads import use_threads
    times: dict[int, list[float]] = {1: [], cores: []}
    before = torch.get_num_threads()
    try:
        contexts = {n: engine.context(threads=n) for n in times}
        for ctx in contexts.values():           # one warm run each (first-run allocations)
            start = time.perf_counter()
            ctx.run(feeds)
            if time.perf_counter() - start > LONG_RUN_S:
                return None
        deadline = time.perf_counter() + BUDGET_S
        for r in range(ROUNDS):         # blocks of runs, alternating: a thread-count switch per block only
            if r and time.perf_counter() > deadline:
                break
            for n, ctx in contexts.items():
                for _ in range(BLOCK):
                    start = time.perf_counter()
                    ctx.run(feeds)
                    times[n].append(time.perf_counter() - start)
    except Exception:               # noqa: BLE001 - zeros are not every model's input: keep the default
        return None
    finally:
        use_threads(before)
    one, many = statistics.median(times[1]), statistics.median(times[cores])
    return cores if many * ONE_THREAD_MARGIN < one and one - many > MIN_SAVING_S else 1
