"""`kiln bench`: trtexec's measurements for a Kiln engine (the measuring is kiln.bench.bench).

Several shape sets sweep the engine's range in one run, one row each: ``--shapes x:1x3x224x224
--shapes x:8x3x224x224`` or ``--shapes 'x:1x3x224x224;x:8x3x224x224'``. A ``;`` starts a new set, and so
does a ``--shapes`` that names an input the current set already has; one that names only new inputs
joins it (``--shapes a:1x8 --shapes b:2x4`` is one set, as in every command). Inputs a set leaves out
run at their profile's opt shape. All sets run in one execution context, as a server would.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from kiln.cli.base import Json, Plugins, Shapes, Threads, Tool, register
from kiln.cli.base.args import check_output_file, number, parse_shapes
from kiln.errors import KilnError

ShapeSet = dict[str, tuple[int, ...]]


@register
class Bench(Tool):
    name = "bench"
    help = "measure an engine's latency and throughput (trtexec-style)"
    description = ("Benchmark ENGINE: warm-up, then timed iterations; latency min/mean/median/p90/p95/p99, "
                   "throughput, and host-to-device / compute / device-to-host split.")
    groups = (Shapes("input shapes (default: each profile's opt shape); several sets sweep the range, one row "
                     "each: ';' or a --shapes naming an input again starts a new set"),
              Json("print the summary as JSON"), Plugins(), Threads())

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
        sets = shape_sets(args.shapes)
        if len(sets) > 1 and (args.profile or args.export_profile):
            raise KilnError(f"--profile and --export-profile measure one shape set, but --shapes gives {len(sets)}; "
                            f"give one set, or drop --profile/--export-profile.")
        if args.export_profile:
            check_output_file(args.export_profile, "--export-profile", keep=[args.engine])
        Plugins.load(args)
        Threads.apply(args)
        import kiln
        from kiln.bench import bench
        engine = kiln.load(args.engine)
        ctx = engine.context(cuda_graph=not args.no_cuda_graph)
        sweep = []
        for shapes in sets:
            res = bench(engine, shapes, args.warmup, args.iterations, args.duration,
                        not args.no_data_transfers, not args.no_cuda_graph, progress=True, context=ctx)
            inputs = res.pop("_inputs")
            res.pop("_ctx")
            if engine.device == "cpu":
                res["threads"] = ctx.run_threads
            sweep.append(res)
        if len(sweep) > 1:
            if args.json:
                print(json.dumps({"engine": args.engine, "sweep": sweep}, indent=1))
            else:
                _print_sweep(args.engine, sweep)
            return 0
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


def shape_sets(specs: list[str] | None) -> list[ShapeSet]:
    """The --shapes values as shape sets (see the module docstring); one empty set when none is given."""
    sets: list[ShapeSet] = []
    for spec in specs or ():
        for i, part in enumerate(spec.split(";")):
            shapes = parse_shapes(part, "--shapes")
            if not shapes:
                continue
            if sets and i == 0 and not set(shapes) & set(sets[-1]):
                sets[-1].update(shapes)
            else:
                sets.append(dict(shapes))
    return sets or [{}]


def _fmt_shapes(shapes: dict[str, list[int]]) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v)) or 'scalar'}" for k, v in shapes.items())


def _print_mode(engine: str, res: dict[str, Any], shapes: bool) -> None:
    print(f"Engine: {engine} on {res['device']} ({res['precision']})"
          + (f", shapes {_fmt_shapes(res['shapes'])}" if shapes else ""))
    mode = "CUDA graph replay" if res["cuda_graph"] else "eager"
    if "threads" in res:
        mode += f" on {res['threads']} CPU threads"
    print(f"Mode: {mode}, {res['iterations']} iterations{'' if shapes else ' per shape set'}, "
          f"{'with' if res['transfers'] else 'without'} host/device transfers")


def _print_sweep(engine: str, sweep: list[dict[str, Any]]) -> None:
    """One row per shape set: latency median and p90, throughput in items/s."""
    _print_mode(engine, sweep[0], shapes=False)
    names = [_fmt_shapes(res["shapes"]) for res in sweep]
    width = max(len("shapes"), *map(len, names))
    print(f"{'shapes':<{width}}  {'median ms':>10}  {'p90 ms':>10}  {'items/s':>12}")
    for name, res in zip(names, sweep):
        lat = res["latency_ms"]
        print(f"{name:<{width}}  {lat['median']:10.4f}  {lat['p90']:10.4f}  {res['throughput_items_per_s']:12.1f}")


def _print_summary(engine: str, res: dict[str, Any], rows: list[dict[str, Any]] | None) -> None:
    """The measurements as text; ``rows``: per-layer times to list too."""
    lat = res["latency_ms"]
    _print_mode(engine, res, shapes=True)
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
