"""trtexec's measurements for a Kiln engine (the `kiln bench` command is kiln/cli/bench.py).

Warm-up, then iterations (or a duration) of: host→device copy, GPU compute, device→host
copy, each timed with CUDA events (wall clock on the CPU): latency percentiles, throughput
and the transfer/compute split.
"""
from __future__ import annotations

import sys
import time
from typing import Any

from kiln.errors import KilnError


def _pct(a, q: float) -> float:
    import numpy as np
    return float(np.percentile(a, q)) if a.size else float("nan")


def bench(engine, shapes: dict[str, tuple[int, ...]] | None = None, warmup: int = 20, iterations: int = 200,
          duration: float | None = None, transfers: bool = True, cuda_graph: bool = True,
          progress: bool = False, context=None) -> dict[str, Any]:
    """Measure ``engine`` at ``shapes`` (each input's opt shape where not given). ``context``: an
    ExecutionContext of the engine to run in (a sweep over shapes reuses one); default a new one."""
    import numpy as np
    import torch

    from kiln.runtime.inputs import default_shape, random_input
    from kiln.ir.dtypes import from_numpy
    if duration is not None and not duration > 0:
        raise KilnError(f"duration must be a positive number of seconds, got {duration!r}.")
    if iterations < 1 or warmup < 0:
        raise KilnError(f"iterations must be at least 1 and warmup at least 0; got {iterations}, {warmup}.")
    shapes = shapes or {}
    names = [spec["name"] for spec in engine.inputs]
    unknown = [n for n in shapes if n not in names]
    if unknown:
        raise KilnError(f"A shape is given for {unknown[0]!r}, which is not an input of this engine; its inputs are "
                        f"{names}.")
    rng = np.random.default_rng(0)
    host = []
    for spec in engine.inputs:
        shape = shapes[spec["name"]] if spec["name"] in shapes else default_shape(engine, spec)
        host.append(from_numpy(random_input(rng, spec["dtype"], shape)))         # 0-d stays 0-d
    ctx = context if context is not None else engine.context(cuda_graph=cuda_graph)
    for spec, a in zip(engine.inputs, host):
        ctx._check(spec["name"], a)
    cuda = engine.device == "cuda"
    batch = host[0].shape[0] if host and host[0].dim() else 1
    if cuda:
        pinned = [a.pin_memory() for a in host]
        dev = [p.to("cuda") for p in pinned]
    else:
        dev = host
    out_host = None
    for _ in range(max(1, warmup)):
        outs = ctx.execute(dev)
    if cuda:
        torch.cuda.synchronize()
        out_host = [torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in outs]
    lat, h2d, comp, d2h = [], [], [], []
    t_start = time.perf_counter()
    i = 0
    bar = _Bar(progress, iterations if duration is None else None, duration)
    while (duration is None and i < iterations) or (duration is not None and time.perf_counter() - t_start < duration):
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            ev[0].record()
            if transfers:
                for d, p in zip(dev, pinned):
                    d.copy_(p, non_blocking=True)
            ev[1].record()
            outs = ctx.execute(dev)
            ev[2].record()
            if transfers:
                for h, o in zip(out_host, outs):
                    h.copy_(o, non_blocking=True)
            ev[3].record()
            ev[3].synchronize()
            h2d.append(ev[0].elapsed_time(ev[1]))
            comp.append(ev[1].elapsed_time(ev[2]))
            d2h.append(ev[2].elapsed_time(ev[3]))
            lat.append(ev[0].elapsed_time(ev[3]) if transfers else ev[1].elapsed_time(ev[2]))
        else:
            t0 = time.perf_counter()
            ctx.execute(dev)
            ms = (time.perf_counter() - t0) * 1e3
            comp.append(ms)
            lat.append(ms)
        i += 1
        bar(i, time.perf_counter() - t_start)
    bar.done()
    a = np.asarray(lat)
    res = {"engine": engine.path, "device": engine.header["device"]["name"], "precision": engine.precision,
           "shapes": {s["name"]: list(h.shape) for s, h in zip(engine.inputs, host)}, "iterations": len(lat),
           "cuda_graph": ctx.graphs is not None, "transfers": transfers and cuda,
           "latency_ms": {"min": float(a.min()), "mean": float(a.mean()), "median": float(np.median(a)),
                          "p90": _pct(a, 90), "p95": _pct(a, 95), "p99": _pct(a, 99), "max": float(a.max())},
           "throughput_qps": 1e3 / float(np.median(a)), "throughput_items_per_s": batch * 1e3 / float(np.median(a))}
    if cuda:
        res["split_ms_median"] = {"h2d": float(np.median(h2d)), "compute": float(np.median(comp)),
                                  "d2h": float(np.median(d2h))}
    res["_ctx"] = ctx
    res["_inputs"] = dev
    return res


class _Bar:
    def __init__(self, enabled: bool, total: int | None, duration: float | None) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total, self.duration = total, duration
        self.last = 0.0

    def __call__(self, i: int, elapsed: float) -> None:
        if not self.enabled or elapsed - self.last < 0.1:
            return
        self.last = elapsed
        frac = i / self.total if self.total else min(1.0, elapsed / (self.duration or 1))
        n = int(frac * 30)
        sys.stderr.write(f"\r[{'#' * n}{'-' * (30 - n)}] {i} runs {elapsed:5.1f}s")

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")

