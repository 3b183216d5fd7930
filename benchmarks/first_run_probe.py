"""Where the first run of a range engine at a new shape spends its time: one FP16 range engine (range_bench's
profile), then at each new shape a fresh context's first run under cProfile, with a second fresh context at
the same shape for comparison (warm process caches).

    PYTHONPATH=src:benchmarks python benchmarks/first_run_probe.py [--model bert_base] [--top 25]

Prints per shape: first and second first-run wall times, the graph recorder's phases, the number and time of
Triton compilations (calls into triton.compiler's compile), each Triton kernel that missed the process's kernel
cache (Triton's jit_cache_hook: a new specialization, compiled or loaded from the disk cache) and the functions
with the most own time. ``--fresh-cache`` points Triton's disk cache at an empty folder before the build, as on a
machine that never ran Kiln: the build's compilations are then all the run can find.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import range_bench  # noqa: E402


def first_run(engine, feeds) -> tuple[float, dict, pstats.Stats, object]:
    ctx = engine.context()
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prof.enable()
    ctx.execute(feeds)
    torch.cuda.synchronize()
    prof.disable()
    ms = (time.perf_counter() - t0) * 1e3
    phases = dict(ctx.graphs.last_record) if ctx.graphs is not None else {}
    return ms, phases, pstats.Stats(prof), ctx


MISSES: list[str] = []


def _on_miss(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
    MISSES.append(repr.split("[", 1)[0] + "(" + repr.split("](", 1)[-1][:160])
    return None


def compile_calls(stats: pstats.Stats) -> tuple[int, float]:
    """Calls into triton.compiler's ``compile`` and their cumulative seconds."""
    n, t = 0, 0.0
    for (path, _line, func), (_cc, nc, _tt, ct, _callers) in stats.stats.items():
        if func == "compile" and "triton" in path and "compiler" in path:
            n, t = n + nc, t + ct
    return n, t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bert_base")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--prewarm", action="store_true", help="first run once at the profile's min, opt and max shapes")
    ap.add_argument("--shapes", type=int, default=5, help="how many of range_bench's shapes to probe")
    ap.add_argument("--fresh-cache", action="store_true", help="Triton's disk cache in a new empty folder")
    args = ap.parse_args()
    if args.fresh_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kiln-triton-cache-")
    import triton
    triton.knobs.runtime.jit_cache_hook = _on_miss
    import kiln
    spec = range_bench.RANGES[args.model]
    work = tempfile.mkdtemp(prefix="kiln-first-")
    _, ex, in_names, path = range_bench.export(args.model, spec, work)
    examples = dict(zip(in_names, ex))

    def shapes_at(point):
        return {n: range_bench.input_shape(n, point, examples[n], spec["dims"][n]) for n in in_names}

    profile = {n: (shapes_at(spec["min"])[n], shapes_at(spec["opt"])[n], shapes_at(spec["max"])[n]) for n in in_names}
    t0 = time.perf_counter()
    engine = kiln.build(kiln.onnx.parse(path), kiln.BuildConfig(precision="fp16", device="cuda", profiles=profile))
    print(f"build {time.perf_counter() - t0:.1f} s, {len(engine.layers)} layers", flush=True)
    if args.prewarm:
        t0 = time.perf_counter()
        for point in (spec["min"], spec["opt"], spec["max"]):
            shapes = shapes_at(point)
            first_run(engine, [range_bench.make_feed(n, shapes[n], examples[n]) for n in in_names])
        print(f"prewarm at min, opt, max: {(time.perf_counter() - t0) * 1e3:.0f} ms", flush=True)
    for point in spec["shapes"][:args.shapes]:
        shapes = shapes_at(point)
        feeds = [range_bench.make_feed(n, shapes[n], examples[n]) for n in in_names]
        MISSES.clear()
        ms, phases, stats, ctx = first_run(engine, feeds)
        misses = list(MISSES)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ctx.execute(feeds)
        torch.cuda.synchronize()
        second = (time.perf_counter() - t0) * 1e3
        print(f"second run at that shape (recording + replay): {second:.1f} ms {dict(ctx.graphs.last_record)}")
        ms2, phases2, _, _ = first_run(engine, feeds)
        n, t = compile_calls(stats)
        print(f"\n== {'x'.join(map(str, point))}: first run {ms:.1f} ms {phases}; again on a new context "
              f"{ms2:.1f} ms {phases2}; Triton compiles {n} ({t * 1e3:.1f} ms)", flush=True)
        print(f"kernel-cache misses at the first run: {len(misses)}")
        for m in sorted(set(misses)):
            print(f"  {misses.count(m)} x {m}")
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
