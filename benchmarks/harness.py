"""The speed harness: Kiln against PyTorch eager, eager replayed as a CUDA graph and
torch.compile(mode="reduce-overhead"), in one process, on one card, on the same inputs.

    python benchmarks/harness.py [--models resnet50,bert] [--quick] [--out DIR]

For each model: build it in PyTorch (random weights, FP32), export ONNX (opset 17, dynamic
batch), check Kiln FP32 on the GPU against ONNX Runtime on the CPU (max error), then per batch
size of PERF.md's table: build a Kiln FP16 engine for that batch, check it against the FP32
PyTorch output (relative L2), and time every contender with CUDA events (median of ≥50 runs,
measured twice). Writes results JSON (one file per run) and, with --report, BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
START = time.perf_counter()
sys.path.insert(0, HERE)

# model → (batch sizes, PERF.md's best-peer ms per batch for reference only)
TABLE = {
    "resnet50": [1, 32, 256],
    "mobilenet_v3_large": [1, 64],
    "vit_b_16": [1, 32],
    "bert_base": [1, 32],
    "yolov5l": [1, 16],
    "lstm": [1, 32],
}


# ---- models ---------------------------------------------------------------------------------
def build_model(name: str):
    """(module, make_inputs(batch) -> tuple of tensors, input names, output names, channels_last)."""
    from vision import torchvision_or_own              # benchmarks/vision.py where torchvision cannot load
    if name in ("resnet50", "mobilenet_v3_large"):
        return torchvision_or_own(name)[0], _image(224), ["input"], ["logits"], True
    if name == "vit_b_16":
        torch.backends.mha.set_fastpath_enabled(False)     # the fused fast path has no ONNX export
        vit = torchvision_or_own(name)[0]
        torch.nn.init.normal_(vit.heads.head.weight, std=0.02)   # torchvision zero-initializes the head
        return vit, _image(224), ["input"], ["logits"], False
    if name == "bert_base":
        from transformers import BertConfig, BertModel
        cfg = BertConfig()     # bert-base-uncased geometry, random weights, no download
        cfg.attn_implementation = "eager"

        class Bert(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = BertModel(cfg, add_pooling_layer=False)

            def forward(self, ids, mask):
                return self.m(input_ids=ids, attention_mask=mask).last_hidden_state

        def inputs(b):
            ids = torch.randint(0, cfg.vocab_size, (b, 128))
            mask = torch.ones(b, 128, dtype=torch.int64)
            mask[:, 100:] = 0
            return ids, mask
        return Bert(), inputs, ["input_ids", "attention_mask"], ["hidden"], False
    if name == "yolov5l":
        import zoo
        return zoo.YOLOv5(1.0, 1.0, image=640), _image(640), ["images"], ["detections"], True
    if name == "lstm":
        class LSTMNet(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lstm = torch.nn.LSTM(256, 512, num_layers=2, bidirectional=True)
                self.fc = torch.nn.Linear(1024, 256)

            def forward(self, x):
                return self.fc(self.lstm(x)[0])

        def inputs(b):
            return (torch.randn(64, b, 256),)
        return LSTMNet(), inputs, ["x"], ["y"], False
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(TABLE)}")


def calibrate(model: torch.nn.Module, make_inputs: Callable[[int], tuple], steps: int = 3) -> None:
    """Give random weights realistic BatchNorm statistics (as training would), so activations keep a
    trained network's scale instead of vanishing through dozens of layers, which no real FP16 model does."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(dev)
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(*[t.to(dev) for t in make_inputs(8)])
    model.eval().cpu()


def _image(size: int) -> Callable[[int], tuple]:
    return lambda b: (torch.randn(b, 3, size, size),)


def batch_axis(name: str) -> int:
    return 1 if name == "lstm" else 0


