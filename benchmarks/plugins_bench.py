"""Built-in plugin kernels against torchvision's CUDA ops and torch, on one GPU, same process.

    python benchmarks/plugins_bench.py [--runs 100] [--only roi_align,nms,...]

For each case: build random realistic inputs, check Kiln's output against the peer's,
then time both with CUDA events (warm-up first, median of >= 50 runs). Both are timed
eagerly (Python launches) and replayed from a CUDA graph (kernel time, as an engine runs
it). ratio = peer ms / Kiln ms for each, so > 1 means Kiln is faster. One failing case is
reported and the others still run. Results go to $OUT/plugins_bench.json when OUT is
set, else benchmarks/results/plugins_bench.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kiln.plugins import TensorDesc  # noqa: E402
from kiln.plugins.builtin.deform_conv import ModulatedDeformConv2d  # noqa: E402
from kiln.plugins.builtin.grid_sample import AffineGrid, GridSample  # noqa: E402
from kiln.plugins.builtin.nms import EfficientNMS  # noqa: E402
from kiln.plugins.builtin.roi_align import RoiAlign  # noqa: E402

DEV = "cuda"


def time_ms(fn: Callable[[], Any], runs: int, warmup: int = 10) -> dict:
    """Median (and spread) of per-call CUDA-event times, after a warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {"median": statistics.median(times), "p10": times[len(times) // 10], "p90": times[(9 * len(times)) // 10]}


def _capture(fn: Callable[[], Any]) -> tuple:
    """``fn`` captured once in a CUDA graph (after a warm-up on a side stream): (graph, its outputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def graphed(fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn`` captured once in a CUDA graph; returns replay."""
    return _capture(fn)[0].replay


def _tensors(out: Any) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def checked_replay(fn: Callable[[], Any]) -> tuple[Callable[[], None], bool]:
    """``fn`` captured in a CUDA graph: (replay, whether replaying computes what ``fn`` computes
    eagerly). A library that launches a kernel outside the capturing stream replays a graph without
    it: torchvision's deform_conv2d loses its im2col kernel this way (replays return stale columns
    times the weights), so such a peer's replay time measures only part of its work."""
    want = [t.clone() for t in _tensors(fn())]
    g, out = _capture(fn)
    got = _tensors(out)
    for t in got:
        t.zero_()
    g.replay()
    torch.cuda.synchronize()
    return g.replay, len(got) == len(want) and all(
        a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), rtol=1e-3,
                                                   atol=1e-3 * float(b.float().abs().max()) + 1e-6))
        for a, b in zip(got, want))


def kernel_ms(fn: Callable[[], Any], reps: int = 20) -> float:
    """GPU time of the kernels (and copies) one eager call launches, summed from the profiler: the
    work itself, free of launch overhead, for sides that cannot be replayed from a graph."""
    from kernel_profile import kernels

    return kernels(fn, reps)[1]


class KilnCall:
    """A plugin with outputs and workspace allocated once, as the runtime does."""

    def __init__(self, plugin: Any, inputs: list, tactic: str = "triton") -> None:
        self.plugin, self.inputs, self.tactic = plugin, inputs, tactic
        descs = [None if t is None else TensorDesc(tuple(t.shape), str(t.dtype).replace("torch.", "")) for t in inputs]
        self.outputs = [torch.empty(d.shape, dtype=getattr(torch, d.dtype), device=DEV)
                        for d in plugin.output_descs(descs)]
        n = plugin.workspace_size(descs)
        self.workspace = torch.empty(n, dtype=torch.uint8, device=DEV) if n else None

    def __call__(self) -> list:
        self.plugin.forward(self.inputs, self.outputs, self.workspace, self.tactic)
        return self.outputs

    def graph(self) -> Callable[[], None]:
        self()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self()
        return g.replay


# ---- cases ----------------------------------------------------------------------------------

def _rois(n: int, img_w: float, img_h: float, g: torch.Generator) -> torch.Tensor:
    wh = torch.exp(torch.empty(n, 2, device=DEV).uniform_(math.log(16), math.log(400), generator=g))
    ctr = torch.rand(n, 2, device=DEV, generator=g) * torch.tensor([img_w, img_h], device=DEV)
    return torch.cat([ctr - wh / 2, ctr + wh / 2], 1)


