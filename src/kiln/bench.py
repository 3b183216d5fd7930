"""`kiln bench`: trtexec's measurements for a Kiln engine.

Warm-up, then iterations (or a duration) of: host→device copy, GPU compute, device→host
copy, each timed with CUDA events (wall clock on the CPU). Prints latency percentiles,
throughput and the transfer/compute split; ``--profile`` times every layer (eager, one
event pair per layer) and ``--export-profile`` writes them as JSON for ``kiln view``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from kiln.errors import KilnError


def add_parser(sub) -> None:
    from kiln.cli_args import number, plugin_flag, shape_flags
    p = sub.add_parser("bench", help="measure an engine's latency and throughput (trtexec-style)",
                       description="Benchmark ENGINE: warm-up, then timed iterations; latency min/mean/median/p90/"
                                   "p95/p99, throughput, and host-to-device / compute / device-to-host split.")
    p.add_argument("engine", help="the .kiln engine file")
    shape_flags(p, help="input shapes (default: each profile's opt shape)")
    p.add_argument("--warmup", type=number(int, 0), default=20, metavar="N", help="untimed runs first (default 20)")
    p.add_argument("--iterations", type=number(int, 1), default=200, metavar="N", help="timed runs (default 200)")
    p.add_argument("--duration", type=number(float, 0, above=True), metavar="S",
                   help="run for S seconds instead of --iterations")
    p.add_argument("--no-data-transfers", action="store_true", help="time GPU compute only (inputs stay on device)")
    p.add_argument("--no-cuda-graph", action="store_true", help="run layer by layer instead of replaying a CUDA graph")
    p.add_argument("--profile", action="store_true", help="print per-layer times")
    p.add_argument("--export-profile", metavar="FILE.json", help="write per-layer times as JSON (for kiln view)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    plugin_flag(p)
    p.set_defaults(func=cmd_bench)


def _pct(a, q: float) -> float:
    import numpy as np
    return float(np.percentile(a, q)) if a.size else float("nan")


def bench(engine, shapes: dict[str, tuple[int, ...]] | None = None, warmup: int = 20, iterations: int = 200,
          duration: float | None = None, transfers: bool = True, cuda_graph: bool = True,
          progress: bool = False) -> dict[str, Any]:
    import numpy as np
    import torch

    from kiln.cli import _default_shape, _random
    from kiln.kernels._util import from_numpy
    if duration is not None and not duration > 0:
        raise KilnError(f"duration must be a positive number of seconds, got {duration!r}.")
    if iterations < 1 or warmup < 0:
        raise KilnError(f"iterations must be at least 1 and warmup at least 0; got {iterations}, {warmup}.")
    shapes = shapes or {}
    rng = np.random.default_rng(0)
    host = []
    for spec in engine.inputs:
        shape = shapes[spec["name"]] if spec["name"] in shapes else _default_shape(engine, spec)
        host.append(from_numpy(_random(rng, spec["dtype"], shape)))         # 0-d stays 0-d
    ctx = engine.context(cuda_graph=cuda_graph)
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


def cmd_bench(args: argparse.Namespace) -> int:
    import kiln
    from kiln.cli import _load_plugins
    from kiln.cli_args import check_output_file, parse_shapes
    shapes = parse_shapes(args.shapes, "--shapes")
    if args.export_profile:
        check_output_file(args.export_profile, "--export-profile", keep=[args.engine])
    _load_plugins(args.plugins)
    engine = kiln.load(args.engine)
    res = bench(engine, shapes, args.warmup, args.iterations, args.duration,
                not args.no_data_transfers, not args.no_cuda_graph, progress=True)
    ctx, inputs = res.pop("_ctx"), res.pop("_inputs")
    rows = None
    if args.profile or args.export_profile:
        rows = ctx.profile(inputs)
        res["profile_total_ms"] = sum(r["ms"] for r in rows)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        lat = res["latency_ms"]
        print(f"Engine: {args.engine} on {res['device']} ({res['precision']}), shapes "
              + ", ".join(f"{k}={'x'.join(map(str, v)) or 'scalar'}" for k, v in res["shapes"].items()))
        mode = "CUDA graph replay" if res["cuda_graph"] else "eager"
        print(f"Mode: {mode}, {res['iterations']} iterations, "
              f"{'with' if res['transfers'] else 'without'} host/device transfers")
        print(f"Latency (ms): min {lat['min']:.4f}  mean {lat['mean']:.4f}  median {lat['median']:.4f}  "
              f"p90 {lat['p90']:.4f}  p95 {lat['p95']:.4f}  p99 {lat['p99']:.4f}  max {lat['max']:.4f}")
        print(f"Throughput: {res['throughput_qps']:.1f} qps, {res['throughput_items_per_s']:.1f} items/s")
        if "split_ms_median" in res:
            sp = res["split_ms_median"]
            print(f"Split (median ms): host-to-device {sp['h2d']:.4f}  GPU compute {sp['compute']:.4f}  "
                  f"device-to-host {sp['d2h']:.4f}")
    if rows is not None and args.profile and not args.json:
        print(f"\nPer-layer times (eager, one event pair per layer; total {res['profile_total_ms']:.3f} ms):")
        print(f"  {'layer':<40} {'kind':<15} {'tactic':<14} {'precision':<18} {'ms':>9} {'%':>6}")
        for r in sorted(rows, key=lambda r: -r["ms"]):
            print(f"  {r['name'][:40]:<40} {r['kind']:<15} {str(r['tactic']):<14} {str(r['precision']):<18} "
                  f"{r['ms']:9.4f} {r['percent']:6.2f}")
    if args.export_profile:
        with open(args.export_profile, "w") as f:
            json.dump({"device": res["device"], "engine": args.engine, "total_ms": res["profile_total_ms"],
                       "latency_ms": res["latency_ms"], "layers": rows}, f, indent=1)
        print(f"wrote {args.export_profile}")
    return 0
