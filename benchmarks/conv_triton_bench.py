"""The Triton implicit-GEMM convolution (kernels/conv_triton.py) against cuDNN, on one GPU.

    PYTHONPATH=src python benchmarks/conv_triton_bench.py [--quick] [--budget 200]
    PYTHONPATH=src python benchmarks/conv_triton_bench.py --quick --cpu-smoke   # no GPU: correctness only

Shapes: YOLOv5l's convolutions (FP16 channels-last, SiLU; the C3 bottlenecks' 3×3 with the
shortcut after the SiLU) at batch 16 and 1, ResNet-50's (ReLU; one expanding 1×1 with the
residual before the ReLU) at batch 256. Per shape, each path runs once and is checked against
(a) (relative L2 < 2e-3, the builder's FP16 bar), then timed as the engine runs it: 20 calls
replayed from one CUDA graph, CUDA events, median of REPS replays, divided by 20.

  (a) eager:     cuDNN conv with bias, residual add and activation in place (the "torch" tactic)
  (b) epilogue:  cuDNN conv without bias + the Triton epilogue pass ("triton_epilogue")
  (c) cudnn_relu: cudnn_convolution_relu / _add_relu, ReLU layers only ("cudnn_fused")
  (d) igemm:     the new kernel, over a sweep of tile configs

(a) and (b) are timed twice: with cudnn.benchmark off (as the builder runs them) and on ("tuned").
The sweep tries the three tactics' configs first, then BLOCK_M ∈ {64,128} × BLOCK_N ∈ {64,128,256
(Cout ≥ 256)} × BLOCK_K ∈ {32,64} × warps {4,8} × stages {3,4} (no 4-warp 128×256 tiles), likeliest
first, until the shape's share of --budget (the whole run's target) is spent: Triton compiles
dominate (a batch-1 shape reuses its batch-16 twin's), and "configs" in the table says how much of
the sweep ran; a larger --budget sweeps more. The table's speed-up is the best torch path (tuned
or not) ÷ the best config. Results go to $OUT/conv_triton_bench.json when OUT is set, else
benchmarks/results/conv_triton_bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))        # plugins_bench's graph capture

CALLS, REPS, TOL = 20, 7, 2e-3


class Case(NamedTuple):
    name: str
    n: int
    cin: int
    cout: int
    k: int
    stride: int
    hw: int              # input height = width
    act: str
    residual: str        # "", "before" (act(conv + r)) or "after" (act(conv) + r)


# (Cin, Cout, kernel, stride, input size, residual)
YOLO = [(64, 128, 3, 2, 320, ""), (128, 64, 1, 1, 160, ""), (64, 64, 1, 1, 160, ""), (64, 64, 3, 1, 160, "after"),
        (128, 128, 1, 1, 160, ""), (128, 256, 3, 2, 160, ""), (256, 128, 1, 1, 80, ""), (128, 128, 3, 1, 80, "after"),
        (256, 256, 1, 1, 80, ""), (512, 256, 1, 1, 40, ""), (256, 256, 3, 1, 40, "after"), (1024, 512, 1, 1, 20, ""),
        (512, 512, 3, 1, 20, "after")]
RESNET = [(64, 64, 1, 1, 56, ""), (64, 64, 3, 1, 56, ""), (64, 256, 1, 1, 56, "before"), (256, 64, 1, 1, 56, ""),
          (128, 128, 3, 1, 28, ""), (512, 128, 1, 1, 28, ""), (256, 256, 3, 1, 14, ""), (1024, 256, 1, 1, 14, ""),
          (512, 512, 3, 1, 7, ""), (2048, 512, 1, 1, 7, "")]


def cases(quick: bool, smoke: bool) -> list[Case]:
    picks = [("yolo", 16, YOLO[3], "silu"), ("yolo", 16, YOLO[9], "silu"), ("resnet", 256, RESNET[2], "relu")]
    if not quick:
        picks = [("yolo", n, row, "silu") for row in YOLO for n in (16, 1)]
        picks += [("resnet", 256, row, "relu") for row in RESNET]
    out = []
    for prefix, n, (cin, cout, k, s, hw, res), act in picks:
        if smoke:       # the interpreter: same layer kinds, a few pixels and channels
            n, cin, cout, hw = 1, max(8, cin // 8), max(8, cout // 8), 6
        name = f"{prefix} b{n} {cin}→{cout} {k}x{k}/{s} @{hw}{' +res ' + res if res else ''}"
        out.append(Case(name, n, cin, cout, k, s, hw, act, res))
    return out


def sweep(conv_triton: Any, case: Case, m: int, smoke: bool) -> list:
    """Configs to try, in order: the three tactics' picks, then the grid, likeliest first (where the
    budget cuts the sweep short): tiles that still give every SM a program, bigger tiles, 64-wide
    K slices, 3 stages, 8 warps for 128×128 and up."""
    ct = conv_triton
    first = [ct.default_config(m, case.cout, case.cin), ct.wide_config(m, case.cout, case.cin),
             ct.small_config(m, case.cout, case.cin)]
    if smoke:
        return first[:1] + [ct.ConvConfig(16, 16, 16, 4, 2, 2)]
    grid = [ct.ConvConfig(bm, bn, bk, w, s)
            for bm in (64, 128) for bn in (64, 128, 256) for bk in (32, 64) for w in (4, 8) for s in (3, 4)
            if (bn < 256 or case.cout >= 256) and not (w == 4 and bm * bn > 128 * 128)]
    def likely(c):
        programs = -(-m // c.block_m) * -(-case.cout // c.block_n)
        tile = c.block_m * c.block_n
        return programs < 132, -tile, c.block_k != 64, c.num_stages != 3, c.num_warps != (8 if tile >= 16384 else 4)
    grid.sort(key=likely)
    return list(dict.fromkeys(first + grid))


def time_ms(fn: Callable[[], Any]) -> float:
    """Kernel milliseconds per call: CALLS calls captured in one CUDA graph, replayed REPS times."""
    import torch
    from plugins_bench import graphed

    replay = graphed(lambda: [fn() for _ in range(CALLS)])
    replay()
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS)
    return statistics.median(times)


def rel_l2(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / (b.norm() + 1e-12))


def run_case(case: Case, deadline: float, smoke: bool) -> dict:
    """One shape: every path checked against (a) and timed; configs swept until ``deadline``
    (perf_counter seconds), the three tactics' configs at least."""
    import torch
    import torch.nn.functional as F

    from kiln.kernels import conv_triton as ct
    from kiln.kernels.conv import _inplace_act
    from kiln.kernels.epilogue_triton import apply_epilogue

    dev, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.float16)
    cl = torch.channels_last
    pad = case.k // 2
    oh = (case.hw + 2 * pad - case.k) // case.stride + 1
    torch.manual_seed(0)
    x = torch.randn(case.n, case.cin, case.hw, case.hw, device=dev).to(dtype).contiguous(memory_format=cl)
    w = torch.randn(case.cout, case.cin, case.k, case.k, device=dev) / (case.cin * case.k ** 2) ** 0.5
    w = w.to(dtype).contiguous(memory_format=cl)
    b = (torch.randn(case.cout, device=dev) * 0.1).to(dtype)
    r = None
    if case.residual:
        r = torch.randn(case.n, case.cout, oh, oh, device=dev).to(dtype).contiguous(memory_format=cl)
    after = case.residual == "after"
    stride, pads = (case.stride,) * 2, (pad,) * 2

    def eager():
        y = F.conv2d(x, w, b, stride, pads)
        if r is not None and not after:
            y.add_(r)
        y = _inplace_act(y, case.act, {})
        return y.add_(r) if after else y

    def epilogue():
        return apply_epilogue(F.conv2d(x, w, None, stride, pads), b, r, case.act, residual_after=after)

    def cudnn_relu():
        if r is not None:
            return torch.cudnn_convolution_add_relu(x, w, r, 1.0, b, stride, pads, (1, 1), 1)
        return torch.cudnn_convolution_relu(x, w, b, stride, pads, (1, 1), 1)

    torch_paths = {"eager": eager}
    if not smoke:
        torch_paths["epilogue"] = epilogue
        if case.act == "relu" and not after:
            torch_paths["cudnn_relu"] = cudnn_relu
    ref = eager()
    row: dict[str, Any] = {"case": case.name, "torch_ms": {}, "tuned_ms": {}, "igemm": [], "errors": []}
    for name, fn in torch_paths.items():
        try:
            err = rel_l2(fn(), ref)
            if err > TOL:
                row["errors"].append(f"{name} rel-L2 {err:.1e}")
            elif not smoke:
                row["torch_ms"][name] = time_ms(fn)
        except Exception as e:                  # e.g. a cuDNN build without the fused ReLU entry points
            row["errors"].append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    if not smoke:
        torch.backends.cudnn.benchmark = True
        try:
            for name in ("eager", "epilogue"):
                if name in row["torch_ms"]:
                    row["tuned_ms"][name] = time_ms(torch_paths[name])
        finally:
            torch.backends.cudnn.benchmark = False

    wt = ct.arrange_weight(w)
    m = case.n * oh * oh
    configs = sweep(ct, case, m, smoke)
    for i, cfg in enumerate(configs):
        if i >= 3 and time.perf_counter() > deadline:
            break

        def igemm(cfg=cfg):
            return ct.conv2d_nhwc(x, wt, b, r, stride, (pad,) * 4, (1, 1), case.act, residual_after=after, config=cfg)
        try:
            err = rel_l2(igemm(), ref)
            ms = None if smoke or err > TOL else time_ms(igemm)
        except Exception as e:                  # a config the GPU cannot run (shared memory): skip it
            row["errors"].append(f"{tuple(cfg)}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        if err > TOL:
            row["errors"].append(f"{tuple(cfg)} rel-L2 {err:.1e}")
        row["igemm"].append({"config": list(cfg), "ms": ms, "rel_l2": err})
    row["configs_tried"] = f"{len(row['igemm'])}/{len(configs)}"
    return row


def summarize(row: dict) -> str:
    torch_all = {**row["torch_ms"], **{f"{k} tuned": v for k, v in row["tuned_ms"].items()}}
    good = [e for e in row["igemm"] if e["rel_l2"] <= TOL and e["ms"] is not None]
    if not torch_all or not good:
        ok = all(e["rel_l2"] <= TOL for e in row["igemm"]) and not row["errors"]
        return f"{row['case']:<40} {'correct' if ok else 'WRONG'} ({row['configs_tried']} configs checked)"
    tname, tms = min(torch_all.items(), key=lambda kv: kv[1])
    best = min(good, key=lambda e: e["ms"])
    row["best"] = {"torch": tname, "torch_ms": tms, "igemm_ms": best["ms"], "config": best["config"],
                   "speedup": tms / best["ms"]}
    plain = min(row["torch_ms"].values())
    return (f"{row['case']:<40} {plain:8.4f} {tms:8.4f} {tname:<16} {best['ms']:8.4f} "
            f"{str(tuple(best['config'][:5])):<24} {tms / best['ms']:5.2f}x  {row['configs_tried']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three shapes")
    ap.add_argument("--budget", type=float, default=200.0,
                    help="seconds the whole run aims at; each shape gets an equal share of what is left")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: tiny shapes through Triton's interpreter, correctness only")
    args = ap.parse_args(argv)
    if args.cpu_smoke:      # before Triton is imported: the interpreter is chosen when kernels are defined
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("conv_triton_bench needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    todo = cases(args.quick, args.cpu_smoke)
    device = "cpu (interpreter)" if args.cpu_smoke else torch.cuda.get_device_name()
    print(f"{len(todo)} shapes on {device}; budget {args.budget:.0f} s", flush=True)
    t0 = time.perf_counter()
    rows, lines = [], []
    for i, case in enumerate(todo):
        now = time.perf_counter()
        row = run_case(case, now + max(0.0, t0 + args.budget - now) / (len(todo) - i), args.cpu_smoke)
        rows.append(row)
        lines.append(summarize(row))
        print(f"[{i + 1}/{len(todo)} {time.perf_counter() - t0:5.0f}s] {lines[-1]}", flush=True)
        for e in row["errors"]:
            print(f"    {e}", flush=True)
        if not args.cpu_smoke:
            torch.cuda.empty_cache()
    print()
    print(f"{'shape':<40} {'torch ms':>8} {'best ms':>8} {'best torch path':<16} {'igemm ms':>8} "
          f"{'config (BM,BN,BK,w,s)':<24} speed-up  configs")
    for line in lines:
        print(line)
    wrong = [r["case"] for r in rows if any(e["rel_l2"] > TOL for e in r["igemm"])]
    if wrong:
        print(f"WRONG results on: {', '.join(wrong)}")
    if not args.cpu_smoke:
        out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        env = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
               "cudnn": torch.backends.cudnn.version()}
        path = out_dir / "conv_triton_bench.json"
        path.write_text(json.dumps({"env": env, "results": rows}, indent=2))
        print(f"wrote {path}")
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
