"""Which of the 8-bit build's later additions make a quantized engine faster or slower: one model, one batch,
the INT8 engine built with each addition switched off in turn (by patching it out in this process only).

    PYTHONPATH=src:benchmarks python benchmarks/quant_ablate.py [--model bert_base] [--batch 32]

Variants: ``all``; ``no_tma`` (the TMA tactics of kernels/int8_tma.py not offered); ``no_merge`` (parallel 8-bit
GEMMs left unmerged: passes/fuse_parallel_qlinear.py off); ``no_normcodes`` (a norm's output quantized by its own
QuantizeLinear layer, not written as codes by the norm); ``none`` (all three off). Times are CUDA-graph
milliseconds per batch (median of two series, as harness.py), with the FP16 engine of the same process.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from quant_bench import feeds_of, layer_summary, profile  # noqa: E402


@contextlib.contextmanager
def switched_off(what: set[str]):
    import importlib
    build = importlib.import_module("kiln.builder.build")      # the module (kiln.builder.build is also a function)
    import kiln.kernels.int8_tma as tma
    import kiln.passes as passes
    from kiln.passes.fold_qdq import FoldQDQ
    saved = (tma.hopper, build.quantization_passes, FoldQDQ.rules)
    if "tma" in what:
        tma.hopper = lambda: False
    if "merge" in what:
        build.quantization_passes = lambda: [p for p in passes.quantization_passes() if type(p).__name__ == "FoldQDQ"]
    if "normcodes" in what:
        FoldQDQ.rules = [r for r in FoldQDQ.rules if "norm" not in r.name]
    try:
        yield
    finally:
        tma.hopper, build.quantization_passes, FoldQDQ.rules = saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bert_base")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--variants", default="all,no_tma,no_merge,no_normcodes,none")
    ap.add_argument("--profile", action="store_true", help="each engine's slowest layers and time by layer kind")
    args = ap.parse_args()
    import kiln
    work = tempfile.mkdtemp(prefix="kiln-ablate-")
    _, make_inputs, in_names, *_rest, onnx_path, _ = harness.export_model(args.model, work)
    torch.manual_seed(1)
    calib = [feeds_of(in_names, make_inputs(8)) for _ in range(4)]
    inputs = [t.cuda().contiguous() for t in make_inputs(args.batch)]
    shapes = {n: tuple(t.shape) for n, t in zip(in_names, inputs)}
    cache = os.path.join(work, "timing")
    offs = {"all": set(), "no_tma": {"tma"}, "no_merge": {"merge"}, "no_normcodes": {"normcodes"},
            "none": {"tma", "merge", "normcodes"}}
    for variant in ["fp16", *args.variants.split(",")]:
        cfg = {"precision": "fp16", "device": "cuda", "profiles": shapes, "timing_cache": cache}
        if variant != "fp16":
            cfg.update(quantize="int8", calibration=calib, calib_cache=os.path.join(work, "calib.json"))
        with switched_off(offs.get(variant, set())):
            t0 = time.perf_counter()
            engine = kiln.build(kiln.onnx.parse(onnx_path), kiln.BuildConfig(**cfg))
            build_s = time.perf_counter() - t0
        ctx = engine.context()
        ctx.execute(inputs)
        with torch.no_grad():
            t = harness.twice(lambda: ctx.execute(inputs), 60)
        s = layer_summary(engine)
        kinds: dict[str, int] = {}
        for layer in engine.layers:
            key = f"{layer['kind']}:{layer.get('tactic')}"
            kinds[key] = kinds.get(key, 0) + 1
        print(f"{args.model} b={args.batch} {variant:<13} {t['median_ms']:7.3f} ms  graph {ctx.graphs is not None}  "
              f"build {build_s:5.1f} s  layers {s['layers']} 8-bit {s['eight_bit']} qdq left {s['qdq_left']}  "
              f"{s['tactics']}  kinds {kinds}", flush=True)
        if args.profile:
            profile(ctx, inputs, top=6)
        ctx = engine = None
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
