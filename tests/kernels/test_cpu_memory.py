"""kiln.kernels.cpu_memory, in fresh processes: once CPU work sets its thread count, a 24 MB tensor comes from the
heap (glibc's brk arena, /proc/self/maps) and stays there when freed, and a run of layers with 1 MB outputs reuses
memory without page faults (getrusage's minor faults); with the opt-out or glibc's own environment variables the
same tensor is mapped on its own, as glibc does by default."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource
import torch
from kiln.kernels import cpu_memory
from kiln.kernels.cpu_threads import use_threads
use_threads(1)
x = torch.randn(1 << 18)                    # 1 MB, above glibc's initial mmap threshold
def layers():
    # four element-wise layers, each output 1 MB, each input freed after its reader, as a plan runs them
    y = torch.add(x, 1.0)
    z = torch.tanh(y)
    del y
    w = torch.mul(z, 2.0)
    del z
    return torch.mul(w, w).sum()
def faults(n):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        layers()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
def heap():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            return tuple(int(v, 16) for v in line.split()[0].split("-"))
    return (0, 0)
faults(5)
big = torch.zeros(6 << 20)                  # 24 MB, touched: runs reusing it must not fault on its fresh pages
lo, hi = heap()
in_heap = lo <= big.data_ptr() < hi
del big
print(json.dumps({"kept": cpu_memory.keep_freed_memory(), "faults": faults(40), "in_heap": in_heap,
                  "heap_kept": heap()[1] >= hi}))
"""


def _run(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("KILN_CPU_KEEP_MEMORY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activations_are_reused_without_page_faults() -> None:
    kept = _run()
    if not kept["kept"]:
        pytest.skip("this libc has no mallopt (not glibc)")
    assert kept["in_heap"] and kept["heap_kept"], kept
    # 40 runs of four layers with 1 MB (256-page) outputs: on fresh pages that is 256+ faults per run; kept, at
    # most a one-time growth of the heap or two
    assert kept["faults"] <= 2 * 256, kept
    released = _run(KILN_CPU_KEEP_MEMORY="0")
    assert not released["kept"] and not released["in_heap"], released


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_environment_variables_are_left_to_glibc() -> None:
    assert not _run(MALLOC_TRIM_THRESHOLD_="131072")["kept"]
    assert not _run(MALLOC_MMAP_THRESHOLD_="131072")["kept"]
