"""The full-size model zoo (benchmarks/zoo.py) on CUDA against ONNX Runtime on the CPU.

Run on the GPU machine:  pytest -m slow tests/test_zoo.py -s   (about 8 minutes on an H100 host)
For each model: export with random weights, ``kiln.onnx.check`` finds no unsupported node, FP32 and
FP16 engines are built for CUDA, and their outputs are compared with ONNX Runtime's. A table of max
abs error and relative L2 error is printed and, when $OUT is set, written to $OUT/zoo_accuracy.json
(rewritten after every model, so a cut-short run still leaves its numbers).

The self-defined models also run small on the CPU in the default suite, so the zoo's own code
(YOLOv5/YOLOv8 heads, UNet, LSTM) is exercised everywhere.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import kiln
import kiln.onnx
from _models import assert_close_fp32, ort_run, rel_l2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import zoo  # noqa: E402

FULL = zoo.zoo()
SMALL = zoo.zoo(small=True)
# relative L2 vs ORT FP32 that a CUDA engine must stay within
LIMITS = {"fp32": 1e-3, "fp16": 2e-2}


def _needs(name: str) -> None:
    lib = zoo.LIBRARY_MODELS.get(name)
    if lib and importlib.util.find_spec(lib) is None:
        pytest.skip(f"{name} needs {lib}, which is not installed here")


def _ort_full(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ORT on every core, basic (value-preserving) graph optimizations only."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


@pytest.fixture(scope="module")
def report(request):
    rows: list[dict] = []
    yield rows
    header = f"{'model':28s} {'prec':5s} {'output':18s} {'max abs err':>12s} {'rel L2':>10s} {'build s':>8s} {'run ms':>8s}"
    lines = ["", "Kiln CUDA vs ONNX Runtime CPU (FP32), random weights", header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['model']:28s} {r['precision']:5s} {r['output']:18s} {r['max_abs_err']:12.4g} "
                     f"{r['rel_l2']:10.3g} {r['build_s']:8.1f} {r['run_ms']:8.2f}")
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    for line in lines:
        (tr.write_line if tr else print)(line)


def _write_json(rows: list[dict]) -> None:
    out = os.environ.get("OUT")
    if out:
        import torch
        doc = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "kiln": kiln.__version__, "rows": rows}
        Path(out, "zoo_accuracy.json").write_text(json.dumps(doc, indent=1))


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(FULL))
def test_zoo_model_on_cuda(name: str, tmp_path_factory, report) -> None:
    import torch
    _needs(name)
    model = FULL[name]
    t0 = time.perf_counter()
    path = model.export(tmp_path_factory.mktemp(name))
    export_s = time.perf_counter() - t0
    problems = kiln.onnx.check(path)
    assert problems == [], f"{name}: unsupported nodes {problems}"
    feeds = model.feeds(seed=1)
    ref = _ort_full(path, feeds)
    network = kiln.onnx.parse(path)
    failures = []
    for precision in ("fp32", "fp16"):
        t1 = time.perf_counter()
        engine = kiln.build(network, kiln.BuildConfig(precision=precision, device="cuda", profiles=model.profiles()))
        build_s = time.perf_counter() - t1
        ctx = engine.context()
        got = ctx.run(feeds)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        for _ in range(3):
            ctx.run(feeds)
        run_ms = (time.perf_counter() - t2) / 3 * 1e3
        for out, r in ref.items():
            g = got[out]
            finite = bool(np.isfinite(g).all())
            row = {"model": name, "precision": precision, "output": out, "shape": list(g.shape),
                   "max_abs_err": float(np.abs(g.astype(np.float64) - r).max()) if finite else float("inf"),
                   "rel_l2": rel_l2(g, r) if finite else float("inf"), "ref_max_abs": float(np.abs(r).max()),
                   "build_s": round(build_s, 2), "run_ms": round(run_ms, 3), "export_s": round(export_s, 1),
                   "opset": model.opset, "dynamo": model.dynamo}
            report.append(row)
            if g.shape != r.shape or g.dtype != r.dtype or not row["rel_l2"] <= LIMITS[precision]:
                failures.append(f"{precision} {out}: shape {g.shape}/{r.shape} dtype {g.dtype}/{r.dtype} "
                                f"rel L2 {row['rel_l2']:.3g} > {LIMITS[precision]}")
        _write_json(report)
        del engine, ctx, got
        torch.cuda.empty_cache()
    assert not failures, f"{name}: " + "; ".join(failures)


SELF_DEFINED = [n for n in SMALL if n not in zoo.LIBRARY_MODELS]


@pytest.mark.parametrize("name", SELF_DEFINED + ["bert_base_opset17"])
def test_zoo_small_on_cpu(name: str, tmp_path: Path) -> None:
    """The zoo's own model code at small size: exports, checks clean, and matches ORT on the Kiln CPU path."""
    _needs(name)
    model = SMALL[name]
    path = model.export(tmp_path)
    assert kiln.onnx.check(path) == []
    engine = kiln.build(kiln.onnx.parse(path), kiln.BuildConfig(device="cpu", profiles=model.profiles()))
    for seed, sizes in enumerate([model.sizes, {k: v[0] for k, v in model.ranges.items()}]):
        feeds = model.feeds(seed=seed, sizes=sizes)
        ref = ort_run(path, feeds)
        got = engine.context().run(feeds)
        for out in ref:
            assert_close_fp32(got[out], ref[out], f"{name} {out} at {sizes}")
