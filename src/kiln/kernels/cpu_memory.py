"""Freed host memory stays in the process (glibc), so a CPU engine's activations reuse it without page faults.

Each layer of a CPU engine allocates its output afresh. glibc serves an allocation above its mmap threshold
(128 KB at start, raised as such blocks are freed) with a new mapping and returns freed memory at the heap's
top to the system past its trim threshold, so a run's large activations touch fresh pages, and every first
touch of a page is a page fault (costly in a VM; docs/cpu.md has the measurement). ``keep_freed_memory()``
sets the mmap threshold to glibc's largest (32 MB) and the trim threshold to 1 GB with ``mallopt``: blocks
below 32 MB come from the heap, and freed memory is kept for the next run, so a process's resident memory
stays near its peak. It runs once per process, when CPU work first sets its thread count
(kiln.kernels.cpu_threads.use_threads: builds and runs). It changes nothing
where libc has no ``mallopt`` (not glibc), where the process set either threshold itself through glibc's
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables, or with
``KILN_CPU_KEEP_MEMORY=0``.
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1           # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20       # glibc's largest mmap threshold on 64-bit systems
TRIM_THRESHOLD = 1 << 30
OPT_OUT = "KILN_CPU_KEEP_MEMORY"

_state: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Set glibc's thresholds as the module docstring says (once per process); whether they are set."""
    done = _state.get("set")
    if done is not None:
        return done
    _state["set"] = ok = _apply()
    return ok


def _apply() -> bool:
    if os.environ.get(OPT_OUT, "1").strip() == "0":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
