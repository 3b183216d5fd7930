"""`kiln bench`: trtexec's measurements for a Kiln engine (the measuring is kiln.bench.bench)."""
from __future__ import annotations

import argparse
import json
from typing import Any

from kiln.cli.base import Json, Plugins, Shapes, Threads, Tool, register
from kiln.cli.base.args import check_output_file, number


@register
class Bench(Tool):
    name = "bench"
    help = "measure an engine's latency and throughput (trtexec-style)"
    description = ("Benchmark ENGINE: warm-up, then timed iterations; latency min/mean/median/p90/p95/p99, "
                   "throughput, and host-to-device / compute / device-to-host split.")
    groups = (Shapes("input shapes (default: each profile's opt shape)"), Json("print the summary as JSON"), Plugins(),
              Threads())

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        p = parser
        p.add_argument("engine", help="the .kiln engine file")
        p.add_argument("--warmup", type=number(int, 0), default=20, metavar="N", help="untimed runs first (default 20)")
        p.add_argument("--iterations", type=number(int, 1), default=200, metavar="N", help="timed runs (default 200)")
        p.add_argument("--duration", type=number(float, 0, above=True), metavar="S",
                       help="run for S seconds instead of --iterations")
        p.add_argument("--no-data-transfers", action="store_true", help="time GPU compute only (inputs stay on device)")
        p.add_argument("--no-cuda-graph", action="store_true", help="run layer by layer instead of replaying a CUDA "
                                                                    "graph")
        p.add_argument("--profile", action="store_true", help="print per-layer times")
        p.add_argument("--export-profile", metavar="FILE.json", help="write per-layer times as JSON (for kiln view)")

    def run(self, args: argparse.Namespace) -> int:
        shapes = Shapes.static(args)
        if args.export_profile:
            check_output_file(args.export_profile, "--export-profile", keep=[args.engine])
        Plugins.load(args)
        Threads.apply(args)
        import kiln
        from kiln.bench import bench
        engine = kiln.load(args.engine)
        res = bench(engine, shapes, args.warmup, args.iterations, args.duration,
                    not args.no_data_transfers, not args.no_cuda_graph, progress=True)
        ctx, inputs = res.pop("_ctx"), res.pop("_inputs")
        if engine.device == "cpu":
            from kiln.kernels.cpu_threads import default_threads
            res["threads"] = ctx.threads or default_threads()
        rows = None
        if args.profile or args.export_profile:
            rows = ctx.profile(inputs)
            res["profile_total_ms"] = sum(r["ms"] for r in rows)
        if args.json:
            print(json.dumps(res, indent=1))
        else:
            _print_summary(args.engine, res, rows if args.profile else None)
        if args.export_profile:
            with open(args.export_profile, "w") as f:
                json.dump({"device": res["device"], "engine": args.engine, "total_ms": res["profile_total_ms"],
                           "latency_ms": res["latency_ms"], "layers": rows}, f, indent=1)
            print(f"wrote {args.export_profile}")
        return 0


def _print_summary(engine: str, res: dict[str, Any], rows: list[dict[str, Any]] | None) -> None:
    """The measurements as text; ``rows``: per-layer times to list too."""
    lat = res["latency_ms"]
    print(f"Engine: {engine} on {res['device']} ({res['precision']}), shapes "
          + ", ".join(f"{k}={'x'.join(map(str, v)) or 'scalar'}" for k, v in res["shapes"].items()))
    mode = "CUDA graph replay" if res["cuda_graph"] else "eager"
    if "threads" in res:
        mode += f" on {res['threads']} CPU threads"
    print(f"Mode: {mode}, {res['iterations']} iterations, "
          f"{'with' if res['transfers'] else 'without'} host/device transfers")
    print(f"Latency (ms): min {lat['min']:.4f}  mean {lat['mean']:.4f}  median {lat['median']:.4f}  "
          f"p90 {lat['p90']:.4f}  p95 {lat['p95']:.4f}  p99 {lat['p99']:.4f}  max {lat['max']:.4f}")
    print(f"Throughput: {res['throughput_qps']:.1f} qps, {res['throughput_items_per_s']:.1f} items/s")
    if "split_ms_median" in res:
        sp = res["split_ms_median"]
        print(f"Split (median ms): host-to-device {sp['h2d']:.4f}  GPU compute {sp['compute']:.4f}  "
              f"device-to-host {sp['d2h']:.4f}")
    if rows is not None:
        print(f"\nPer-layer times (eager, one event pair per layer; total {res['profile_total_ms']:.3f} ms):")
        print(f"  {'layer':<40} {'kind':<15} {'tactic':<14} {'precision':<18} {'ms':>9} {'%':>6}")
        for r in sorted(rows, key=lambda r: -r["ms"]):
            print(f"  {r['name'][:40]:<40} {r['kind']:<15} {str(r['tactic']):<14} {str(r['precision']):<18} "
                  f"{r['ms']:9.4f} {r['percent']:6.2f}")
