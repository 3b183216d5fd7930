"""What keeping a model's most sensitive layers in FP32 (BuildConfig.fp32_layers) buys in accuracy and
costs in speed, on one GPU.

    python benchmarks/fp32_layers_bench.py [--model resnet50] [--batch 256]

For each set of patterns: the FP16 engine's relative L2 error against exact FP32 PyTorch (TF32 off)
at batch 1 over four random inputs (median and max), and its latency at ``--batch`` (median of 50
CUDA-graph replays). The default sets follow ``fp16_floor.py --per-layer`` on the harness's
ResNet-50, whose stem and first stage move the output most when rounded.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

import kiln  # noqa: E402

SETS = {"resnet50": [(), ("/conv1/*",), ("/conv1/*", "/layer1/layer1.0/*"), ("/conv1/*", "/layer1/*")]}


def latency_ms(ctx, x, runs: int = 50) -> float:
    for _ in range(5):
        ctx.execute([x])
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        ctx.execute([x])
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    model, _, in_names, _, _, ex, path, _ = harness.export_model(args.model, tempfile.mkdtemp())
    model = model.cuda()
    xs = [torch.randn(*ex[0].shape, generator=torch.Generator().manual_seed(2000 + i)).cuda() for i in range(4)]
    with torch.no_grad(), harness.exact_fp32():
        refs = [model(x).float() for x in xs]
    big = torch.randn(args.batch, *ex[0].shape[1:], device="cuda")
    print(torch.cuda.get_device_name(), torch.__version__, args.model, flush=True)
    for patterns in SETS[args.model]:
        def build(shape):
            return kiln.build(kiln.onnx.parse(path), kiln.BuildConfig(
                precision="fp16", device="cuda", profiles={in_names[0]: shape}, fp32_layers=patterns))
        ctx = build(tuple(ex[0].shape)).context()
        errs = [harness.rel_l2(ctx.execute([x])[0].float().cpu().numpy(), r.cpu().numpy()) for x, r in zip(xs, refs)]
        ms = latency_ms(build(tuple(big.shape)).context(), big)
        label = ",".join(patterns) or "(none: all FP16)"
        print(f"{label:<36} rel L2 median {np.median(errs):.2e} max {max(errs):.2e}   b{args.batch} {ms:7.3f} ms "
              f"({args.batch / ms * 1e3:,.0f} items/s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
