"""The 8-bit Triton convolution/GEMM (kernels/int8_gemm.py) against FP16 cuDNN/cuBLAS and torch's 8-bit GEMMs.

    PYTHONPATH=src:benchmarks python benchmarks/qgemm_bench.py [--cases resnet,bert] [--sweep]

Per layer shape (ResNet-50's at batch 256, BERT-base's GEMMs at 32x128 tokens): the FP16 layer as the FP16
engine runs it (cuDNN channels-last conv + bias + ReLU, or a cuBLAS linear), then the 8-bit kernel with int8
and FP8 codes, writing 8-bit codes, FP16 or FP32 (with a float residual where the layer has one), with its
three tile tables, plus ``torch._int_mm`` / ``torch._scaled_mm`` on the GEMM (the product alone) where the
shape is a GEMM. With ``--sweep``, a grid of tiles for the int8 code path. Times are kernel milliseconds per
call (20 calls in one CUDA graph, median of 7 replays), the same as conv_triton_bench. The table ends with
each shape's best 8-bit time over FP16's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (name, batch, Cin, Cout, kernel, stride, input size, residual) for convolutions; (name, M, K, N) for GEMMs
RESNET = [("r50 1x1 64>256 +res", 256, 64, 256, 1, 1, 56, True), ("r50 1x1 256>64", 256, 256, 64, 1, 1, 56, False),
          ("r50 3x3 64>64", 256, 64, 64, 3, 1, 56, False), ("r50 3x3 128>128", 256, 128, 128, 3, 1, 28, False),
          ("r50 1x1 1024>256", 256, 1024, 256, 1, 1, 14, False), ("r50 3x3 512>512", 256, 512, 512, 3, 1, 7, False)]
BERT = [("bert qkv", 4096, 768, 768), ("bert ffn1", 4096, 768, 3072), ("bert ffn2", 4096, 3072, 768)]


def main() -> None:
    import torch
    import torch.nn.functional as F

    from conv_triton_bench import time_ms
    from kiln.kernels import int8_gemm as q

    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="resnet,bert")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    rows = []

    def record(shape: str, path: str, fn) -> float | None:
        try:
            fn()
            ms = time_ms(fn)
        except Exception as e:                  # a tile table the GPU cannot run: say so, go on
            print(f"  {shape:24s} {path:34s} {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
            return None
        rows.append({"shape": shape, "path": path, "ms": ms})
        print(f"  {shape:24s} {path:34s} {ms:8.4f} ms", flush=True)
        return ms

    def eight_bit(shape, x8, w8, n, residual, geometry, fp8: bool):
        codes = torch.float8_e4m3fn if fp8 else torch.int8
        ep = q.Epilogue(torch.zeros(n, dtype=torch.int32, device=dev), torch.full((n,), 1e-3, device=dev), 0)
        wk = q.k_major(w8)
        outs = [("codes", q.Codes(codes, 0.05, 0)), ("fp16", q.Codes(torch.float16)), ("fp32", q.Codes(torch.float32))]
        tables = [("default", q.default_config), ("wide", q.wide_config), ("small", q.small_config)]
        if args.sweep and not fp8:
            tables += [(f"{c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}", c) for c in
                       (q.QGemmConfig(bm, bn, bk, w, s) for bm in (64, 128, 256) for bn in (64, 128, 256)
                        for bk in (64, 128) for w in (4, 8) for s in (2, 3, 4)
                        if bm * bn <= 128 * 256 and not (w == 4 and bm * bn > 128 * 128))]
        tag = "fp8" if fp8 else "int8"
        best = None
        for oname, out in outs:
            r = None
            if residual is not None and oname != "codes":
                r = residual.to(out.dtype)
            for tname, table in (tables if oname == "codes" else tables[:1]):
                ms = record(shape, f"{tag} out={oname}{' +res' if r is not None else ''} {tname}",
                            lambda out=out, r=r, table=table: q.qgemm(x8, wk, ep, out, r, "relu", geometry=geometry,
                                                                       config=table))
                if ms is not None and oname == "codes":
                    best = ms if best is None else min(best, ms)
        return best

    def torch_product(shape, a8, w8, fp8: bool):
        """torch's own 8-bit GEMM on the same codes, the product alone (no epilogue)."""
        if fp8:
            one = torch.ones((), device=dev)
            record(shape, "fp8 torch._scaled_mm (product)", lambda: torch._scaled_mm(
                a8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.float16))
        else:
            record(shape, "int8 torch._int_mm (product)", lambda: torch._int_mm(a8, w8.t()))

    def to8(t, fp8):
        return (t * 8).clamp(-448, 448).to(torch.float8_e4m3fn) if fp8 else (t * 30).round().clamp(-128, 127).to(torch.int8)

    summary = []
    if "resnet" in args.cases:
        for name, n, cin, cout, k, s, hw, res in RESNET:
            pad = k // 2
            oh = (hw + 2 * pad - k) // s + 1
            x = torch.randn(n, cin, hw, hw, device=dev).contiguous(memory_format=torch.channels_last)
            w = torch.randn(cout, cin, k, k, device=dev) / (cin * k * k) ** 0.5
            xh, wh = x.half(), w.half().contiguous(memory_format=torch.channels_last)
            b = torch.zeros(cout, device=dev, dtype=torch.float16)
            r = torch.randn(n, cout, oh, oh, device=dev).half().contiguous(memory_format=torch.channels_last) if res else None
            if r is not None:
                fp16 = record(name, "fp16 cudnn add_relu", lambda: torch.cudnn_convolution_add_relu(
                    xh, wh, r, 1.0, b, (s, s), (pad, pad), (1, 1), 1))
            else:
                fp16 = record(name, "fp16 cudnn relu", lambda: torch.cudnn_convolution_relu(
                    xh, wh, b, (s, s), (pad, pad), (1, 1), 1))
            g = q.Geometry(k, k, (s, s), (pad,) * 4, (1, 1))
            bests = []
            for fp8 in (False, True):
                x8 = to8(x, fp8).contiguous(memory_format=torch.channels_last)
                bests.append(eight_bit(name, x8, to8(w, fp8), cout, r, g, fp8))
                if k == 1 and s == 1:
                    torch_product(name, x8.permute(0, 2, 3, 1).reshape(-1, cin), to8(w, fp8).reshape(cout, cin), fp8)
            summary.append((name, fp16, *bests))
    if "bert" in args.cases:
        for name, m, kdim, n in BERT:
            x = torch.randn(m, kdim, device=dev)
            w = torch.randn(n, kdim, device=dev) / kdim ** 0.5
            xh, wh, bh = x.half(), w.half(), torch.zeros(n, device=dev, dtype=torch.float16)
            fp16 = record(name, "fp16 F.linear", lambda: F.linear(xh, wh, bh))
            bests = []
            for fp8 in (False, True):
                x8, w8 = to8(x, fp8), to8(w, fp8)
                bests.append(eight_bit(name, x8, w8, n, None, None, fp8))
                torch_product(name, x8, w8, fp8)
            summary.append((name, fp16, *bests))
    print(f"\n{'shape':24s} {'fp16 ms':>9s} {'int8 ms':>9s} {'fp8 ms':>9s}  (best tile table, 8-bit codes out)")
    for name, fp16, i8, f8 in summary:
        cell = lambda v: f"{v:9.4f}" if v is not None else f"{'-':>9s}"     # noqa: E731
        print(f"{name:24s} {cell(fp16)} {cell(i8)} {cell(f8)}")
    out = Path(os.environ.get("OUT", "benchmarks/results")) / "qgemm_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                              indent=1))


if __name__ == "__main__":
    main()
