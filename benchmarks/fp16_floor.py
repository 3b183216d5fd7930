"""How far any FP16 engine must land from FP32 on the harness's zoo models: the FP32 model itself
run on FP16-rounded inputs, on FP16-rounded weights, and on both (all arithmetic still exact FP32,
TF32 off), against the plain FP32 output. Where rounding alone moves the output by more than a
tolerance, no FP16 engine can meet it on these (random, BatchNorm-calibrated) weights.

    python benchmarks/fp16_floor.py [--models resnet50,yolov5l] [--batch 2] [--per-layer]

``--per-layer`` also rounds one layer's weights at a time and lists the layers that move the output
most, then the error with every weight rounded except those of the top 1, 2, 4, 8 layers: whether
keeping a few layers in FP32 would bring an engine under a tolerance.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50,mobilenet_v3_large,vit_b_16,bert_base,yolov5l")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--per-layer", action="store_true")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for name in args.models.split(","):
        torch.manual_seed(0)
        model, make_inputs, *_ = harness.build_model(name)
        harness.calibrate(model, make_inputs)
        model = model.eval().to(dev)
        x = [t.to(dev) for t in make_inputs(args.batch)]
        rounded = fp16_rounded(model)
        xr = [t.half().float() if t.is_floating_point() else t for t in x]

        def run(m, inp):
            with torch.no_grad(), harness.exact_fp32():
                y = m(*inp)
            return (y[0] if isinstance(y, (tuple, list)) else y).float().cpu().numpy()
        ref = run(model, x)
        print(f"{name:20s} FP16-rounded inputs {harness.rel_l2(run(model, xr), ref):.2e}  "
              f"weights {harness.rel_l2(run(rounded, x), ref):.2e}  "
              f"both {harness.rel_l2(run(rounded, xr), ref):.2e}  (rel. L2 vs FP32)", flush=True)
        if args.per_layer:
            per_layer(model, x, ref, run)
    return 0


def fp16_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose float weights and buffers are rounded to FP16, kept in FP32 (the
    arithmetic stays exact FP32)."""
    rounded = copy.deepcopy(model)
    for p in list(rounded.parameters()) + list(rounded.buffers()):
        if p.dtype.is_floating_point:
            p.data = p.data.half().float()
    return rounded


def per_layer(model, x, ref, run) -> None:
    """Each weighted layer's share of the weight-rounding error, and the error left when the most
    sensitive layers keep FP32 weights."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]

    def rounded_except(keep: set[str]):
        m2 = copy.deepcopy(model)
        mods = dict(m2.named_modules())
        for n, _ in layers:
            if n not in keep:
                for p in mods[n].parameters(recurse=False):
                    p.data = p.data.half().float()
        return m2

    every = {n for n, _ in layers}
    alone = []
    for n, _ in layers:
        alone.append((harness.rel_l2(run(rounded_except(every - {n}), x), ref), n))
    alone.sort(reverse=True)
    print(f"  {len(layers)} weighted layers; rounding one layer's weights alone moves the output by:")
    for err, n in alone[:10]:
        print(f"    {err:.2e}  {n}")
    for k in (1, 2, 4, 8):
        keep = {n for _, n in alone[:k]}
        print(f"  all rounded except the top {k}: {harness.rel_l2(run(rounded_except(keep), x), ref):.2e}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
