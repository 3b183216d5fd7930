"""The 8-bit Triton convolution/GEMM (kernels/int8_gemm.py) against FP16 cuDNN/cuBLAS and torch's 8-bit GEMMs.

    PYTHONPATH=src:benchmarks python benchmarks/qgemm_bench.py [--cases resnet,bert] [--json]
    PYTHONPATH=src:benchmarks python benchmarks/qgemm_bench.py --sweep [--jobs 16] [--budget-s 330] [--json]

Per layer shape (ResNet-50's at batch 256, BERT-base's GEMMs at 32x128 tokens): the FP16 layer as the FP16
engine runs it (cuDNN channels-last conv + bias + ReLU, or a cuBLAS linear), then the 8-bit kernel with int8
and FP8 codes, writing 8-bit codes, FP16 or FP32 (with a float residual where the layer has one), with its
three tile tables (and, on stride-1 layers, the TMA kernels': int8_tma.py), plus ``torch._int_mm`` /
``torch._scaled_mm`` on the GEMM (the product alone) where the shape is a GEMM. Times are kernel milliseconds
per call (20 calls in one CUDA graph, median of 7 replays), the same as conv_triton_bench. The table ends with
each shape's best 8-bit time over FP16's.

``--sweep`` times, per shape and code type (int8, FP8; 8-bit codes out, ReLU), a grid of tile configs of the
implicit-GEMM kernel (``sweep_configs``: BLOCK_M/N in 64-256, BLOCK_K 64/128, 4 or 8 warps, 3-5 stages, none
over the shared memory limit) and, for stride-1 layers, of the TMA kernels (``tma_sweep_configs``,
int8_tma.py: plain and persistent GEMMs, the 3x3 implicit GEMM), then the best one's GROUP_M variants (and warp
specialization for a persistent one), each checked against the default table's codes, and prints per shape the
best config, its time, TOPS and share of the 8-bit dense peak beside FP16 and the default tile table. The
configs are first compiled (and run once) in ``--jobs`` worker processes, filling Triton's on-disk cache, so the
timing process only loads them; configs still untimed when ``--budget-s`` has passed are counted as skipped.
``--json`` prints the summary as one JSON line at the end; it and every timed row go to $OUT/qgemm_bench.json
(else benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (name, batch, Cin, Cout, kernel, stride, input size, residual) for convolutions; (name, M, K, N) for GEMMs
RESNET = [("r50 1x1 64>256 +res", 256, 64, 256, 1, 1, 56, True), ("r50 1x1 256>64", 256, 256, 64, 1, 1, 56, False),
          ("r50 3x3 64>64", 256, 64, 64, 3, 1, 56, False), ("r50 3x3 128>128", 256, 128, 128, 3, 1, 28, False),
          ("r50 1x1 1024>256", 256, 1024, 256, 1, 1, 14, False), ("r50 3x3 512>512", 256, 512, 512, 3, 1, 7, False)]
BERT = [("bert qkv", 4096, 768, 768), ("bert ffn1", 4096, 768, 3072), ("bert ffn2", 4096, 3072, 768)]
PEAK_TOPS = 1979.0          # H100 SXM dense INT8/FP8 tensor-core peak
SMEM = 232448               # H100 shared memory per block (227 KB)
GROUPS = (1, 4, 16)         # GROUP_M variants tried on each shape's best config (8 in the grid)


class Shape(NamedTuple):
    """One layer: the GEMM it is (M x N x K) and, for a convolution, its window."""

    name: str
    m: int
    n: int
    k: int                  # the GEMM's depth: Cin * kh * kw
    cin: int
    batch: int = 0          # 0: a plain GEMM
    kernel: int = 1
    stride: int = 1
    hw: int = 1
    residual: bool = False

    @property
    def out_hw(self) -> int:
        """The convolution's output height (= width)."""
        return (self.hw + 2 * (self.kernel // 2) - self.kernel) // self.stride + 1

    @property
    def gemm(self) -> bool:
        """Whether the layer is a plain [M, K] x [K, N] GEMM (an FC, or a 1x1 stride-1 convolution in NHWC)."""
        return self.kernel == 1 and self.stride == 1


def shapes(cases: str) -> list[Shape]:
    out = []
    if "resnet" in cases:
        for name, n, cin, cout, k, s, hw, res in RESNET:
            s1 = Shape(name, 0, cout, cin * k * k, cin, n, k, s, hw, res)
            out.append(s1._replace(m=n * s1.out_hw ** 2))
    if "bert" in cases:
        out += [Shape(name, m, n, kdim, kdim) for name, m, kdim, n in BERT]
    return out


def _pow2(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


def sweep_configs(s: Shape) -> list:
    """The tile grid of the implicit-GEMM kernel for shape ``s``: BLOCK_M x BLOCK_N from 64x64 to 128x256 and
    256x128 (256x64 for N <= 64; no N tile wider than the layer, none under 128x128 where 128x128 tiles alone
    fill the GPU four times), BLOCK_K 64/128 (at most Cin rounded up), 4 warps below 128x128 tiles, 4 or 8 at
    128x128, 8 above, 3-5 stages within the shared memory, GROUP_M 8."""
    from kiln.kernels.int8_gemm import QGemmConfig

    big = -(-s.m // 128) * -(-s.n // 128) >= 4 * 132
    tiles = [(64, 64), (64, 128), (128, 64), (128, 128), (128, 256), (256, 128)] + [(256, 64)] * (s.n <= 64)
    out = []
    for bm, bn in tiles:
        if bn > max(64, _pow2(s.n)) or (big and bm * bn < 128 * 128 and s.n > 64):
            continue
        for bk in sorted({min(b, max(32, _pow2(s.cin))) for b in (64, 128)}):
            for warps in ((4,) if bm * bn < 128 * 128 else (4, 8) if bm * bn == 128 * 128 else (8,)):
                for stages in (3, 4, 5):
                    if stages * (bm + bn) * bk <= SMEM:
                        out.append(QGemmConfig(bm, bn, bk, warps, stages))
    return out


def tma_sweep_configs(s: Shape) -> list:
    """The TMA kernels' grid for a stride-1 shape: for a plain GEMM 128x64 (N <= 64), 128x128, 128x256 and
    256x128 tiles, plain and persistent; for a convolution blocks of 64 or 128 pixels by 64-256 channels; 8 warps
    (4 under 128x128), BLOCK_K 64/128, 3-5 stages within the shared memory, the epilogue in halves for 256-wide
    tiles."""
    from kiln.kernels.int8_tma import SMEM as TMA_SMEM
    from kiln.kernels.int8_tma import TmaConfig, smem_bytes

    if s.stride != 1:
        return []
    if s.gemm:
        tiles = [(128, 64)] if s.n <= 64 else [(128, 128), (128, 256), (256, 128)]
    else:               # the implicit GEMM's pixel blocks: 64 or 128 pixels
        tiles = [(bm, bn) for bm in (64, 128) for bn in (64, 128, 256) if bn <= max(64, _pow2(s.n))]
    out = []
    for bm, bn in tiles:
        for bk in sorted({min(b, max(32, _pow2(s.cin))) for b in (64, 128)}):
            for stages in (3, 4, 5):
                for persistent in (False, True) if s.gemm else (False,):
                    cfg = TmaConfig(bm, bn, bk, 4 if bm * bn < 128 * 128 else 8, stages, split=2 if bn == 256 else 1,
                                    persistent=persistent)
                    if smem_bytes(cfg) <= TMA_SMEM:
                        out.append(cfg)
    return out


def label(cfg) -> str:
    """A tile config in a few characters: BMxBNxBK, warps, stages, GROUP_M (and the TMA kernel's options)."""
    text = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} g{cfg.group_m}"
    for flag, on in (("split2", getattr(cfg, "split", 1) == 2), ("persistent", getattr(cfg, "persistent", False)),
                     ("ws", getattr(cfg, "warp_specialize", False))):
        text += f" {flag}" if on else ""
    return text


def to8(t, fp8: bool):
    import torch
    return (t * 8).clamp(-448, 448).to(torch.float8_e4m3fn) if fp8 else (t * 30).round().clamp(-128, 127).to(torch.int8)


class Inputs(NamedTuple):
    x8: Any                 # the input codes as the layer reads them (NCHW channels-last, or [M, K])
    wk: Any                 # K-major weight codes [N, K]
    ep: Any                 # epilogue terms
    geometry: Any           # the convolution's window (None for a GEMM)


def make_inputs(s: Shape, fp8: bool, dev: str = "cuda") -> Inputs:
    """Random codes of shape ``s`` (the same in every process: seeded)."""
    import torch

    from kiln.kernels import int8_gemm as q
    torch.manual_seed(0)
    if s.batch:
        x = torch.randn(s.batch, s.cin, s.hw, s.hw, device=dev)
        w = torch.randn(s.n, s.cin, s.kernel, s.kernel, device=dev) / s.k ** 0.5
        x8 = to8(x, fp8).contiguous(memory_format=torch.channels_last)
        geometry = q.Geometry(s.kernel, s.kernel, (s.stride,) * 2, (s.kernel // 2,) * 4, (1, 1))
    else:
        x8, w = to8(torch.randn(s.m, s.k, device=dev), fp8), torch.randn(s.n, s.k, device=dev) / s.k ** 0.5
        geometry = None
    ep = q.Epilogue(torch.zeros(s.n, dtype=torch.int32, device=dev), torch.full((s.n,), 1e-3, device=dev), 0)
    return Inputs(x8, q.k_major(to8(w, fp8)), ep, geometry)


def runner(inp: Inputs, fp8: bool, kernel: str, cfg) -> Callable[[], Any]:
    """One call of the kernel with tile config ``cfg`` on ``inp``, writing 8-bit codes with a ReLU (``kernel``
    names it in the tables; the config's type picks the pointer or the TMA kernel)."""
    import torch

    from kiln.kernels import int8_gemm as q
    out = q.Codes(torch.float8_e4m3fn if fp8 else torch.int8, 0.05, 0)
    return lambda: q.qgemm(inp.x8, inp.wk, inp.ep, out, None, "relu", geometry=inp.geometry, config=cfg)


_WORKER: dict = {}


def _precompile(job: tuple) -> str | None:
    """Worker process: compile and run one sweep job once (Triton caches the kernel on disk); the error if any."""
    s, fp8, kernel, cfg = job
    try:
        import torch
        if _WORKER.get("key") != (s, fp8):
            _WORKER.clear()
            _WORKER.update(key=(s, fp8), inputs=make_inputs(s, fp8))
        runner(_WORKER["inputs"], fp8, kernel, cfg)()
        torch.cuda.synchronize()
        return None
    except Exception as e:          # a config the GPU cannot run (shared memory, registers): reported, skipped
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def precompile(jobs: list[tuple], procs: int, deadline: float) -> dict[tuple, str]:
    """Compile ``jobs`` in ``procs`` spawned processes; the jobs that failed, with their error. A job that kills
    its worker (a compiler crash) breaks the pool: the jobs it took down run once more in a fresh one, and those
    lost again count as failed, so the timing process never compiles them; so do jobs not started by
    ``deadline`` (perf_counter seconds)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures import TimeoutError as Late
    from concurrent.futures.process import BrokenProcessPool

    failed: dict[tuple, str] = {}
    for _ in range(2):
        if procs <= 0 or not jobs:
            break
        lost = []
        pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"))
        futures = [(job, pool.submit(_precompile, job)) for job in jobs]
        for job, fut in futures:
            try:
                err = fut.result(timeout=max(0.0, deadline - time.perf_counter()))
            except BrokenProcessPool:
                lost.append(job)
                continue
            except Late:
                err = "not compiled within the budget"
                fut.cancel()
            if err is not None:
                failed[job] = err
        pool.shutdown(wait=True, cancel_futures=True)
        jobs = lost
    failed.update({job: "the compiling process died" for job in jobs})
    return failed


def agrees_with(want, fp8: bool) -> Callable[[Any], bool]:
    """Whether a config's codes are the default table's: the same for int8 (exact int32 sums, one epilogue); for
    FP8, whose FP32 sums depend on the summation order, at most 1% of the codes one step off."""
    import torch

    def check(got) -> bool:
        if not fp8:
            return torch.equal(got, want)
        g, w = got.float(), want.float()
        step = torch.clamp(w.abs() / 8, min=2.0 ** -9) * 1.0001
        return bool(((g - w).abs() <= step).all()) and float((g != w).float().mean()) <= 0.01
    return check


def tops(s: Shape, ms: float | None) -> float | None:
    return None if ms is None else 2.0 * s.m * s.n * s.k / (ms * 1e-3) / 1e12


def sweep(args, record: Callable, fp16_ms: Callable[[Shape], float | None]) -> list[dict]:
    """The tile sweep (module docstring); one summary dict per shape and code type."""
    from kiln.kernels import int8_gemm as q

    todo = [(s, fp8) for s in shapes(args.cases) for fp8 in (False, True)]
    grids = {(s, fp8): [("igemm", c) for c in sweep_configs(s)] + [("tma", c) for c in tma_sweep_configs(s)]
             for s, fp8 in todo}
    t0 = time.perf_counter()
    total = sum(len(g) for g in grids.values())
    print(f"sweep: {total} configs over {len(todo)} shape x code pairs, compiled in {args.jobs} processes, "
          f"then timed (budget {args.budget_s:.0f} s)", flush=True)
    deadline = t0 + 0.85 * args.budget_s          # the rest for the GROUP_M variants
    # round robin over the shapes, so a budget cut leaves every shape some configs
    jobs = sorted(((i, (s, fp8, k, c)) for (s, fp8), g in grids.items() for i, (k, c) in enumerate(g)),
                  key=lambda job: job[0])
    failed = precompile([job for _, job in jobs], args.jobs, t0 + 0.6 * args.budget_s)
    print(f"  compiled in {time.perf_counter() - t0:.0f} s ({len(failed)} failed or late)", flush=True)
    results, skipped = {}, 0
    for i, (s, fp8) in enumerate(todo):
        inp = make_inputs(s, fp8)
        tag = "fp8" if fp8 else "int8"
        check = agrees_with(runner(inp, fp8, "igemm", q.default_config(s.m, s.n, s.cin))(), fp8)
        times = {}
        until = time.perf_counter() + (deadline - time.perf_counter()) / (len(todo) - i)    # this pair's share
        for kernel, cfg in grids[(s, fp8)]:
            if (s, fp8, kernel, cfg) in failed:
                continue
            if time.perf_counter() > until:
                skipped += 1
                continue
            times[(kernel, cfg)] = record(s.name, f"{tag} {kernel} {label(cfg)}", runner(inp, fp8, kernel, cfg),
                                          check)
        results[(s, fp8)] = (inp, {k: v for k, v in times.items() if v is not None}, check)
    # the best config's GROUP_M variants, compiled together
    variants = {}
    for pair, (_, times, _) in results.items():
        if times:
            kernel, cfg = min(times, key=times.get)
            variants[pair] = [(kernel, cfg._replace(group_m=g)) for g in GROUPS]
            if kernel == "tma" and cfg.persistent:       # Triton's warp specialization (may not compile on sm_90)
                variants[pair].append((kernel, cfg._replace(warp_specialize=True)))
    deadline = t0 + args.budget_s
    failed = precompile([(s, fp8, k, c) for (s, fp8), v in variants.items() for k, c in v], args.jobs,
                        deadline - 10)
    for (s, fp8), v in variants.items():
        inp, times, check = results[(s, fp8)]
        for kernel, cfg in v:
            if (s, fp8, kernel, cfg) in failed or time.perf_counter() > deadline:
                skipped += (s, fp8, kernel, cfg) not in failed
                continue
            ms = record(s.name, f"{'fp8' if fp8 else 'int8'} {kernel} {label(cfg)}", runner(inp, fp8, kernel, cfg),
                        check)
            if ms is not None:
                times[(kernel, cfg)] = ms
    summary = []
    for s in shapes(args.cases):
        base = fp16_ms(s)
        for fp8 in (False, True):
            inp, times, _ = results[(s, fp8)]
            dflt = record(s.name, f"{'fp8' if fp8 else 'int8'} default table",
                          runner(inp, fp8, "igemm", q.default_config(s.m, s.n, s.cin)))
            best_of = {k: min((v for (kk, _), v in times.items() if kk == k), default=None)
                       for k in ("igemm", "tma")}
            best = min(times, key=times.get) if times else None
            ms = times[best] if best else None
            summary.append({"shape": s.name, "codes": "fp8" if fp8 else "int8", "M": s.m, "N": s.n, "K": s.k,
                            "fp16_ms": base, "fp16_tops": tops(s, base), "default_ms": dflt, "best_ms": ms,
                            "best_tops": tops(s, ms), "best_pct_peak": None if ms is None else
                            100 * tops(s, ms) / PEAK_TOPS, "best": None if best is None else
                            f"{best[0]} {label(best[1])}", "best_igemm_ms": best_of["igemm"],
                            "best_tma_ms": best_of["tma"], "configs_timed": len(times)})
    print(f"\nsweep done in {time.perf_counter() - t0:.0f} s; {skipped} configs skipped at the budget")
    cell = lambda v, f="9.4f": f"{v:{f}}" if v is not None else f"{'-':>9s}"     # noqa: E731
    print(f"\n{'shape':22s} {'codes':5s} {'fp16 ms':>9s} {'default':>9s} {'igemm':>9s} {'tma':>9s} {'best ms':>9s} "
          f"{'TOPS':>6s} {'% peak':>6s} {'x fp16':>6s}  best config")
    for r in summary:
        gain = r["fp16_ms"] / r["best_ms"] if r["fp16_ms"] and r["best_ms"] else None
        print(f"{r['shape']:22s} {r['codes']:5s} {cell(r['fp16_ms'])} {cell(r['default_ms'])} "
              f"{cell(r['best_igemm_ms'])} {cell(r['best_tma_ms'])} {cell(r['best_ms'])} "
              f"{cell(r['best_tops'], '6.0f')} {cell(r['best_pct_peak'], '5.1f')}% {cell(gain, '6.2f')}  "
              f"{r['best'] or '-'}")
    return summary


def main() -> None:
    import torch
    import torch.nn.functional as F

    from conv_triton_bench import time_ms
    from kiln.kernels import int8_gemm as q

    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="resnet,bert")
    ap.add_argument("--sweep", action="store_true", help="time a grid of tile configs per shape")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                    help="processes compiling the sweep's configs (0: compile in the timing process)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="the sweep's time limit, compiles included")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
    args = ap.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    rows = []

    def record(shape: str, path: str, fn, check: Callable[[Any], bool] | None = None) -> float | None:
        try:
            out = fn()
            if check is not None and not check(out):
                print(f"  {shape:24s} {path:40s} WRONG: differs from the default table's output", flush=True)
                return None
            ms = time_ms(fn)
        except Exception as e:                  # a tile table the GPU cannot run: say so, go on
            print(f"  {shape:24s} {path:40s} {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
            return None
        rows.append({"shape": shape, "path": path, "ms": ms})
        print(f"  {shape:24s} {path:40s} {ms:8.4f} ms", flush=True)
        return ms

    def fp16_ms(s: Shape) -> float | None:
        """The FP16 layer as the FP16 engine runs it (cuDNN conv + bias + ReLU [+ residual], cuBLAS linear)."""
        torch.manual_seed(0)
        if not s.batch:
            xh, wh = torch.randn(s.m, s.k, device=dev).half(), (torch.randn(s.n, s.k, device=dev) / s.k ** 0.5).half()
            bh = torch.zeros(s.n, device=dev, dtype=torch.float16)
            return record(s.name, "fp16 F.linear", lambda: F.linear(xh, wh, bh))
        pad, oh = s.kernel // 2, s.out_hw
        cl = torch.channels_last
        xh = torch.randn(s.batch, s.cin, s.hw, s.hw, device=dev).half().contiguous(memory_format=cl)
        wh = (torch.randn(s.n, s.cin, s.kernel, s.kernel, device=dev) / s.k ** 0.5).half().contiguous(memory_format=cl)
        b = torch.zeros(s.n, device=dev, dtype=torch.float16)
        st = (s.stride, s.stride)
        if s.residual:
            r = torch.randn(s.batch, s.n, oh, oh, device=dev).half().contiguous(memory_format=cl)
            return record(s.name, "fp16 cudnn add_relu", lambda: torch.cudnn_convolution_add_relu(
                xh, wh, r, 1.0, b, st, (pad, pad), (1, 1), 1))
        return record(s.name, "fp16 cudnn relu", lambda: torch.cudnn_convolution_relu(
            xh, wh, b, st, (pad, pad), (1, 1), 1))

    def eight_bit(s: Shape, fp8: bool) -> float | None:
        """The kernel's tile tables writing codes, then FP16 and FP32 out (with the residual where the layer has
        one) on the default table and the TMA kernel's; the best time writing codes."""
        inp = make_inputs(s, fp8)
        tag = "fp8" if fp8 else "int8"
        best = None
        tables = [("default", q.default_config), ("wide", q.wide_config), ("small", q.small_config)]
        if s.stride == 1:
            from kiln.kernels import int8_tma
            tables += [("tma", int8_tma.tma_config)] + [("tma persistent", int8_tma.persistent_config)] * s.gemm
        for tname, table in tables:
            ms = record(s.name, f"{tag} out=codes {tname}", runner(inp, fp8, "igemm", table(s.m, s.n, s.cin)))
            best = ms if best is None or (ms is not None and ms < best) else best
        for dtype in (torch.float16, torch.float32):
            r = None
            if s.residual:
                r = torch.randn(s.batch, s.n, s.out_hw, s.out_hw, device=dev).to(dtype).contiguous(
                    memory_format=torch.channels_last)
            for tname, table in tables[:1] + [t for t in tables if t[0] == "tma"]:
                record(s.name, f"{tag} out={str(dtype)[6:]}{' +res' if r is not None else ''} {tname}",
                       lambda dtype=dtype, r=r, table=table: q.qgemm(inp.x8, inp.wk, inp.ep, q.Codes(dtype), r,
                                                                     "relu", geometry=inp.geometry, config=table))
        if s.gemm:          # torch's own 8-bit GEMM on the same codes, the product alone (no epilogue)
            rows8 = inp.x8.permute(0, 2, 3, 1).reshape(-1, s.cin) if s.batch else inp.x8
            if fp8:
                one = torch.ones((), device=dev)
                record(s.name, "fp8 torch._scaled_mm (product)", lambda: torch._scaled_mm(
                    rows8, inp.wk.t(), scale_a=one, scale_b=one, out_dtype=torch.float16))
            else:
                record(s.name, "int8 torch._int_mm (product)", lambda: torch._int_mm(rows8, inp.wk.t()))
        return best

    if args.sweep:
        summary = sweep(args, record, fp16_ms)
    else:
        summary = []
        for s in shapes(args.cases):
            base = fp16_ms(s)
            i8, f8 = eight_bit(s, False), eight_bit(s, True)
            summary.append({"shape": s.name, "fp16_ms": base, "int8_ms": i8, "fp8_ms": f8})
        print(f"\n{'shape':24s} {'fp16 ms':>9s} {'int8 ms':>9s} {'fp8 ms':>9s}  (best tile table, 8-bit codes out)")
        for r in summary:
            cell = lambda v: f"{v:9.4f}" if v is not None else f"{'-':>9s}"     # noqa: E731
            print(f"{r['shape']:24s} {cell(r['fp16_ms'])} {cell(r['int8_ms'])} {cell(r['fp8_ms'])}")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "summary": summary, "rows": rows}
    out = Path(os.environ.get("OUT", "benchmarks/results")) / "qgemm_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if args.json:           # the summary (every timed row is in the file)
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