# ---- timing ---------------------------------------------------------------------------------
def time_fn(fn: Callable[[], Any], runs: int = 60, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def twice(fn, runs) -> dict[str, float]:
    a = float(np.median(time_fn(fn, runs)))
    b = float(np.median(time_fn(fn, runs, warmup=2)))
    return {"median_ms": (a + b) / 2, "run1": a, "run2": b}


def cuda_graph_of(fn: Callable[[], Any]) -> Callable[[], Any]:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


@contextlib.contextmanager
def exact_fp32():
    """FP32 as written. torch runs cuDNN convolutions in TF32 by default (a 10-bit mantissa, the same
    as FP16's), which made the "FP32" reference of the convolution models about as inexact as the
    FP16 engines measured against it."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def rel_l2(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ---- one model ------------------------------------------------------------------------------
def export_model(name: str, out_dir: str):
    """The zoo model with its seeded random weights and calibrated BatchNorm, exported to
    ``out_dir/<name>.onnx`` with a dynamic batch: (module in eval mode, make_inputs, input names,
    output names, channels_last, the batch-1 example it was exported with, path, export seconds)."""
    torch.manual_seed(0)
    model, make_inputs, in_names, out_names, channels_last = build_model(name)
    calibrate(model, make_inputs)
    model = model.eval()
    ex = make_inputs(1)
    path = os.path.join(out_dir, f"{name}.onnx")
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(model, ex, path, input_names=in_names, output_names=out_names[:1],
                          dynamic_axes={n: {batch_axis(name): "batch"} for n in in_names}, opset_version=17,
                          dynamo=False)
    return model, make_inputs, in_names, out_names, channels_last, ex, path, time.perf_counter() - t0


def run_model(name: str, batches: list[int], args) -> dict[str, Any]:
    import kiln
    model, make_inputs, in_names, out_names, channels_last, ex, onnx_path, export_s = export_model(name, args.workdir)
    res: dict[str, Any] = {"model": name, "rows": [], "export_s": export_s}
    try:
        res["unsupported"] = kiln.onnx.check(onnx_path)
    except ImportError:
        res["unsupported"] = []
    # FP32 engine on the GPU against ONNX Runtime on the CPU, batch 1 (issue 2's accuracy report)
    try:
        import onnxruntime as ort
        feeds = {n: t.numpy() for n, t in zip(in_names, ex)}
        ref = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        shapes = {n: tuple(t.shape) for n, t in zip(in_names, ex)}
        e32 = kiln.build(kiln.onnx.parse(onnx_path), kiln.BuildConfig(device="cuda", profiles=shapes))
        outs = e32.context().run(feeds)
        got = outs.get(out_names[0], next(iter(outs.values())))
        res["fp32_vs_ort"] = {"max_abs": float(np.abs(got - ref).max()), "rel_l2": rel_l2(got, ref)}
    except Exception as exc:  # keep going: report it
        res["fp32_vs_ort"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    model = model.cuda()
    for b in batches:
        row: dict[str, Any] = {"batch": b}
        inputs = [t.cuda() for t in make_inputs(b)]
        with torch.no_grad(), exact_fp32():
            ref32 = model(*inputs).float()
        half = model.half()
        if channels_last:
            for mod in half.modules():          # conv weights only: detection heads hold rank-5 buffers
                if isinstance(mod, torch.nn.Conv2d):
                    mod.weight.data = mod.weight.data.contiguous(memory_format=torch.channels_last)
        hin = [t.half() if t.is_floating_point() else t for t in inputs]
        if channels_last:
            hin = [t.contiguous(memory_format=torch.channels_last) for t in hin]
        # Kiln FP16 engine for this batch
        cache = os.path.join(args.workdir, f"{name}.timing")
        shapes = {n: tuple(t.shape) for n, t in zip(in_names, inputs)}
        t0 = time.perf_counter()
        engine = kiln.build(kiln.onnx.parse(onnx_path),
                            kiln.BuildConfig(precision="fp16", device="cuda", profiles=shapes, timing_cache=cache))
        row["build_s"] = time.perf_counter() - t0
        if name == "resnet50" and b == batches[0]:
            t0 = time.perf_counter()
            kiln.build(kiln.onnx.parse(onnx_path),
                       kiln.BuildConfig(precision="fp16", device="cuda", profiles=shapes, timing_cache=cache))
            row["build_warm_cache_s"] = time.perf_counter() - t0
        ctx = engine.context()
        kin = [t.contiguous() for t in inputs]
        out = ctx.execute(kin)[0]
        row["kiln_rel_l2_vs_fp32"] = rel_l2(out.float().cpu().numpy(), ref32.cpu().numpy())
        row["layers"] = len(engine.layers)
        row["cuda_graph"] = ctx.graphs is not None
        with torch.no_grad():
            row["eager_fp16_rel_l2_vs_fp32"] = rel_l2(half(*hin).float().cpu().numpy(), ref32.cpu().numpy())
        if args.profile:
            rows = ctx.profile(kin, runs=5)
            tot = sum(r["ms"] for r in rows)
            for r in sorted(rows, key=lambda r: -r["ms"])[:12]:
                print(f"   {r['name'][:60]:<60} {r['kind']:<14} {r['tactic']:<16} {r['ms']:.4f} ms "
                      f"{100 * r['ms'] / tot:5.1f}%")
            kinds: dict[str, float] = {}
            for r in rows:
                kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["ms"]
            print("   by kind:", ", ".join(f"{k} {v:.3f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])),
                  f"(sum {tot:.3f} ms over {len(rows)} layers)")
        runs = 60 if b <= 32 else 50
        with torch.no_grad():
            row["kiln"] = twice(lambda: ctx.execute(kin), runs)
            eager = lambda: half(*hin)                      # noqa: E731
            row["eager"] = twice(eager, runs)
            try:
                row["eager_cuda_graph"] = twice(cuda_graph_of(eager), runs)
            except Exception as exc:
                row["eager_cuda_graph"] = {"error": str(exc)[:200]}
            if not args.no_compile and time.perf_counter() - START > args.compile_deadline:
                row["torch_compile"] = {"error": "not run: the harness's time budget for torch.compile was spent"}
            elif not args.no_compile:
                try:
                    torch._dynamo.reset()
                    comp = torch.compile(half, mode="reduce-overhead")
                    t0 = time.perf_counter()
                    for _ in range(3):
                        comp(*hin)
                    row["compile_s"] = time.perf_counter() - t0
                    row["torch_compile"] = twice(lambda: comp(*hin), runs)
                except Exception as exc:
                    row["torch_compile"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        peers = [row[k]["median_ms"] for k in ("eager", "eager_cuda_graph", "torch_compile")
                 if isinstance(row.get(k), dict) and "median_ms" in row[k]]
        row["best_peer_ms"] = min(peers) if peers else None
        row["speedup_vs_best_peer"] = row["best_peer_ms"] / row["kiln"]["median_ms"] if peers else None
        row["throughput_per_s"] = b * 1e3 / row["kiln"]["median_ms"]
        res["rows"].append(row)
        print(f"{name:<20} b={b:<4} kiln {row['kiln']['median_ms']:8.3f} ms  eager {row['eager']['median_ms']:8.3f}  "
              f"graph {row['eager_cuda_graph'].get('median_ms', float('nan')):8.3f}  "
              f"compile {row.get('torch_compile', {}).get('median_ms', float('nan')):8.3f}  "
              f"x{row['speedup_vs_best_peer'] or 0:.2f}  relL2 {row['kiln_rel_l2_vs_fp32']:.2e} "
              f"(eager fp16 {row['eager_fp16_rel_l2_vs_fp32']:.2e})  "
              f"build {row['build_s']:.1f}s", flush=True)
        ctx = engine = None
        torch.cuda.empty_cache()
        model = model.float()
    return res


def run_cpu(name: str, args) -> dict[str, Any]:
    """Kiln FP32 on the CPU against ONNX Runtime's CPU provider, batch 1, same inputs."""
    import onnxruntime as ort

    import kiln
    torch.manual_seed(0)
    model, make_inputs, in_names, out_names, _ = build_model(name)
    calibrate(model, make_inputs)
    model = model.eval().cpu()
    ex = make_inputs(1)
    path = os.path.join(args.workdir, f"{name}_cpu.onnx")
    with torch.no_grad():
        torch.onnx.export(model, ex, path, input_names=in_names, output_names=out_names[:1], opset_version=17,
                          dynamo=False)
    feeds = {n: t.numpy() for n, t in zip(in_names, ex)}
    engine = kiln.build(kiln.onnx.parse(path), kiln.BuildConfig(device="cpu",
                                                                profiles={n: v.shape for n, v in feeds.items()}))
    ctx = engine.context()
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def med(fn, n=20):
        for _ in range(3):
            fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return float(np.median(ts))
    got = list(ctx.run(feeds).values())[0]
    ref = sess.run(None, feeds)[0]
    res = {"model": name, "kiln_ms": med(lambda: ctx.run(feeds)), "ort_ms": med(lambda: sess.run(None, feeds)),
           "max_abs": float(np.abs(got - ref).max()), "threads": torch.get_num_threads()}
    print(f"cpu {name:<20} kiln {res['kiln_ms']:8.2f} ms  onnxruntime {res['ort_ms']:8.2f} ms  "
          f"max abs diff {res['max_abs']:.1e}", flush=True)
    return res


def write_report(paths: list[str], out_md: str) -> None:
    by_key: dict[tuple, tuple] = {}
    meta = {}
    for p in paths:                      # a later file's row replaces an earlier one for the same model and batch
        with open(p) as f:
            data = json.load(f)
        meta = data.get("meta", meta) if data.get("models") else meta
        for m in data.get("models", []):
            for r in m["rows"]:
                by_key[(m["model"], r["batch"])] = (m, r)
    order = list(TABLE)
    rows = sorted(by_key.values(), key=lambda mr: (order.index(mr[0]["model"]) if mr[0]["model"] in order else 99,
                                                    mr[1]["batch"]))
    lines = ["# Benchmarks", "",
             f"Card: {meta.get('device')}; torch {meta.get('torch')}, CUDA {meta.get('cuda')}, "
             f"cuDNN {meta.get('cudnn')}, Kiln {meta.get('kiln')}; {meta.get('date')}.",
             "FP16, random weights and inputs; median ms of ≥50 CUDA-event-timed runs, measured twice "
             "(the mean of the two medians). Produced by `python benchmarks/harness.py --report` on the GPU machine. "
             "The accuracy column compares with PyTorch in FP32 with TF32 off (results from 2026-11-26 04:00 on; "
             "earlier ones kept torch's default TF32 convolutions in the reference).",
             "", "| model | batch | Kiln | eager | eager + CUDA graph | torch.compile | best peer | Kiln ÷ best peer "
             "| Kiln items/s | rel. L2 vs FP32: Kiln / eager FP16 |", "|---|---|---|---|---|---|---|---|---|---|"]
    speedups = []
    perf_rows = {"resnet50", "mobilenet_v3_large", "vit_b_16", "bert_base", "yolov5l"}     # PERF.md's table
    for m, r in rows:
        def g(k):
            v = r.get(k)
            return f"{v['median_ms']:.3f}" if isinstance(v, dict) and "median_ms" in v else "n/a"
        sp = r.get("speedup_vs_best_peer")
        if sp and m["model"] in perf_rows:
            speedups.append(sp)
        eager_err = r.get("eager_fp16_rel_l2_vs_fp32")
        err = f"{r['kiln_rel_l2_vs_fp32']:.1e} / " + (f"{eager_err:.1e}" if eager_err is not None else "not measured")
        lines.append(f"| {m['model']} | {r['batch']} | {g('kiln')} | {g('eager')} | {g('eager_cuda_graph')} | "
                     f"{g('torch_compile')} | {r['best_peer_ms']:.3f} | {sp:.2f}× | {r['throughput_per_s']:.0f} | "
                     f"{err} |")
    if speedups:
        gm = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        lines += ["", f"Geometric mean of Kiln ÷ best peer over PERF.md's {len(speedups)} rows: **{gm:.2f}×** "
                  f"(the LSTM rows are extra)."]
    lines += ["", "## Builds and accuracy", "", "| model | export s | build s (first batch) | warm-cache build s | "
              "FP32 engine vs ONNX Runtime (max abs / rel. L2) | unsupported nodes |", "|---|---|---|---|---|---|"]
    seen = set()
    for m, r in rows:
        if m["model"] in seen:
            continue
        seen.add(m["model"])
        acc = m.get("fp32_vs_ort", {})
        acc_s = f"{acc['max_abs']:.2e} / {acc['rel_l2']:.2e}" if "max_abs" in acc else acc.get("error", "n/a")
        lines.append(f"| {m['model']} | {m.get('export_s', 0):.1f} | {m['rows'][0]['build_s']:.1f} | "
                     f"{m['rows'][0].get('build_warm_cache_s', float('nan')):.1f} | {acc_s} | "
                     f"{len(m.get('unsupported', []))} |")
    cpu = [r for p in paths for r in json.load(open(p)).get("cpu", []) if "kiln_ms" in r]
    if cpu:
        lines += ["", "## CPU, batch 1, FP32: Kiln vs ONNX Runtime (no target yet)", "",
                  "| model | Kiln ms | ONNX Runtime ms | Kiln ÷ ORT speed | max abs diff |", "|---|---|---|---|---|"]
        for r in cpu:
            lines.append(f"| {r['model']} | {r['kiln_ms']:.2f} | {r['ort_ms']:.2f} | {r['ort_ms'] / r['kiln_ms']:.2f}× | "
                         f"{r['max_abs']:.1e} |")
    notes = os.path.join(HERE, "notes.md")
    if os.path.exists(notes):
        lines += ["", open(notes).read().rstrip()]
    with open(out_md, "w") as f:
        f.write("\n".join(lines) + "\n")


def new_results(out_dir: str, prefix: str) -> tuple[dict[str, Any], str]:
    """A results record headed by this machine's and Kiln's versions (printed), and the JSON path in ``out_dir``
    (made) it is written to: ``PREFIX-YYYYmmdd-HHMMSS.json``."""
    import kiln
    props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    meta = {"device": props.name if props else "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "kiln": kiln.__version__,
            "date": datetime.date.today().isoformat()}
    print(json.dumps(meta), flush=True)
    os.makedirs(out_dir, exist_ok=True)
    return {"meta": meta, "models": []}, os.path.join(out_dir, f"{prefix}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")


def run_each(results: dict[str, Any], path: str, jobs: list[tuple[str, Callable[[], dict[str, Any]]]]) -> None:
    """Each (model, job): its result appended to ``results["models"]`` (a failure as the model with its error,
    traceback printed), the whole record rewritten to ``path`` after each, so a run cut short keeps what it
    measured."""
    for name, job in jobs:
        try:
            results["models"].append(job())
        except Exception as exc:
            import traceback
            traceback.print_exc()
            results["models"].append({"model": name, "rows": [], "error": f"{type(exc).__name__}: {exc}"[:500]})
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(TABLE))
    ap.add_argument("--batches", help="override batch sizes, e.g. 1,8")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves minutes)")
    ap.add_argument("--compile-deadline", type=float, default=1e9, metavar="S",
                    help="stop measuring torch.compile once the harness has run this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    ap.add_argument("--report", nargs="*", help="only write BENCHMARKS.md from these result JSON files")
    ap.add_argument("--cpu", action="store_true", help="Kiln vs ONNX Runtime on the CPU at batch 1 instead")
    ap.add_argument("--profile", action="store_true", help="print each engine's slowest layers")
    args = ap.parse_args()
    if args.report is not None:
        write_report(args.report, os.path.join(os.path.dirname(HERE), "BENCHMARKS.md"))
        return 0
    args.workdir = tempfile.mkdtemp(prefix="kiln-bench-")
    results, path = new_results(args.out, "bench")
    if args.cpu:
        results["cpu"] = []
        for name in args.models.split(","):
            try:
                results["cpu"].append(run_cpu(name, args))
            except Exception as exc:
                results["cpu"].append({"model": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            with open(path, "w") as f:
                json.dump(results, f, indent=1, default=str)
        print(f"wrote {path}")
        return 0
    batches = lambda name: [int(b) for b in args.batches.split(",")] if args.batches else TABLE[name]   # noqa: E731
    run_each(results, path, [(name, lambda name=name: run_model(name, batches(name), args))
                             for name in args.models.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
