"""kiln.kernels.cpu_memory: once CPU work sets its thread count, a freed 1 MB activation is reused without page
faults (counted by the kernel: getrusage's minor faults, in a fresh process); the opt-out and glibc's own
environment variables leave glibc's thresholds alone."""
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
faults(5)
print(json.dumps({"kept": cpu_memory.keep_freed_memory(), "faults": faults(40)}))
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
    released = _run(KILN_CPU_KEEP_MEMORY="0")
    assert not released["kept"]
    # 40 runs of 1 MB (256-page) outputs: thousands of faults where glibc returns the memory, ~none when kept
    assert released["faults"] > 40 * 50, released
    assert kept["faults"] < 40 * 5, kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_environment_variables_are_left_to_glibc() -> None:
    assert not _run(MALLOC_TRIM_THRESHOLD_="131072")["kept"]
    assert not _run(MALLOC_MMAP_THRESHOLD_="131072")["kept"]
