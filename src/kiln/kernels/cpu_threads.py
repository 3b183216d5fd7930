"""How many threads CPU engines run on: by default the physical cores this process may use.

Hyper-threads share one core's vector units, and threads beyond the cores a process may use (its
CPU affinity, a container's CPU quota) make every parallel region wait for descheduled threads.
The default counts distinct physical cores among the CPUs in the affinity mask, capped by a
cgroup CPU quota. Whatever the count, layers that are not faster on it run on one thread: a build on more than one
thread measures that per layer (kiln.builder.tactics.select_threads); otherwise small GEMM-like layers do
(``layer_threads``). The runtime switches around them (kiln.runtime.slots).
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path

from kiln.errors import KilnError

_SYS_CPU = Path("/sys/devices/system/cpu")
_CGROUP = Path("/sys/fs/cgroup")
_override: int | None = None


def check_threads(n: object, what: str = "threads") -> int:
    """``n`` as a thread count (an integer of at least 1), or a one-line KilnError."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise KilnError(f"{what} must be a whole number of at least 1, got {n!r}; leave it unset for the "
                        f"physical cores this process may use ({default_threads()}).")
    return n


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _physical_cores(cpus: set[int], sys_cpu: Path) -> int | None:
    """Distinct (package, core) pairs among ``cpus`` from sysfs topology; None where it is unreadable."""
    cores = set()
    for cpu in cpus:
        topo = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return None
    return len(cores) or None


def _cgroup_quota(root: Path) -> float | None:
    """CPUs allowed by a cgroup v2 (cpu.max) or v1 (cpu.cfs_quota_us) quota; None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores(cpus: set[int] | None = None, sys_cpu: Path = _SYS_CPU, cgroup: Path = _CGROUP) -> int:
    """Physical cores among the CPUs this process may run on, capped by its CPU quota (at least 1).

    Without sysfs topology: psutil's physical/logical ratio applied to the affinity mask, else half
    the logical CPUs (two hyper-threads per core)."""
    cpus = _affinity() if cpus is None else cpus
    cores = _physical_cores(cpus, sys_cpu)
    if cores is None:
        try:
            import psutil
            physical, logical = psutil.cpu_count(logical=False), psutil.cpu_count(logical=True)
            per_core = max(1, round(logical / physical)) if physical and logical else 2
        except ImportError:
            per_core = 2
        cores = max(1, len(cpus) // per_core)
    quota = _cgroup_quota(cgroup)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


@functools.lru_cache(maxsize=1)
def _detected() -> int:
    return usable_cores()


def default_threads(engine_choice: int | None = None) -> int:
    """The thread count CPU engines use when none is given: set_default_threads's, else the engine's own
    (``engine_choice``, chosen at its build; at most usable_cores()), else usable_cores()."""
    if _override is not None:
        return _override
    return min(engine_choice, _detected()) if engine_choice else _detected()


def threads_overridden() -> bool:
    """Whether set_default_threads fixed the thread count for this process (``--threads``)."""
    return _override is not None


def set_default_threads(n: int | None) -> None:
    """Make ``n`` threads the process-wide default for CPU engines (None: back to usable_cores()),
    and use it now, so a build that follows times its tactics on the same thread count."""
    global _override
    _override = None if n is None else check_threads(n)
    use_threads(default_threads())


# A convolution, matrix product or RNN of fewer FLOPs than this runs on one thread whatever the engine's count:
# MKL and oneDNN split even one-row GEMMs; at this size a second thread saves nothing on an idle core and
# costs a wait for a descheduled thread on a busy machine.
SMALL_LAYER_FLOPS = 1 << 21
# Simple layers (element-wise, views, data movement) whose outputs each hold fewer elements than this are not
# split by ATen (its grain size), so they run alike on any count.
SERIAL_ELEMENTS = 32768

ONE, ANY, ALL = "one", "any", "all"      # layer_threads: one thread, any count, the engine's count
SHAPE = "shape"         # a GEMM-like layer without static shapes: layer_threads on each new input shape at run time

_GEMM_LIKE = frozenset(("Convolution", "Deconvolution", "FullyConnected", "MatMul", "Gemm", "RNN"))
_SIMPLE = frozenset(("Activation", "ElementWise", "Unary", "Pointwise", "Cast", "Scale", "Shuffle", "Slice",
                     "Squeeze", "Unsqueeze", "Flatten", "Identity", "Concatenation", "Padding", "Gather", "Shape",
                     "Size", "Select", "Where", "Expand", "Split", "SoftMax", "Reduce", "ShapeConstant", "Tile"))


def layer_flops(kind: str, ins: list[tuple[int, ...] | None], outs: list[tuple[int, ...]]) -> int | None:
    """Multiply-adds ×2 of a GEMM-like layer from its static input and output shapes (None: another kind)."""
    size = lambda shape: math.prod(shape) if shape is not None else 0      # noqa: E731
    if kind not in _GEMM_LIKE or len(ins) < 2 or ins[0] is None or ins[1] is None or not outs:
        return None
    x, w = ins[0], ins[1]
    if kind == "Convolution":
        return 2 * size(outs[0]) * size(w[1:])                    # w: [Cout, Cin/groups, *kernel]
    if kind == "Deconvolution":
        return 2 * size(x) * size(w[1:])                          # w: [Cin, Cout/groups, *kernel]
    if kind == "RNN":
        steps = x[0] * x[1] if len(x) == 3 else size(x)           # X: [T, N, I]
        return 2 * steps * (size(w) + (size(ins[2]) if len(ins) > 2 else 0))
    out = size(outs[0])                                           # M·N; the inner size K from M·K · K·N / M·N
    return 2 * out * math.isqrt(size(x) * size(w) // out) if out else 0


def gemm_like(kind: str) -> bool:
    """Whether ``layer_flops`` counts this layer kind."""
    return kind in _GEMM_LIKE


def layer_threads(kind: str, ins: list[tuple[int, ...] | None], outs: list[tuple[int, ...]]) -> str:
    """How many threads a CPU layer with these static shapes (None: an absent input) should run on: ONE (a
    GEMM-like layer under SMALL_LAYER_FLOPS), ANY (a simple layer under SERIAL_ELEMENTS per output), else ALL."""
    flops = layer_flops(kind, ins, outs)
    if flops is not None:
        return ONE if flops < SMALL_LAYER_FLOPS else ALL
    if kind in _SIMPLE and all(math.prod(o) < SERIAL_ELEMENTS for o in outs):
        return ANY
    return ALL


def use_threads(n: int) -> None:
    """Run torch's CPU kernels (oneDNN, MKL, ATen) on ``n`` threads from now on (and, once per process,
    keep freed host memory for reuse: kiln.kernels.cpu_memory)."""
    if _threads is None:
        _bind_torch()
    get, set_ = _threads
    if get() != n:
        set_(n)
    if not _memory_kept:
        _keep_memory()


_memory_kept = False
_threads = None         # torch's (get_num_threads, set_num_threads), bound at the first use_threads (torch loads lazily)


def _bind_torch() -> None:
    global _threads
    import torch
    _threads = (torch.get_num_threads, torch.set_num_threads)


def _keep_memory() -> None:
    global _memory_kept
    from kiln.kernels.cpu_memory import keep_freed_memory
    keep_freed_memory()
    _memory_kept = True
