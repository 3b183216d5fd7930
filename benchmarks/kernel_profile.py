"""Kernel-level comparison: which GPU kernels Kiln's engine runs for a zoo model, against torch.compile's.

Usage (GPU machine): python benchmarks/kernel_profile.py vit_b_16 32 [--no-compile]
Prints, for each side, GPU time by kernel name (summed over one forward), the kernel count, and the
total — the numbers to read before choosing what to fuse next.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402


def kernels(fn, reps: int = 5) -> tuple[dict[str, tuple[float, int]], float]:
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    agg: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            agg[ev.name][0] += ev.device_time / 1e3 / reps
            agg[ev.name][1] += 1 / reps
    total = sum(v[0] for v in agg.values())
    return {k: (v[0], round(v[1])) for k, v in agg.items()}, total


def timeline(fn) -> None:
    """Every GPU activity of one call in order, with the idle time before it (replayed graphs included)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    if not evs:
        print("no GPU activity recorded")
        return
    end, busy, idle = evs[0].time_range.start, 0.0, 0.0
    for i, e in enumerate(evs):
        gap = max(0.0, e.time_range.start - end) if i else 0.0
        dur = e.time_range.end - e.time_range.start
        busy, idle = busy + dur, idle + gap
        end = max(end, e.time_range.end)
        print(f"  {i:4d} gap {gap:6.2f} us  {dur:8.2f} us  {e.name[:100]}")
    print(f"== timeline: {len(evs)} activities, {busy / 1e3:.3f} ms busy, {idle / 1e3:.3f} ms idle between, "
          f"span {(end - evs[0].time_range.start) / 1e3:.3f} ms")


def show(title: str, agg: dict[str, tuple[float, int]], total: float, top: int) -> None:
    print(f"== {title}: {total:.3f} ms GPU time over {sum(n for _, n in agg.values())} kernels")
    for name, (ms, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {ms:8.4f} ms {n:4d}x  {100 * ms / total:5.1f}%  {name[:110]}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("batch", type=int)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--timeline", action="store_true", help="also list one graph replay's kernels in order, with gaps")
    args = ap.parse_args()
    import kiln
    model, make_inputs, in_names, _, channels_last, _, path, _ = harness.export_model(args.model, tempfile.mkdtemp())
    inputs = [t.cuda() for t in make_inputs(args.batch)]
    engine = kiln.build(kiln.onnx.parse(path), kiln.BuildConfig(
        precision="fp16", device="cuda", profiles={n: tuple(t.shape) for n, t in zip(in_names, inputs)}))
    ctx = engine.context()
    graphs, ctx.graphs = ctx.graphs, None         # eager launches: the profiler names each kernel
    agg, tot = kernels(lambda: ctx.execute(inputs))
    show(f"Kiln {args.model} b{args.batch}", agg, tot, args.top)
    ctx.graphs = graphs
    if args.timeline:
        timeline(lambda: ctx.execute(inputs))
    if not args.no_compile:
        half = model.cuda().half()
        if channels_last:
            half = half.to(memory_format=torch.channels_last)
        hin = [t.half() if t.is_floating_point() else t for t in inputs]
        comp = torch.compile(half)          # the kernels reduce-overhead replays, without the graph
        with torch.no_grad():
            agg, tot = kernels(lambda: comp(*hin))
        show(f"torch.compile {args.model} b{args.batch}", agg, tot, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
