"""Structural verification of a Network, before any build work; the memory a tensor needs and the
memory this machine has free."""
from __future__ import annotations

import os
from typing import Sequence

from kiln.errors import NetworkError
from kiln.ir.layers import LAYER_KINDS
from kiln.ir.network import Network, subgraphs


def verify(net: Network) -> None:
    """Raise NetworkError naming the first inconsistency; fix-it hints in the message."""
    if not net.outputs:
        raise NetworkError(f"Network {net.name!r} has no outputs; mark at least one with network.mark_output(tensor).")
    produced = {id(t) for t in net.inputs} | {id(t) for t in net.tensors.values() if t.is_constant}
    net.toposort()
    for layer in net.layers:
        spec = LAYER_KINDS.get(layer.kind)
        if spec is None:
            raise NetworkError(f"Layer {layer.name!r} has unknown kind {layer.kind!r}.")
        for t in layer.inputs:
            if t is None:
                continue
            if id(t) not in produced and t.producer is None and t.network is net:
                raise NetworkError(f"Layer {layer.name!r} ({layer.kind}) reads {t.name!r}, which is neither a network "
                                   f"input, a constant nor any layer's output.")
        for t in layer.outputs:
            produced.add(id(t))
        for g in subgraphs(layer):
            if g.outer is None:
                g.outer = net
            _verify_sub(g)
    for t in net.outputs:
        if id(t) not in produced and t.producer is None and not t.is_constant and t not in net.inputs:
            raise NetworkError(f"Output {t.name!r} is produced by no layer; mark a layer's output instead.")


def _verify_sub(g: Network) -> None:
    for layer in g.layers:
        for sg in subgraphs(layer):
            if sg.outer is None:
                sg.outer = g
            _verify_sub(sg)


def host_memory() -> int:
    """Bytes of memory this process can still get: the kernel's MemAvailable (or free pages), or what
    is left under a cgroup (container) limit where that is more (a VM whose memory grows as it is used
    reports little available at first)."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            try:
                free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                return 1 << 62          # unknown: do not refuse on memory grounds
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            free = max(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def nbytes(dims: Sequence[int], itemsize: int) -> int:
    """Bytes of a dense tensor of these dims (Python integers: no overflow)."""
    n = itemsize
    for d in dims:
        n *= int(d)
    return n


def fmt_bytes(n: int) -> str:
    """``n`` bytes in words: 3.2 GB, 1.5 TB, 2.0e+12 TB."""
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.1f} {unit}" if v < 1e6 else f"{v:.1e} {unit}"
    return f"{n} bytes"
