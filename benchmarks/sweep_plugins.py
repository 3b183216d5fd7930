"""Launch-configuration sweep for Triton kernels: GridSample, DCNv2 im2col, NHWC pooling (GPU machine).

    python benchmarks/sweep_plugins.py [--only grid_sample,deform_conv,pool]
    python benchmarks/sweep_plugins.py --only dcn_fused      # DCNv2 implicit GEMM + transpose (~3 min)

For each realistic shape: every (BLOCK_C, BLOCK_P, channel chunk, num_warps) candidate is
checked against the peer's output, then timed from a CUDA graph (kernel time, no launch
overhead) with CUDA events; prints the current configuration's time, the best five, and the
peer's time eager and from a CUDA graph. The winners inform the *_launch_config functions.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plugins_bench import dcn_problem, graphed, time_ms  # noqa: E402

from kiln.plugins.builtin import deform_conv as dcn  # noqa: E402
from kiln.plugins.builtin import grid_sample as gs  # noqa: E402

DEV = "cuda"


def sweep(title, configs, make_call, check, current, peer):
    rows = []
    for cfg in configs:
        try:
            call = make_call(cfg)
            call()
            if not check():
                rows.append((float("inf"), cfg, "WRONG"))
                continue
            rows.append((time_ms(graphed(call), 50)["median"], cfg, ""))
        except Exception as exc:       # a config may not compile (registers, shared memory)
            rows.append((float("inf"), cfg, type(exc).__name__))
    rows.sort(key=lambda r: r[0])
    cur = next((r for r in rows if r[1] == current), None)
    pe, pg = time_ms(peer, 50)["median"], time_ms(graphed(peer), 50)["median"]
    print(f"== {title}: peer eager {pe:.4f} ms, peer graph {pg:.4f} ms; current {current} "
          f"{cur[0] if cur else float('nan'):.4f} ms")
    for t, cfg, note in rows[:6]:
        print(f"   {t:.4f} ms  (BLOCK_C, BLOCK_P, chunk, warps) = {cfg} {note}")
    bad = [r for r in rows if r[2] == "WRONG"]
    if bad:
        print(f"   {len(bad)} configs gave wrong results, e.g. {bad[0][1]}")


def grid_sample_cases():
    for dtype, (n, c, h, w) in itertools.product((torch.float32, torch.float16),
                                                  ((8, 64, 128, 128), (32, 32, 64, 64), (4, 256, 32, 100))):
        g = torch.Generator(DEV).manual_seed(3)
        x = torch.randn(n, c, h, w, device=DEV, generator=g).to(dtype)
        theta = torch.eye(2, 3, device=DEV)[None] + 0.1 * torch.randn(n, 2, 3, device=DEV, generator=g)
        grid = F.affine_grid(theta, [n, c, h, w], align_corners=False).to(dtype)
        p = gs.GridSample(mode="bilinear", padding_mode="zeros", align_corners=0)
        out = torch.empty(n, c, h, w, device=DEV, dtype=dtype)
        want = F.grid_sample(x.float(), grid.float(), align_corners=False)
        configs = [(bc, bp, ch, wp) for bc in (1, 2, 4, 8, 16) for bp in (64, 128, 256, 512) for wp in (2, 4, 8)
                   for ch in (c, max(bc, c // 2), max(bc, c // 4)) if bc * bp <= 4096]
        current = gs.grid_sample_launch_config(n, c, h * w, "bilinear")
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        sweep(f"GridSample {str(dtype)[6:]} [{n},{c},{h},{w}]", configs,
              lambda cfg: (lambda: gs._grid_sample_triton(p, x, grid, out, cfg)),
              lambda: bool(torch.allclose(out.float(), want, rtol=tol, atol=tol)), current,
              lambda: F.grid_sample(x, grid, align_corners=False))


def deform_conv_cases(channels_last: bool = False):
    import torchvision
    for dtype, batch in ((torch.float32, 1), (torch.float32, 8), (torch.float16, 8)):
        x, w, bias, off, mask, want, tol = dcn_problem(batch, dtype, channels_last)
        p = dcn.ModulatedDeformConv2d(pads=[1, 1, 1, 1])
        geo = dcn._Geo(p, x, w, off, mask, 3, 3)
        ws = torch.empty(p.workspace_size([dcn.TensorDesc(tuple(t.shape), str(t.dtype)[6:])
                                           for t in (x, w, off, bias, mask)]), dtype=torch.uint8, device=DEV)
        out = torch.empty(batch, 256, 64, 64, device=DEV, dtype=dtype)
        configs = [(bc, bp, ch, wp) for bc in (1, 2, 4, 8) for bp in (64, 128, 256) for wp in (4, 8)
                   for ch in (16, 64, 256) if bc <= ch]
        if channels_last:
            configs = [(bc, bp, ch, wp) for bc in (4, 8, 16, 32) for bp in (16, 32, 64, 128) for wp in (2, 4, 8)
                       for ch in (32, 64, 256) if bc <= ch and bc * bp <= 4096]
        sweep(f"DCNv2 im2col+GEMM {str(dtype)[6:]} b{batch}{' X channels-last' if channels_last else ''}", configs,
              lambda cfg: (lambda: dcn._im2col_gemm(p, x, w, off, bias, mask, out, ws, geo, cfg)),
              lambda: bool(torch.allclose(out.float(), want, rtol=tol, atol=tol * float(want.abs().max()))),
              dcn.im2col_launch_config(geo, x.element_size()),
              lambda: torchvision.ops.deform_conv2d(x, off, w, bias, padding=(1, 1), mask=mask))


def _time_dcn_configs(configs, make_call, out, check):
    """[(ms, config, note)] fastest first: each configuration's output is checked (``out`` is
    poisoned first), then timed from a CUDA graph; failures to compile or launch (registers,
    shared memory) become rows with the error, not a crash."""
    rows = []
    for cfg in configs:
        try:
            call = make_call(cfg)
            out.fill_(float("nan"))
            call()
            if not check():
                rows.append((float("inf"), cfg, "WRONG"))
                continue
            rows.append((time_ms(graphed(call), 50)["median"], cfg, ""))
        except Exception as exc:
            rows.append((float("inf"), cfg, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:100]}"))
    return sorted(rows, key=lambda r: r[0])


def _print_dcn_rows(rows, label, best):
    for t, cfg, note in rows[:best]:
        print(f"   {t:.4f} ms  {label} = {cfg} {note}")
    for t, cfg, note in rows[best:]:
        if note:
            print(f"   failed {cfg}: {note}")


def dcn_fused_cases():
    """The implicit-GEMM tactic's fused_configs per (dtype, batch) at 256->256 3x3 @64x64 (X NCHW, so
    each call includes the transposes into the workspace); next to them torchvision, the
    im2col+cuBLAS tactic and the default configuration. Then the NCHW -> NHWC transpose's tiles
    against torch's permute-copy."""
    import torchvision
    for dtype, batch in ((torch.float16, 1), (torch.float16, 8), (torch.float32, 1), (torch.float32, 8)):
        x, w, bias, off, mask, want, tol = dcn_problem(batch, dtype)
        p = dcn.ModulatedDeformConv2d(pads=[1, 1, 1, 1])
        geo = dcn._Geo(p, x, w, off, mask, 3, 3)
        ws = torch.empty(p.workspace_size([dcn.TensorDesc(tuple(t.shape), str(t.dtype)[6:])
                                           for t in (x, w, off, bias, mask)]), dtype=torch.uint8, device=DEV)
        out = torch.empty(batch, 256, 64, 64, device=DEV, dtype=dtype)
        ieee = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
        current = dcn.fused_launch_config(geo, x.element_size(), ieee)
        configs = dcn.fused_configs(x.element_size(), ieee)
        rows = _time_dcn_configs(
            ([current] if current not in configs else []) + configs,
            lambda cfg: (lambda: dcn._implicit_gemm(p, x, w, off, bias, mask, out, ws, geo, cfg)), out,
            lambda: bool(torch.allclose(out.float(), want, rtol=tol, atol=tol * float(want.abs().max()))))
        peer = lambda: torchvision.ops.deform_conv2d(x, off, w, bias, padding=(1, 1), mask=mask)  # noqa: E731
        pe, pg = time_ms(peer, 50)["median"], time_ms(graphed(peer), 50)["median"]
        im2col = time_ms(graphed(lambda: dcn._im2col_gemm(p, x, w, off, bias, mask, out, ws, geo)), 50)["median"]
        title = f"DCNv2 implicit GEMM {str(dtype)[6:]}{' ieee' if ieee else ''} b{batch}"
        print(f"== {title}: torchvision eager {pe:.4f} ms, graph {pg:.4f} ms; im2col+cuBLAS graph {im2col:.4f} ms; "
              f"default {current} {next(r[0] for r in rows if r[1] == current):.4f} ms")
        _print_dcn_rows(rows, "(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)", 8)
        print(f"   BEST {title}: {rows[0][1]} {rows[0][0]:.4f} ms vs torchvision graph {pg:.4f} ms "
              f"({pg / rows[0][0]:.2f}x)")
    for dtype in (torch.float16, torch.float32):
        x = torch.randn(8, 256, 64, 64, device=DEV).to(dtype)
        buf = torch.empty(8, 64, 64, 256, device=DEV, dtype=dtype)
        want = x.permute(0, 2, 3, 1).contiguous()
        configs = [(64, 64, 4), (32, 64, 4), (64, 32, 4), (32, 128, 4), (128, 32, 4), (64, 128, 4), (128, 64, 8),
                   (64, 64, 8), (128, 128, 8)]
        rows = _time_dcn_configs(configs, lambda cfg: (lambda: dcn._to_nhwc(x, buf, cfg)), buf,
                                 lambda: bool(torch.equal(buf, want)))
        torch_ms = time_ms(graphed(lambda: buf.copy_(x.permute(0, 2, 3, 1))), 50)["median"]
        cur = next(r[0] for r in rows if r[1] == dcn.TRANSPOSE_CONFIG)
        print(f"== NCHW->NHWC {str(dtype)[6:]} [8,256,64,64]: torch permute-copy graph {torch_ms:.4f} ms; "
              f"current {dcn.TRANSPOSE_CONFIG} {cur:.4f} ms")
        _print_dcn_rows(rows, "(BLOCK_R, BLOCK_S, warps)", 4)


