"""Compile built-in plugin kernels for Hopper (sm_90) on a machine without a GPU.

Run as ``python tests/plugins/sm90_compile.py roi_align [-v]`` in a process where
TRITON_INTERPRET is *unset* (Triton fixes interpreted-vs-compiled for its standard
library at first import, so this cannot share a process with interpreter tests).
Each plugin's launch code runs on small CPU tensors with its kernels replaced by
recorders; every recorded launch is then compiled to a cubin with the signature and
specialization Triton's own launcher would use. ``-v`` prints registers and spills.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable

import torch


class Recorder:
    """Stands in for a JITFunction: records launches instead of running them."""

    def __init__(self, fn: Any, log: list) -> None:
        self.fn, self.log = fn, log

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: self.log.append((self.fn, grid, args, kwargs))


def compile_sm90(fn: Any, args: tuple, kwargs: dict) -> Any:
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    from kiln.triton_support import DeferredKernel, load_triton
    load_triton()
    if isinstance(fn, DeferredKernel):      # taken from its module before Triton was loaded
        fn = fn.kernel
    names = [p.name for p in fn.params]
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = bound[p.name] if p.name in bound else p.default
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = v
            continue
        ty, spec = native_specialize_impl(BaseBackend, v, False, True, True)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = v
        elif isinstance(spec, str) and "D" in spec:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)


def ptxas_usage(ptx: str) -> str:
    """Registers and spills reported by the ptxas bundled with Triton."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True).stderr
    regs = re.findall(r"Used (\d+) registers", out)
    spills = re.findall(r"(\d+) bytes spill stores", out)
    return f"regs={regs[-1] if regs else '?'} spill_stores={spills[-1] if spills else '?'}"


def record(module: str, run: Callable[[], None]) -> list:
    """Swap the module's ``_*_kernel`` globals for recorders while ``run`` launches them."""
    from triton.runtime.jit import JITFunction

    from kiln.triton_support import load_triton

    mod = importlib.import_module(f"kiln.plugins.builtin.{module}")
    load_triton()               # the module's deferred kernels become Triton's JITFunctions
    kernels = {k: v for k, v in vars(mod).items() if k.endswith("_kernel") and isinstance(v, JITFunction)}
    log: list = []
    try:
        for k, v in kernels.items():
            setattr(mod, k, Recorder(v, log))
        try:
            run()
        except Exception:       # code after a launch reads outputs the recorder never wrote
            if not log:
                raise
    finally:
        for k, v in kernels.items():
            setattr(mod, k, v)
    return log


def forward(plugin: Any, inputs: list, tactic: str = "triton") -> None:
    from kiln.plugins import TensorDesc

    descs = [None if t is None else TensorDesc(tuple(t.shape), str(t.dtype).replace("torch.", "")) for t in inputs]
    if plugin.data_dependent_shapes:
        plugin.forward(inputs, None, None, tactic)
        return
    outs = [torch.zeros(d.shape, dtype=getattr(torch, d.dtype)) for d in plugin.output_descs(descs)]
    n = plugin.workspace_size(descs)
    plugin.forward(inputs, outs, torch.zeros(n, dtype=torch.uint8) if n else None, tactic)


def cases_roi_align() -> list[Callable[[], None]]:
    from kiln.plugins.builtin.roi_align import RoiAlign

    out = []
    for dtype in (torch.float32, torch.float16):
        for mode, sr, ctm in (("avg", 2, "half_pixel"), ("max", 0, "output_half_pixel")):
            p = RoiAlign(mode=mode, output_height=7, output_width=7, sampling_ratio=sr, spatial_scale=0.25,
                         coordinate_transformation_mode=ctm)
            out.append(lambda p=p, dtype=dtype: forward(
                p, [torch.randn(2, 32, 20, 24, dtype=dtype), torch.rand(10, 4, dtype=dtype) * 40,
                    torch.zeros(10, dtype=torch.int64)]))
    return out


def cases_grid_sample() -> list[Callable[[], None]]:
    from kiln.plugins.builtin.grid_sample import AffineGrid, GridSample

    out = []
    for i, (mode, pad) in enumerate((m, p) for m in ("bilinear", "nearest", "bicubic")
                                    for p in ("zeros", "border", "reflection")):
        g = GridSample(mode=mode, padding_mode=pad, align_corners=i % 2)
        out.append(lambda g=g: forward(g, [torch.randn(2, 16, 9, 10), torch.rand(2, 5, 6, 2) * 2 - 1]))
    g = GridSample()
    out.append(lambda g=g: forward(g, [torch.randn(2, 16, 9, 10).half(), torch.rand(2, 5, 6, 2).half()]))
    for align in (0, 1):
        a = AffineGrid(size=[2, 3, 7, 9], align_corners=align)
        out.append(lambda a=a: forward(a, [torch.randn(2, 2, 3)]))
    return out


