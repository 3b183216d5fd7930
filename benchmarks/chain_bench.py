"""The fused 1×1 chain (kernels/conv_chain.py) against the two convolutions it replaces, on one GPU.

    PYTHONPATH=src python benchmarks/chain_bench.py

ResNet-50's stages 1-2 at batch 256 (stage 3, 256 channels in the second convolution, was
measured too and lost: results/chain_bench.json; the pass no longer fuses it), FP16 channels-last: a block's 1×1 expansion with residual +
ReLU, then the next block's 1×1 reduction + ReLU. "+proj": a stage's first block, whose expansion
adds the projection shortcut of the block input x2 instead of a residual. "separate" runs them as
the engine does unchained (the implicit-GEMM conv with its fused residual, or the projection sum of
kernels/conv_sum.py, then cuDNN's conv+bias+ReLU); "chain" is the fused kernel over a small config
sweep. STAGES=stage1,stage2+proj to choose. Each path is checked against FP32 torch, then timed as 20 calls
replayed from one CUDA graph (median of 7 replays ÷ 20). JSON to $OUT/chain_bench.json if set.
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

from kiln.kernels.conv_chain import ChainConfig, conv_chain, default_chain_config  # noqa: E402
from kiln.kernels.conv_sum import conv_sum  # noqa: E402
from kiln.kernels.conv_triton import arrange_weight, conv2d_nhwc  # noqa: E402

CL = torch.channels_last
# name: (size, C4, C, CN, projection (x2 size, C2, stride) or None)
STAGES = {"stage1": (56, 64, 256, 64, None), "stage2": (28, 128, 512, 128, None),
          "stage1+proj": (56, 64, 256, 64, (56, 64, 1)), "stage2+proj": (28, 128, 512, 128, (56, 256, 2))}
SWEEP = [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 8, 2),
         (64, 32, 4, 2), (128, 128, 8, 2), (256, 32, 8, 3), (256, 32, 8, 2), (256, 32, 16, 2), (256, 64, 16, 2),
         (128, 64, 8, 4), (128, 32, 8, 4), (128, 32, 8, 2), (64, 32, 8, 2), (64, 16, 4, 2)]


def main() -> int:
    n = int(os.environ.get("BATCH", 256))
    names = os.environ.get("STAGES", ",".join(STAGES)).split(",")
    print(torch.cuda.get_device_name(), torch.__version__, f"batch {n}", flush=True)
    out = []
    for name in names:
        hw, c4, c, cn, proj = STAGES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(n, c4, hw, hw, device="cuda", generator=g).half().contiguous(memory_format=CL)
        r = torch.randn(n, c, hw, hw, device="cuda", generator=g).half().contiguous(memory_format=CL)
        w3 = (torch.randn(c, c4, 1, 1, device="cuda", generator=g) / c4 ** 0.5).half()
        w1 = (torch.randn(cn, c, 1, 1, device="cuda", generator=g) / c ** 0.5).half()
        b3 = torch.randn(c, device="cuda", generator=g).half()
        b1 = torch.randn(cn, device="cuda", generator=g).half()
        w3t, w1t = w3[:, :, 0, 0].t().contiguous(), w1[:, :, 0, 0].t().contiguous()
        w3a, w1cl = arrange_weight(w3), w1.contiguous(memory_format=CL)
        x2 = w2t = None
        s2 = 1
        if proj is None:
            yr = F.relu(F.conv2d(x.float(), w3.float(), b3.float()) + r.float())

            def first():
                return conv2d_nhwc(x, w3a, b3, r, act="relu")
        else:
            size2, c2, s2 = proj
            r = None
            x2 = torch.randn(n, c2, size2, size2, device="cuda", generator=g).half().contiguous(memory_format=CL)
            w2 = (torch.randn(c, c2, 1, 1, device="cuda", generator=g) / c2 ** 0.5).half()
            w2t = w2[:, :, 0, 0].t().contiguous()
            yr = F.relu(F.conv2d(x.float(), w3.float(), b3.float()) + F.conv2d(x2.float(), w2.float(), None, s2))

            def first():
                return conv_sum(x, w3t, x2, w2t, b3, (1, 1), (s2, s2), "relu")
        zr = F.relu(F.conv2d(yr.half().float(), w1.float(), b1.float()))

        def separate():
            y = first()
            return y, torch.cudnn_convolution_relu(y, w1cl, b1, (1, 1), (0, 0), (1, 1), 1)

        rows = []
        y, z = separate()
        rows.append({"path": "separate", "ms": timed(separate), "rel_l2": max(rel(y, yr), rel(z, zr))})
        cfgs = [default_chain_config(c4, c, cn, 0 if x2 is None else x2.shape[1])] + [ChainConfig(*s) for s in SWEEP]
        for cfg in dict.fromkeys(cfgs):
            def chain(cfg=cfg):
                return conv_chain(x, w3t, b3, r, w1t, b1, config=cfg, x2=x2, w2t=w2t, stride2=(s2, s2))
            try:
                y, z = chain()
                rows.append({"path": f"chain {tuple(cfg)}", "ms": timed(chain), "rel_l2": max(rel(y, yr), rel(z, zr))})
            except Exception as exc:       # a config that does not fit this GPU's shared memory
                rows.append({"path": f"chain {tuple(cfg)}", "error": f"{type(exc).__name__}: {str(exc)[:80]}"})
        base = rows[0]["ms"]
        for row in rows:
            if "error" in row:
                print(f"{name:<12} {row['path']:<28} {row['error']}", flush=True)
                continue
            ok = "ok" if row["rel_l2"] < 2e-3 else "WRONG"
            print(f"{name:<12} {row['path']:<28} {row['ms']:8.4f} ms  {base / row['ms']:5.2f}x  rel {row['rel_l2']:.1e} {ok}",
                  flush=True)
        out.append({"stage": name, "rows": rows})
    dest = Path(os.environ.get("OUT", Path(__file__).parent / "results")) / "chain_bench.json"
    dest.write_text(json.dumps({"device": torch.cuda.get_device_name(), "batch": n, "stages": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
