"""The fused projection shortcut (kernels/conv_sum.py) against the two convolutions it replaces, on one GPU.

    PYTHONPATH=src python benchmarks/sum_bench.py

ResNet-50's first block of each stage at batch 256 (BATCH to change), FP16 channels-last:
y = relu(expand(h) + project(x)), the projection strided in stages 2-4. "separate" runs it as two
implicit-GEMM convolutions (kernels/conv_triton.py, the engine's usual 1×1 kernel): the projection
with its bias, then the expansion with the projection's output as its fused residual. "sum" is the fused kernel over a few tile
configs. Each path is checked against FP32 torch, then timed as 20 calls replayed from one CUDA
graph (median of 7 replays ÷ 20). JSON to $OUT/sum_bench.json if set.
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

from kiln.kernels.conv_sum import arrange, conv_sum  # noqa: E402
from kiln.kernels.conv_triton import ConvConfig, arrange_weight, conv2d_nhwc, default_config, wide_config  # noqa: E402

CL = torch.channels_last
# stage: (output size, h channels, x size, x channels, stride, output channels)
STAGES = {"stage1": (56, 64, 56, 64, 1, 256), "stage2": (28, 128, 56, 256, 2, 512),
          "stage3": (14, 256, 28, 512, 2, 1024), "stage4": (7, 512, 14, 1024, 2, 2048)}
SWEEP = [ConvConfig(128, 128, 64, 8, 3), ConvConfig(128, 256, 64, 8, 3), ConvConfig(256, 128, 64, 8, 3),
         ConvConfig(128, 128, 64, 8, 4), ConvConfig(128, 64, 64, 4, 3), ConvConfig(64, 128, 64, 4, 4)]


def main() -> int:
    n = int(os.environ.get("BATCH", 256))
    print(torch.cuda.get_device_name(), torch.__version__, f"batch {n}", flush=True)
    out = []
    for name, (oh, ch, hx, cx, s, c) in STAGES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        h = torch.randn(n, ch, oh, oh, device="cuda", generator=g).half().contiguous(memory_format=CL)
        x = torch.randn(n, cx, hx, hx, device="cuda", generator=g).half().contiguous(memory_format=CL)
        we = (torch.randn(c, ch, 1, 1, device="cuda", generator=g) / ch ** 0.5).half()
        wp = (torch.randn(c, cx, 1, 1, device="cuda", generator=g) / cx ** 0.5).half()
        be = torch.randn(c, device="cuda", generator=g).half()
        bp = torch.randn(c, device="cuda", generator=g).half()
        ref = F.relu(F.conv2d(h.float(), we.float(), be.float()) + F.conv2d(x.float(), wp.float(), bp.float(), s))
        wea, wpa = arrange_weight(we), arrange_weight(wp)
        b = (be.float() + bp.float()).half()

        def separate():
            r = conv2d_nhwc(x, wpa, bp, stride=(s, s))
            return conv2d_nhwc(h, wea, be, r, act="relu")

        rows = [{"path": "separate", "ms": timed(separate), "rel_l2": rel(separate(), ref)}]
        wet, wpt = arrange(we), arrange(wp)
        for label, cfg in [("default", default_config), ("wide", wide_config)] + [(str(tuple(c_)), c_) for c_ in SWEEP]:
            def fused(cfg=cfg):
                return conv_sum(h, wet, x, wpt, b, (1, 1), (s, s), "relu", config=cfg)
            rows.append({"path": f"sum {label}", "ms": timed(fused), "rel_l2": rel(fused(), ref)})
        base = rows[0]["ms"]
        for r_ in rows:
            ok = "ok" if r_["rel_l2"] < 2e-3 else "WRONG"
            print(f"{name:<8} {r_['path']:<34} {r_['ms']:8.4f} ms  {base / r_['ms']:5.2f}x  rel {r_['rel_l2']:.1e} {ok}",
                  flush=True)
        out.append({"case": name, "batch": n, "rows": rows})
    dest = Path(os.environ.get("OUT", Path(__file__).parent / "results")) / "sum_bench.json"
    dest.write_text(json.dumps({"device": torch.cuda.get_device_name(), "cases": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