def case_roi_align(dtype: torch.dtype) -> dict:
    import torchvision

    g = torch.Generator(DEV).manual_seed(0)
    x = torch.randn(1, 256, 200, 272, device=DEV, generator=g).to(dtype)
    rois = _rois(1000, 272 * 4, 200 * 4, g).to(dtype)
    bidx = torch.zeros(1000, dtype=torch.int64, device=DEV)
    kiln = KilnCall(RoiAlign(output_height=7, output_width=7, sampling_ratio=2, spatial_scale=0.25,
                             coordinate_transformation_mode="half_pixel"), [x, rois, bidx])
    boxes = torch.cat([bidx[:, None].to(dtype), rois], 1)
    peer = lambda: torchvision.ops.roi_align(x, boxes, (7, 7), spatial_scale=0.25, sampling_ratio=2, aligned=True)  # noqa: E731
    # Checked against the fp32 op on the same (rounded) values: Kiln computes in fp32 whatever the I/O type.
    want = torchvision.ops.roi_align(x.float(), boxes.float(), (7, 7), spatial_scale=0.25, sampling_ratio=2,
                                     aligned=True)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(kiln()[0].float(), want, rtol=tol, atol=tol)
    return {"kiln": kiln, "peer": peer, "peer_name": "torchvision.ops.roi_align"}


def case_roi_align_channels_last() -> dict:
    """Same op, X in channels-last memory: Kiln's kernel takes any strides (loads along C coalesce)."""
    c = case_roi_align(torch.float32)
    want = c["kiln"]()[0].clone()
    x = c["kiln"].inputs[0].contiguous(memory_format=torch.channels_last)
    c["kiln"] = KilnCall(c["kiln"].plugin, [x] + c["kiln"].inputs[1:])
    torch.testing.assert_close(c["kiln"]()[0], want, rtol=1e-5, atol=1e-5)
    return c


def _yolo_head(b: int, n: int, ncls: int, g: torch.Generator) -> tuple:
    """Decoded YOLO-like outputs: ~30 objects per image, a few hundred anchors on each with a
    confident class, the rest background; sigmoid scores. Corner boxes in a 640x640 image."""
    boxes = torch.rand(b, n, 4, device=DEV, generator=g) * 640
    boxes = torch.cat([torch.minimum(boxes[..., :2], boxes[..., 2:]), torch.maximum(boxes[..., :2], boxes[..., 2:])], -1)
    logits = torch.randn(b, n, ncls, device=DEV, generator=g) * 1.5 - 8.0
    for i in range(b):
        objs = torch.rand(30, 4, device=DEV, generator=g) * torch.tensor([560, 560, 120, 120], device=DEV) \
            + torch.tensor([40, 40, 20, 20], device=DEV)
        cls = torch.randint(0, ncls, (30,), device=DEV, generator=g)
        hits = torch.randint(0, n, (30, 20), device=DEV, generator=g)
        jitter = torch.randn(30, 20, 4, device=DEV, generator=g) * 4
        ctr, wh = objs[:, None, :2] + jitter[..., :2], objs[:, None, 2:] + jitter[..., 2:]
        boxes[i, hits.flatten()] = torch.cat([ctr - wh / 2, ctr + wh / 2], -1).reshape(-1, 4)
        logits[i, hits.flatten(), cls[:, None].expand(30, 20).flatten()] = \
            torch.randn(600, device=DEV, generator=g) * 1.5 + 1.0
    return boxes, torch.sigmoid(logits)


