"""Range engines against static ones: one Kiln FP16 engine built for a range of shapes, timed at several
shapes of its range beside a static Kiln engine built for exactly that shape and torch.compile(dynamic=True).

    python benchmarks/range_bench.py [--models bert_base,resnet50,yolov5l] [--quick] [--no-compile] [--out DIR]

Per model: export ONNX with the range's dims dynamic (harness models: seeded random weights, calibrated
BatchNorm), build the range engine (cold, then again with the warm timing cache), warm it up once as a
server does at load (``ExecutionContext.warm_up()``: the profile's min, opt and max; ``--no-warm-up`` skips it),
then per shape: the first run at that shape on a fresh context (the eager warm-up run) and the second (the graph's
recording and first replay), each CUDA-synchronized wall time, the
range engine's median, the static engine's median and torch.compile(dynamic=True)'s (CUDA events, median
of two series, as harness.py). ``--quick`` measures three shapes per model.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402

# model -> (profile as {input: (min, opt, max)} over the dynamic dims, the shapes measured, opt first)
RANGES: dict[str, dict[str, Any]] = {
    "bert_base": {"dims": {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
                  "min": (1, 16), "opt": (8, 128), "max": (64, 512),
                  "shapes": [(8, 128), (1, 16), (1, 128), (32, 128), (8, 384), (64, 64), (16, 512)]},
    "resnet50": {"dims": {"input": {0: "batch"}}, "min": (1,), "opt": (32,), "max": (256,),
                 "shapes": [(32,), (1,), (4,), (64,), (128,), (256,)]},
    "yolov5l": {"dims": {"images": {0: "batch", 2: "h", 3: "w"}}, "min": (1, 320, 320), "opt": (1, 640, 640),
                "max": (16, 1280, 1280), "shapes": [(1, 640, 640), (1, 320, 320), (4, 640, 640), (16, 640, 640),
                                                    (1, 1280, 1280), (8, 960, 960)]},
}


def input_shape(name: str, point: tuple[int, ...], example: torch.Tensor, dims: dict[int, str]) -> tuple[int, ...]:
    """The example input's shape with its dynamic dims (in axis order) set to ``point``."""
    shape = list(example.shape)
    for value, axis in zip(point, sorted(dims)):
        shape[axis] = value
    return tuple(shape)