def pool_cases():
    from kiln.kernels import pool_triton as pt
    cases = [("max 3x3 s2 p1", (256, 64, 112, 112), (3, 3), (2, 2), (1, 1, 1, 1)),
             ("max 3x3 s2 p1", (32, 64, 112, 112), (3, 3), (2, 2), (1, 1, 1, 1)),
             ("max 3x3 s2 p1", (1, 64, 112, 112), (3, 3), (2, 2), (1, 1, 1, 1)),
             ("max 5x5 s1 p2", (1, 512, 20, 20), (5, 5), (1, 1), (2, 2, 2, 2)),
             ("max 5x5 s1 p2", (16, 512, 20, 20), (5, 5), (1, 1), (2, 2, 2, 2))]
    for title, shape, k, st, pads in cases:
        x = torch.randn(shape, device=DEV).half().contiguous(memory_format=torch.channels_last)
        want = F.max_pool2d(x, k, st, pads[:2])
        holder = {}
        configs = [(bp, bc, wp) for bc in (16, 32, 64, 128) for bp in (8, 16, 32, 64, 128) for wp in (1, 2, 4, 8)
                   if bc * bp <= 8192]
        n, c, h, w = shape
        ho, wo = want.shape[2], want.shape[3]
        sweep(f"MaxPool fp16 NHWC {title} {list(shape)}", configs,
              lambda cfg: (lambda: holder.__setitem__("y", pt.pool2d(x, k, st, pads, config=cfg))),
              lambda: bool(torch.equal(holder["y"], want)), pt.pool_launch_config(n, c, ho * wo, True),
              lambda: F.max_pool2d(x, k, st, pads[:2]))
    for shape in ((256, 2048, 7, 7), (1, 2048, 7, 7), (32, 960, 7, 7)):
        x = torch.randn(shape, device=DEV).half().contiguous(memory_format=torch.channels_last)
        want = F.adaptive_avg_pool2d(x, 1)
        holder = {}
        configs = [(bh, bc, wp) for bc in (16, 32, 64, 128) for bh in (8, 16, 32, 64) for wp in (1, 2, 4)]
        sweep(f"GlobalAvgPool fp16 NHWC {list(shape)}", configs,
              lambda cfg: (lambda: holder.__setitem__("y", pt.global_pool(x, "average", config=cfg))),
              lambda: bool(torch.allclose(holder["y"].float(), want.float(), atol=2e-3, rtol=2e-3)),
              pt.global_pool_launch_config(shape[0], shape[1], shape[2] * shape[3], True),
              lambda: F.adaptive_avg_pool2d(x, 1))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="grid_sample,deform_conv,pool")
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    if "grid_sample" in args.only:
        grid_sample_cases()
    if "deform_conv" in args.only:
        deform_conv_cases()
    if "dcn_nhwc" in args.only:
        deform_conv_cases(channels_last=True)
    if "dcn_fused" in args.only:
        dcn_fused_cases()
    if "pool" in args.only:
        pool_cases()
    return 0


if __name__ == "__main__":
    sys.exit(main())
