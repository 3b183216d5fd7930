"""8-bit engines beside FP16: the harness's models built by Kiln in FP16, INT8 and FP8 (post-training
quantization), timed in one process on one card, with each engine's error against the FP32 model.

    python benchmarks/quant_bench.py [--rows resnet50:1,32,256;bert_base:1,32] [--modes int8,fp8]
                                     [--calib-batches 4] [--calib500] [--profile] [--out DIR]

The models are the harness's (seeded random weights, calibrated BatchNorm; harness.export_model) and so is
the timing (CUDA events, median of two series). Calibration uses ``--calib-batches`` batches of the
model's own random inputs: these rows measure speed; accuracy on real trained models and real images is
benchmarks/quant_accuracy.py. ``--calib500`` also times calibrating ResNet-50 on 500 images (16 batches
of 32, max and entropy calibrators).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402

DEFAULT_ROWS = "resnet50:1,32,256;bert_base:1,32;yolov5l:1,16;mobilenet_v3_large:64"
EIGHT_BIT = ("QConvolution", "QFullyConnected")


def parse_rows(text: str) -> list[tuple[str, list[int]]]:
    """``model:b,b;model:b`` as [(model, batches)]."""
    rows = []
    for part in filter(None, text.split(";")):
        name, _, batches = part.partition(":")
        rows.append((name, [int(b) for b in batches.split(",")] if batches else harness.TABLE[name]))
    return rows


def feeds_of(in_names: list[str], tensors) -> dict[str, np.ndarray]:
    return {n: t.numpy() for n, t in zip(in_names, tensors)}


def layer_summary(engine) -> dict[str, Any]:
    """How many layers run in 8 bits, and with which tactics."""
    eight = [layer for layer in engine.layers if layer["kind"] in EIGHT_BIT]
    return {"layers": len(engine.layers), "eight_bit": len(eight),
            "tactics": dict(collections.Counter(f"{layer['kind']}:{layer['tactic']}" for layer in eight)),
            "qdq_left": sum(layer["kind"] in ("QuantizeLinear", "DequantizeLinear") for layer in engine.layers),
            "all_tactics": dict(collections.Counter(f"{layer['kind']}:{layer['tactic']}" for layer in engine.layers))}


def profile(ctx, inputs, top: int = 10) -> dict[str, float]:
    rows = ctx.profile(inputs, runs=5)
    tot = sum(r["ms"] for r in rows)
    for r in sorted(rows, key=lambda r: -r["ms"])[:top]:
        print(f"     {r['name'][:56]:<56} {r['kind']:<16} {r['tactic']:<18} {r['ms']:.4f} ms "
              f"{100 * r['ms'] / tot:5.1f}%")
    kinds: dict[str, float] = collections.defaultdict(float)
    for r in rows:
        kinds[r["kind"]] += r["ms"]
    print("     by kind:", ", ".join(f"{k} {v:.3f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:8]),
          f"(sum {tot:.3f} ms)")
    return dict(kinds)


def run_model(name: str, batches: list[int], modes: list[str], args) -> dict[str, Any]:
    import kiln
    model, make_inputs, in_names, out_names, channels_last, ex, onnx_path, _ = harness.export_model(name, args.workdir)
    torch.manual_seed(1)    # each call exports anew (BatchNorm statistics differ), so its calibration cache is its own
    calib = [feeds_of(in_names, make_inputs(args.calib_size)) for _ in range(args.calib_batches)]
    res: dict[str, Any] = {"model": name, "rows": []}
    model = model.cuda()
    cache = os.path.join(args.workdir, f"{name}.timing")
    for b in batches:
        inputs = [t.cuda() for t in make_inputs(b)]
        with torch.no_grad(), harness.exact_fp32():
            ref32 = model(*inputs).float().cpu().numpy()
        shapes = {n: tuple(t.shape) for n, t in zip(in_names, inputs)}
        kin = [t.contiguous() for t in inputs]
        row: dict[str, Any] = {"batch": b}
        for mode in ["fp16", *modes]:
            cfg: dict[str, Any] = {"precision": "fp16", "device": "cuda", "profiles": shapes, "timing_cache": cache}
            if mode != "fp16":
                cfg.update(quantize=mode, calibration=calib,
                           calib_cache=os.path.join(args.workdir, f"{name}.{batches[0]}.{mode}.calib.json"))
            t0 = time.perf_counter()
            try:
                engine = kiln.build(kiln.onnx.parse(onnx_path), kiln.BuildConfig(**cfg))
            except Exception as exc:       # keep going: report it
                row[mode] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                print(f"{name:<20} b={b:<4} {mode:<5} FAILED {row[mode]['error']}", flush=True)
                continue
            build_s = time.perf_counter() - t0
            ctx = engine.context()
            out = ctx.execute(kin)[0].float().cpu().numpy()
            with torch.no_grad():
                t = harness.twice(lambda: ctx.execute(kin), 60 if b <= 32 else 50)
            row[mode] = {**t, "build_s": build_s, "rel_l2_vs_fp32": harness.rel_l2(out, ref32),
                         "throughput_per_s": b * 1e3 / t["median_ms"], "cuda_graph": ctx.graphs is not None,
                         **layer_summary(engine)}
            ratio = row["fp16"]["median_ms"] / t["median_ms"] if "median_ms" in row.get("fp16", {}) else float("nan")
            print(f"{name:<20} b={b:<4} {mode:<5} {t['median_ms']:8.3f} ms {b * 1e3 / t['median_ms']:10.0f}/s "
                  f"x{ratio:.2f} vs fp16  relL2 {row[mode]['rel_l2_vs_fp32']:.2e}  8-bit layers "
                  f"{row[mode]['eight_bit']}/{row[mode]['layers']} qdq left {row[mode]['qdq_left']}  "
                  f"build {build_s:.1f}s  {row[mode]['tactics'] if mode != 'fp16' else ''}", flush=True)
            if args.profile and mode != "fp16":
                row[mode]["by_kind_ms"] = profile(ctx, kin)
            ctx = engine = None
            torch.cuda.empty_cache()
        res["rows"].append(row)
    return res


def calib500(args) -> dict[str, float]:
    """Seconds to calibrate ResNet-50 on 500 images (16 batches of 32) with each calibrator."""
    import kiln
    from kiln.builder.quant import plan
    _, make_inputs, in_names, *_rest, onnx_path, _ = harness.export_model("resnet50", args.workdir)
    torch.manual_seed(2)
    batches = [feeds_of(in_names, make_inputs(32)) for _ in range(16)]
    net = kiln.onnx.parse(onnx_path)
    out = {}
    for calibrator in ("max", "entropy"):
        t0 = time.perf_counter()
        plan(net, kiln.BuildConfig(device="cuda", precision="fp16", quantize="int8", calibration=batches,
                                   calibrator=calibrator, profiles={"input": (32, 3, 224, 224)}))
        out[calibrator] = time.perf_counter() - t0
        print(f"calibration of 512 ResNet-50 images ({calibrator}): {out[calibrator]:.1f} s", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="model:batches;... (default %(default)s)")
    ap.add_argument("--modes", default="int8,fp8")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--calib-size", type=int, default=8, help="samples per calibration batch")
    ap.add_argument("--calib500", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print each 8-bit engine's slowest layers")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    args = ap.parse_args()
    args.workdir = tempfile.mkdtemp(prefix="kiln-quant-")
    results, path = harness.new_results(args.out, "quant")
    modes = [m for m in args.modes.split(",") if m]
    if args.calib500:
        results["calib500_s"] = calib500(args)
    harness.run_each(results, path, [(name, lambda name=name, batches=batches: run_model(name, batches, modes, args))
                                     for name, batches in parse_rows(args.rows)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