def make_feed(name: str, shape: tuple[int, ...], example: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    if example.dtype == torch.int64:
        if name == "attention_mask":
            m = torch.ones(shape, dtype=torch.int64)
            m[:, shape[1] * 3 // 4:] = 0
            return m.cuda()
        return torch.randint(0, 30000, shape, generator=g).cuda()
    return torch.randn(shape, generator=g).cuda()


def export(name: str, spec: dict, workdir: str):
    torch.manual_seed(0)
    model, make_inputs, in_names, out_names, channels_last = harness.build_model(name)
    if name == "yolov5l":        # grids from the feature maps' shapes, as YOLOv5's export --dynamic writes them
        import zoo
        torch.manual_seed(0)
        model = zoo.YOLOv5(1.0, 1.0, image=640, dynamic=True)
    harness.calibrate(model, make_inputs)
    model = model.eval()
    ex = make_inputs(1)
    path = os.path.join(workdir, f"{name}_range.onnx")
    with torch.no_grad():
        torch.onnx.export(model, ex, path, input_names=in_names, output_names=out_names[:1],
                          dynamic_axes=spec["dims"], opset_version=17, dynamo=False)
    return model, ex, in_names, path


def run_model(name: str, args) -> dict[str, Any]:
    import kiln
    spec = RANGES[name]
    model, ex, in_names, path = export(name, spec, args.workdir)
    examples = dict(zip(in_names, ex))

    def shapes_at(point):
        return {n: input_shape(n, point, examples[n], spec["dims"][n]) for n in in_names}

    profile = {n: (shapes_at(spec["min"])[n], shapes_at(spec["opt"])[n], shapes_at(spec["max"])[n]) for n in in_names}
    cache = os.path.join(args.workdir, f"{name}.timing")
    res: dict[str, Any] = {"model": name, "profile": {n: [list(s) for s in p] for n, p in profile.items()}, "rows": []}
    t0 = time.perf_counter()
    engine = kiln.build(kiln.onnx.parse(path), kiln.BuildConfig(precision="fp16", device="cuda", profiles=profile,
                                                                timing_cache=cache))
    res["build_cold_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    kiln.build(kiln.onnx.parse(path), kiln.BuildConfig(precision="fp16", device="cuda", profiles=profile,
                                                      timing_cache=cache))
    res["build_warm_s"] = time.perf_counter() - t0
    res["layers"] = len(engine.layers)
    print(f"{name}: range engine {len(engine.layers)} layers, build cold {res['build_cold_s']:.1f} s, "
          f"warm cache {res['build_warm_s']:.1f} s", flush=True)
    if not args.no_warm_up:     # as a server does at load: the profile's corners once, eagerly (kernels, modules)
        t0 = time.perf_counter()
        res["warm_up_runs"] = engine.context().warm_up()
        torch.cuda.synchronize()
        res["warm_up_ms"] = (time.perf_counter() - t0) * 1e3
        print(f"{name}: warm_up() at load, {res['warm_up_runs']} runs, {res['warm_up_ms']:.0f} ms", flush=True)
    half = model.cuda().half()
    compiled = None
    if not args.no_compile:
        torch._dynamo.reset()
        compiled = torch.compile(half, dynamic=True)
    points = spec["shapes"][:3] if args.quick else spec["shapes"]
    for point in points:
        shapes = shapes_at(point)
        feeds = [make_feed(n, shapes[n], examples[n]) for n in in_names]
        row: dict[str, Any] = {"shape": list(point),
                               "seen_in_warm_up": not args.no_warm_up and point in (spec["min"], spec["opt"], spec["max"])}
        ctx = engine.context()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ctx.execute(feeds)
        torch.cuda.synchronize()
        row["first_run_ms"] = (time.perf_counter() - t0) * 1e3
        row["graph"] = ctx.graphs is not None
        if ctx.graphs is not None:
            row["first_run_phases_ms"] = dict(ctx.graphs.last_record)     # the eager warm-up run
        t0 = time.perf_counter()
        ctx.execute(feeds)
        torch.cuda.synchronize()
        row["second_run_ms"] = (time.perf_counter() - t0) * 1e3           # the recording, then a replay
        runs = 50 if point[0] >= 64 else 60
        row["range"] = harness.twice(lambda: ctx.execute(feeds), runs)["median_ms"]
        ctx = None
        st = kiln.build(kiln.onnx.parse(path), kiln.BuildConfig(precision="fp16", device="cuda", profiles=shapes,
                                                                timing_cache=cache))
        sctx = st.context()
        sctx.execute(feeds)
        row["static"] = harness.twice(lambda: sctx.execute(feeds), runs)["median_ms"]
        sctx = st = None
        if compiled is not None:
            hin = [f.half() if f.is_floating_point() else f for f in feeds]
            try:
                with torch.no_grad():
                    t0 = time.perf_counter()
                    compiled(*hin)
                    torch.cuda.synchronize()
                    row["compile_first_s"] = time.perf_counter() - t0
                    row["torch_compile_dynamic"] = harness.twice(lambda: compiled(*hin), runs)["median_ms"]
            except Exception as exc:
                row["torch_compile_dynamic"] = None
                row["compile_error"] = f"{type(exc).__name__}: {exc}"[:200]
        tc = row.get("torch_compile_dynamic")
        print(f"{name:<10} {'x'.join(map(str, point)):<12} range {row['range']:8.3f} ms  static {row['static']:8.3f} "
              f"(x{row['range'] / row['static']:.2f})  compile(dynamic) {tc if tc is None else f'{tc:8.3f}'}  "
              f"first run {row['first_run_ms']:.1f} ms{' (a warm-up shape)' if row['seen_in_warm_up'] else ''} "
              f"{row.get('first_run_phases_ms', {})}, second run {row['second_run_ms']:.1f} ms, graph {row['graph']}",
              flush=True)
        res["rows"].append(row)
        torch.cuda.empty_cache()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(RANGES))
    ap.add_argument("--quick", action="store_true", help="three shapes per model")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(dynamic=True)")
    ap.add_argument("--no-warm-up", action="store_true", help="no ExecutionContext.warm_up() after the build")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    args = ap.parse_args()
    args.workdir = tempfile.mkdtemp(prefix="kiln-range-")
    results, path = harness.new_results(args.out, "range")
    harness.run_each(results, path, [(name, lambda name=name: run_model(name, args))
                                     for name in args.models.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
