"""How far any FP16 engine must land from FP32 on the harness's zoo models: the FP32 model itself
run on FP16-rounded inputs, on FP16-rounded weights, and on both (all arithmetic still exact FP32,
TF32 off), against the plain FP32 output. Where rounding alone moves the output by more than a
tolerance, no FP16 engine can meet it on these (random, BatchNorm-calibrated) weights.

    python benchmarks/fp16_floor.py [--models resnet50,yolov5l] [--batch 2]
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
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for name in args.models.split(","):
        torch.manual_seed(0)
        model, make_inputs, *_ = harness.build_model(name)
        harness.calibrate(model, make_inputs)
        model = model.eval().to(dev)
        x = [t.to(dev) for t in make_inputs(args.batch)]
        rounded = copy.deepcopy(model)
        for p in list(rounded.parameters()) + list(rounded.buffers()):
            if p.dtype.is_floating_point:
                p.data = p.data.half().float()
        xr = [t.half().float() if t.is_floating_point() else t for t in x]

        def run(m, inp):
            with torch.no_grad(), harness.exact_fp32():
                y = m(*inp)
            return (y[0] if isinstance(y, (tuple, list)) else y).float().cpu().numpy()
        ref = run(model, x)
        print(f"{name:20s} FP16-rounded inputs {harness.rel_l2(run(model, xr), ref):.2e}  "
              f"weights {harness.rel_l2(run(rounded, x), ref):.2e}  "
              f"both {harness.rel_l2(run(rounded, xr), ref):.2e}  (rel. L2 vs FP32)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
