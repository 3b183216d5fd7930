"""Network stems on one GPU: the stem kernel (kernels/conv_stem.py) against what the engine ran before.

    PYTHONPATH=src python benchmarks/stem_bench.py

From the FP32 NCHW engine input to the stem's (pooled) FP16 channels-last output, per case:
  before:  cast to FP16 + NHWC copy + cuDNN conv (+ bias + act; space-to-depth for YOLOv5's 6×6)
           (+ torch's max pool), as the engine's tactics ran it;
  stem:    the stem kernel reading the FP32 input, each config of a small sweep (pooled in-kernel
           for ResNet, and unpooled + torch's max pool for comparison).
Every path is checked against FP32 torch (relative L2 < 2e-3), then timed as 20 calls replayed
from one CUDA graph (CUDA events, median of 7 replays ÷ 20). JSON to $OUT/stem_bench.json if set.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conv_triton_bench import rel_l2 as rel, time_ms as timed  # noqa: E402

from kiln.kernels.conv_s2d import s2d_input, s2d_weight  # noqa: E402
from kiln.kernels.conv_stem import StemConfig, arrange_stem_weight, conv_stem  # noqa: E402
from kiln.kernels.epilogue_triton import apply_epilogue  # noqa: E402

ACT = {"relu": F.relu, "silu": F.silu, "hard_swish": F.hardswish}


def case(name, n, hw, cout, k, s, p, act, pool):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, 3, hw, hw, device="cuda", generator=g)
    w = (torch.randn(cout, 3, k, k, device="cuda", generator=g) / (3 * k * k) ** 0.5).half()
    b = torch.randn(cout, device="cuda", generator=g).half()
    ref = ACT[act](F.conv2d(x, w.float(), b.float(), s, p))
    if pool:
        ref = F.max_pool2d(ref, 3, 2, 1)
    rows = []
    wcl = w.contiguous(memory_format=torch.channels_last)

    def before():
        xh = x.half().contiguous(memory_format=torch.channels_last)
        if act == "relu":
            y = torch.cudnn_convolution_relu(xh, wcl, b, (s, s), (p, p), (1, 1), 1)
        elif name.startswith("yolo"):
            xs = s2d_input(x, s, k, k, [p] * 4, dtype=torch.float16)
            y = apply_epilogue(F.conv2d(xs, s2d_weight(w, s)).contiguous(memory_format=torch.channels_last), b,
                               None, act, 0.0, 0.0)
        else:
            y = ACT[act](F.conv2d(xh, wcl, b, s, p))
        return F.max_pool2d(y, 3, 2, 1) if pool else y

    rows.append({"path": "before", "ms": timed(before), "rel_l2": rel(before(), ref)})
    wt = arrange_stem_weight(w)
    configs = [StemConfig(bm, warps, 4, st) for bm, warps in ((128, 4), (64, 4), (128, 8), (256, 8))
               for st in (1, 3)]
    if pool:
        configs = [StemConfig(128, 4, pw, st, 512, tw) for pw, st, tw in
                   ((4, 3, 16), (4, 4, 16), (8, 3, 32), (8, 4, 32), (4, 3, 32), (8, 3, 16))]
    for cfg in configs:
        def stem(cfg=cfg):
            return conv_stem(x, wt, b, (k, k), (s, s), (p,) * 4, act, pool=pool, config=cfg)
        rows.append({"path": f"stem{'+pool' if pool else ''} {tuple(cfg)}", "ms": timed(stem),
                     "rel_l2": rel(stem(), ref)})
    if pool and os.environ.get("UNPOOLED"):
        for cfg in [StemConfig(bm, w_, 4, st) for bm, w_ in ((128, 4), (256, 8)) for st in (1, 3)]:
            def unpooled(cfg=cfg):
                return F.max_pool2d(conv_stem(x, wt, b, (k, k), (s, s), (p,) * 4, act, config=cfg), 3, 2, 1)
            rows.append({"path": f"stem, torch pool {tuple(cfg)}", "ms": timed(unpooled),
                         "rel_l2": rel(unpooled(), ref)})
    base = rows[0]["ms"]
    for r in rows:
        ok = "ok" if r["rel_l2"] < 2e-3 else "WRONG"
        print(f"{name:<14} {r['path']:<34} {r['ms']:8.4f} ms  {base / r['ms']:5.2f}x  rel {r['rel_l2']:.1e} {ok}",
              flush=True)
    return {"case": name, "rows": rows}


def main() -> int:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    out = [case("resnet b256", 256, 224, 64, 7, 2, 3, "relu", True),
           case("resnet b1", 1, 224, 64, 7, 2, 3, "relu", True),
           case("yolo b16", 16, 640, 64, 6, 2, 2, "silu", False),
           case("mobilenet b64", 64, 224, 16, 3, 2, 1, "hard_swish", False)]
    dest = Path(os.environ.get("OUT", Path(__file__).parent / "results")) / "stem_bench.json"
    dest.write_text(json.dumps({"device": torch.cuda.get_device_name(), "cases": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