def case_nms() -> dict:
    import torchvision

    g = torch.Generator(DEV).manual_seed(1)
    b, n, ncls, thr, iou, top = 8, 25200, 80, 0.25, 0.45, 300
    boxes, scores = _yolo_head(b, n, ncls, g)
    kiln = KilnCall(EfficientNMS(score_threshold=thr, iou_threshold=iou, max_output_boxes=top), [boxes, scores])

    def peer() -> list:
        """What a user writes around torchvision: threshold, gather, class-offset batched NMS, top-k per image."""
        bi, ni, ci = torch.nonzero(scores > thr, as_tuple=True)
        s = scores[bi, ni, ci]
        keep = torchvision.ops.batched_nms(boxes[bi, ni], s, bi * ncls + ci, iou)
        kb = bi[keep]
        return [keep[kb == i][:top] for i in range(b)], bi, ni, ci, s

    num, _, oscore, ocls = kiln()
    kept, bi, _, ci, s = peer()
    # batched_nms offsets boxes per class (coordinates up to ~1e5), which moves IoUs by ~1e-4:
    # allow a rare decision at the threshold to differ, nothing more.
    ours = {(i, int(c), round(float(v), 5)) for i in range(b) for c, v in zip(ocls[i, :int(num[i, 0])], oscore[i])}
    theirs = {(i, int(c), round(float(v), 5)) for i in range(b) for c, v in zip(ci[kept[i]], s[kept[i]])}
    differ = len(ours ^ theirs)
    assert differ <= max(2, len(theirs) // 100), f"{differ} of {len(theirs)} detections differ from torchvision"
    cand = int((scores > thr).sum())
    return {"kiln": kiln, "peer": peer, "peer_name": "torchvision batched_nms (+threshold, gather, top-k)",
            "note": f"{cand} candidates over {b} images; kept {int(num.sum())}; {differ} differ"}


def dcn_problem(batch: int, dtype: torch.dtype, channels_last: bool = False) -> tuple:
    """The DCNv2 benchmark shape, 256->256 3x3 pad 1 at 64x64: (x, w, bias, offset, mask, torchvision's
    FP32 answer, tolerance); ``channels_last`` hands X over as a convolution before it leaves it in an
    FP16 engine."""
    import torchvision

    g = torch.Generator(DEV).manual_seed(2)
    x = torch.randn(batch, 256, 64, 64, device=DEV, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(256, 256, 3, 3, device=DEV, generator=g) * 0.02).to(dtype)
    bias = torch.randn(256, device=DEV, generator=g).to(dtype)
    off = (torch.randn(batch, 18, 64, 64, device=DEV, generator=g) * 2).to(dtype)
    mask = torch.rand(batch, 9, 64, 64, device=DEV, generator=g).to(dtype)
    want = torchvision.ops.deform_conv2d(x.float(), off.float(), w.float(), bias.float(), padding=(1, 1),
                                         mask=mask.float())
    return x, w, bias, off, mask, want, (5e-3 if dtype == torch.float32 else 5e-2)


def case_deform_conv(batch: int, tactic: str, dtype: torch.dtype = torch.float32) -> dict:
    """One DCNv2 tactic, or with tactic "pick" the one the builder would keep: every CUDA tactic
    is checked and timed (CUDA-graph replay) and the fastest one is the row's Kiln column."""
    import torchvision

    x, w, bias, off, mask, want, tol = dcn_problem(batch, dtype)
    peer = lambda: torchvision.ops.deform_conv2d(x, off, w, bias, padding=(1, 1), mask=mask)  # noqa: E731
    calls = {}
    for name in (ModulatedDeformConv2d.tactics["cuda"] if tactic == "pick" else (tactic,)):
        calls[name] = KilnCall(ModulatedDeformConv2d(pads=[1, 1, 1, 1]), [x, w, off, bias, mask], name)
        torch.testing.assert_close(calls[name]()[0].float(), want, rtol=tol, atol=tol * float(want.abs().max()))
    note = ""
    if tactic == "pick":
        times = {name: time_ms(call.graph(), 30)["median"] for name, call in calls.items()}
        tactic = min(times, key=times.get)
        note = "picked " + ", ".join(f"{n} {t:.3f}" for n, t in sorted(times.items(), key=lambda kv: kv[1])) + " ms"
    return {"kiln": calls[tactic], "peer": peer, "peer_name": "torchvision.ops.deform_conv2d", "note": note}


def case_grid_sample(dtype: torch.dtype = torch.float32) -> dict:
    import torch.nn.functional as F

    g = torch.Generator(DEV).manual_seed(3)
    x = torch.randn(8, 64, 128, 128, device=DEV, generator=g).to(dtype)
    theta = (torch.eye(2, 3, device=DEV)[None] + 0.1 * torch.randn(8, 2, 3, device=DEV, generator=g))
    grid = F.affine_grid(theta, [8, 64, 128, 128], align_corners=False).to(dtype)
    kiln = KilnCall(GridSample(mode="bilinear", padding_mode="zeros", align_corners=0), [x, grid])
    peer = lambda: F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # noqa: E731
    want = F.grid_sample(x.float(), grid.float(), mode="bilinear", padding_mode="zeros", align_corners=False)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(kiln()[0].float(), want, rtol=tol, atol=tol)
    return {"kiln": kiln, "peer": peer, "peer_name": "torch.nn.functional.grid_sample"}


def case_affine_grid() -> dict:
    import torch.nn.functional as F

    theta = torch.randn(8, 2, 3, device=DEV)
    kiln = KilnCall(AffineGrid(size=[8, 64, 128, 128]), [theta])
    peer = lambda: F.affine_grid(theta, [8, 64, 128, 128], align_corners=False)  # noqa: E731
    torch.testing.assert_close(kiln()[0], peer(), rtol=1e-5, atol=1e-5)
    return {"kiln": kiln, "peer": peer, "peer_name": "torch.nn.functional.affine_grid"}


CASES: list[tuple[str, str, str, Callable[[], dict]]] = [
    ("roi_align", "RoiAlign fp32", "1000 ROIs, [1,256,200,272] -> 7x7, sr 2", lambda: case_roi_align(torch.float32)),
    ("roi_align", "RoiAlign fp16", "1000 ROIs, [1,256,200,272] -> 7x7, sr 2", lambda: case_roi_align(torch.float16)),
    ("roi_align", "RoiAlign fp32 NHWC", "X channels-last; peer on NCHW", case_roi_align_channels_last),
    ("nms", "EfficientNMS fp32", "8x25200 boxes x 80 cls, thr .25, iou .45, max 300", case_nms),
    *[("deform_conv", f"DCNv2 {dt} ({label})", f"256->256 3x3 @64x64, batch {b}",
       lambda b=b, t=t, d=d: case_deform_conv(b, t, d))
      for dt, d in (("fp32", torch.float32), ("fp16", torch.float16)) for b in (1, 8)
      for label, t in (("im2col+cuBLAS", "triton"), ("fused", "triton_fused"), ("builder's pick", "pick"))],
    ("grid_sample", "GridSample fp32", "[8,64,128,128] bilinear zeros", case_grid_sample),
    ("grid_sample", "GridSample fp16", "[8,64,128,128] bilinear zeros", lambda: case_grid_sample(torch.float16)),
    ("grid_sample", "AffineGrid fp32", "[8,2,3] -> [8,128,128,2]", case_affine_grid),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100, help="timed runs per measurement (>= 50)")
    ap.add_argument("--only", default="", help="comma-separated groups: roi_align,nms,deform_conv,grid_sample")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("plugins_bench needs a CUDA GPU (torch.cuda.is_available() is False).", file=sys.stderr)
        return 2
    runs = max(50, args.runs)
    only = {s for s in args.only.split(",") if s}
    import triton

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(),
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "runs": runs,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        import torchvision
        env["torchvision"] = torchvision.__version__
    except ImportError:
        env["torchvision"] = None
    print(f"# {env['gpu']} | torch {env['torch']} | triton {env['triton']} | torchvision {env['torchvision']}")
    head = (f"{'op':30} {'shape':48} {'kiln ms':>9} {'peer ms':>9} {'ratio':>6} {'graph ms':>9} {'peer gr':>9} "
            f"{'ratio':>6} {'kern ms':>9} {'peer kn':>9} {'ratio':>6}  peer")
    print(head)
    print("-" * len(head))
    rows = []
    for group, op, shape, make in CASES:
        if only and group not in only:
            continue
        row: dict[str, Any] = {"op": op, "shape": shape, "group": group}
        try:
            case = make()
            kiln_t = time_ms(case["kiln"], runs)
            kiln_t2 = time_ms(case["kiln"], runs)           # the same thing twice: the noise floor
            graph_t = time_ms(case["kiln"].graph(), runs)
            peer_t = time_ms(case["peer"], runs)
            try:                                             # the peer's kernels without launch overhead
                replay, ok = checked_replay(case["peer"])
                peer_graph = time_ms(replay, runs)["median"]
                if not ok:
                    row["peer_graph_invalid"] = "the peer's replay skips a kernel (wrong output)"
                    peer_graph = float("nan")
            except Exception:
                peer_graph = float("nan")
            kk, pk = kernel_ms(case["kiln"]), kernel_ms(case["peer"])
            row.update(kiln_kernels_ms=kk, peer_kernels_ms=pk, kernels_ratio=pk / kk)
            row.update(kiln_ms=kiln_t["median"], kiln_ms_repeat=kiln_t2["median"], kiln_graph_ms=graph_t["median"],
                       peer_ms=peer_t["median"], peer_graph_ms=peer_graph, peer=case["peer_name"],
                       ratio=peer_t["median"] / kiln_t["median"], graph_ratio=peer_graph / graph_t["median"],
                       kiln_p10_p90=[kiln_t["p10"], kiln_t["p90"]], peer_p10_p90=[peer_t["p10"], peer_t["p90"]],
                       note=case.get("note", ""))
            print(f"{op:30} {shape:48} {row['kiln_ms']:9.3f} {row['peer_ms']:9.3f} {row['ratio']:6.2f} "
                  f"{row['kiln_graph_ms']:9.3f} {peer_graph:9.3f} {row['graph_ratio']:6.2f} "
                  f"{kk:9.3f} {pk:9.3f} {pk / kk:6.2f}  {row['peer']}"
                  + (f"  [{row['note']}]" if row["note"] else ""))
        except Exception as exc:                                     # keep going: one bad case is one row
            row["error"] = f"{type(exc).__name__}: {exc}"
            print(f"{op:30} {shape:48} FAILED {row['error'][:200]}")
            traceback.print_exc(limit=3, file=sys.stderr)
        finally:
            torch.cuda.empty_cache()
        rows.append(row)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "plugins_bench.json"
    path.write_text(json.dumps({"env": env, "results": rows}, indent=2))
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
