"""Kiln's FP16 engine, eager FP16 PyTorch, and the FP32 model on the FP16-rounded input or with
FP16-rounded weights, each against
exact FP32 PyTorch (TF32 off) on eight random inputs at batch 1: how much the harness's one-input
accuracy figure depends on the input drawn.

    python benchmarks/accuracy_inputs.py yolov5l
"""
import copy
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from fp16_floor import fp16_rounded  # noqa: E402

import kiln  # noqa: E402


def main(name: str) -> int:
    model, _, in_names, _, _, ex, path, _ = harness.export_model(name, tempfile.mkdtemp())
    model = model.cuda()
    engine = kiln.build(kiln.onnx.parse(path), kiln.BuildConfig(precision="fp16", device="cuda",
                        profiles={in_names[0]: tuple(ex[0].shape)}))
    ctx = engine.context()
    half = copy.deepcopy(model).half()
    rounded = fp16_rounded(model)
    res = []
    for seed in range(8):
        g = torch.Generator().manual_seed(1000 + seed)
        x = torch.randn(*ex[0].shape, generator=g).cuda()
        with torch.no_grad(), harness.exact_fp32():
            ref = model(x).float()
            refr = model(x.half().float()).float()
            refw = rounded(x).float()
        out = ctx.execute([x])[0].float()
        with torch.no_grad():
            eag = half(x.half()).float()
        res.append(tuple(harness.rel_l2(a.cpu().numpy(), ref.cpu().numpy()) for a in (out, eag, refr, refw)))
        print(f"{name} seed {1000 + seed}: kiln {res[-1][0]:.2e}  eager fp16 {res[-1][1]:.2e}  fp32 on rounded "
              f"input {res[-1][2]:.2e}  fp32 with rounded weights {res[-1][3]:.2e}", flush=True)
    a = np.array(res)
    print(f"{name} over {len(res)} inputs: kiln median {np.median(a[:,0]):.2e} max {a[:,0].max():.2e}; eager fp16 median {np.median(a[:,1]):.2e} max {a[:,1].max():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