def cases_deform_conv() -> list[Callable[[], None]]:
    """Both tactics in FP32 (IEEE FMA dot) and FP16 with and without mask; the implicit GEMM also
    at the benchmark shape (its default tiles for batch 1 and 8), with TF32, BF16, channels-last
    X (no transpose) and channel groups that do not split evenly (masked chunks)."""
    from kiln.plugins.builtin.deform_conv import ModulatedDeformConv2d

    def dcn(n, c, oc, hw, dtype, group=1, og=1, masked=True, bias=True, tactic="triton_fused", tf32=False,
            channels_last=False):
        def run():
            p = ModulatedDeformConv2d(pads=[1, 1, 1, 1], group=group, offset_group=og)
            x = torch.randn(n, c, hw, hw, dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            ins = [x, torch.randn(oc, c // group, 3, 3, dtype=dtype), torch.randn(n, 18 * og, hw, hw, dtype=dtype),
                   torch.randn(oc, dtype=dtype) if bias else None,
                   torch.rand(n, 9 * og, hw, hw, dtype=dtype) if masked else None]
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                forward(p, ins, tactic)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
        return run

    out = []
    for dtype in (torch.float32, torch.float16):
        for tactic in ("triton", "triton_fused"):
            for masked in (True, False):
                out.append(dcn(2, 64, 64, 12, dtype, og=2, masked=masked, tactic=tactic))
        for n in (1, 8):
            out.append(dcn(n, 256, 256, 64, dtype))
        out.append(dcn(2, 48, 40, 10, dtype, group=2, og=3, bias=False))
    out.append(dcn(8, 256, 256, 64, torch.float32, tf32=True))
    out.append(dcn(2, 64, 64, 12, torch.bfloat16))
    out.append(dcn(2, 64, 64, 12, torch.float16, channels_last=True))
    if os.environ.get("DCN_ALL_CONFIGS"):
        out += _deform_conv_configs()
    return out


def _deform_conv_configs() -> list[Callable[[], None]]:
    """Every implicit-GEMM configuration the sweep may time, at the benchmark shape. Not in the
    tests; ``DCN_ALL_CONFIGS=1 python tests/plugins/sm90_compile.py deform_conv -v`` lists their
    registers and spills, to prune fused_configs with."""
    from kiln.plugins.builtin import deform_conv as dcn

    out = []
    for dtype, ieee in ((torch.float16, False), (torch.float32, False), (torch.float32, True)):
        for cfg in dcn.fused_configs(dtype.itemsize, ieee):
            def run(dtype=dtype, ieee=ieee, cfg=cfg):
                p = dcn.ModulatedDeformConv2d(pads=[1, 1, 1, 1])
                x, w = torch.randn(8, 256, 64, 64, dtype=dtype), torch.randn(256, 256, 3, 3, dtype=dtype)
                off, m = torch.randn(8, 18, 64, 64, dtype=dtype), torch.rand(8, 9, 64, 64, dtype=dtype)
                geo = dcn._Geo(p, x, w, off, m, 3, 3)
                old = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = not ieee
                try:
                    dcn._implicit_gemm(p, x, w, off, None, m, torch.empty(8, 256, 64, 64, dtype=dtype), None, geo, cfg)
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = old
            out.append(run)
    return out


def cases_nms() -> list[Callable[[], None]]:
    from kiln.plugins.builtin.nms import EfficientNMS, NonMaxSuppression

    out = []
    configs = [dict(), dict(background_class=0, score_activation=True), dict(class_agnostic=True, box_coding=1)]
    for dtype in (torch.float32, torch.float16):
        for i, cfg in enumerate(configs):
            p = EfficientNMS(score_threshold=0.25, iou_threshold=0.45, max_output_boxes=300, **cfg)
            boxes = torch.rand(2, 1200, 4, 4, dtype=dtype) if i == 1 else torch.rand(2, 1200, 4, dtype=dtype)
            out.append(lambda p=p, ins=[boxes, torch.rand(2, 1200, 4, dtype=dtype)]: forward(p, ins))
    for n in (300, 5000):
        out.append(lambda n=n: forward(NonMaxSuppression(), [torch.rand(1, n, 4), torch.rand(1, 2, n),
                                                             torch.tensor([5]), torch.tensor([0.5])]))
    return out


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile for sm_90", file=sys.stderr)
        return 2
    verbose = "-v" in argv
    modules = [a for a in argv if not a.startswith("-")]
    n = 0
    for module in modules:
        for case in globals()[f"cases_{module}"]():
            for fn, grid, args, kwargs in record(module, case):
                compiled = compile_sm90(fn, args, kwargs)
                assert "cubin" in compiled.asm
                n += 1
                if verbose:
                    consts = {k: v for k, v in kwargs.items() if k.isupper() or k == "num_warps"}
                    print(f"{module}:{fn.__name__} grid={grid} {consts} {ptxas_usage(compiled.asm['ptx'])}")
    print(f"compiled {n} kernel launches for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
