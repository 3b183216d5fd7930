"""Which tactic each layer of a zoo model's FP16 engine got, and every candidate's measured time.

    python benchmarks/dump_tactics.py yolov5l 1 [--kind Convolution]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("batch", type=int)
    ap.add_argument("--kind", default="")
    ap.add_argument("--summary", action="store_true", help="only the chosen counts and per-tactic totals")
    args = ap.parse_args()
    import kiln
    torch.manual_seed(0)
    model, make_inputs, in_names, out_names, _ = harness.build_model(args.model)
    harness.calibrate(model, make_inputs)
    d = tempfile.mkdtemp()
    path = os.path.join(d, "m.onnx")
    with torch.no_grad():
        torch.onnx.export(model.eval(), make_inputs(1), path, input_names=in_names, output_names=out_names[:1],
                          dynamic_axes={n: {harness.batch_axis(args.model): "b"} for n in in_names},
                          opset_version=17, dynamo=False)
    shapes = {n: tuple(t.shape) for n, t in zip(in_names, make_inputs(args.batch))}
    cache = os.path.join(d, "t.cache")
    engine = kiln.build(kiln.onnx.parse(path), kiln.BuildConfig(precision="fp16", device="cuda", profiles=shapes,
                                                                timing_cache=cache))
    counts: dict = {}
    for layer in engine.layers:
        counts.setdefault(layer["kind"], {}).setdefault(layer["tactic"], 0)
        counts[layer["kind"]][layer["tactic"]] += 1
    print("chosen:", json.dumps(counts))
    with open(cache) as f:
        entries = json.load(f)
    entries = entries.get("entries", entries)
    totals: dict = {}
    best_total = 0.0
    for key, times in list(entries.items()):
        parts = key.split("|")
        if args.kind and parts[1] != args.kind:
            continue
        attrs = json.loads(parts[2])
        brief = {k: attrs[k] for k in ("activation", "residual", "stride", "groups") if k in attrs}
        if not args.summary:
            print(parts[1], brief, parts[3][:70], {k: round(v, 4) for k, v in times.items()})
        for k, v in times.items():
            totals[k] = totals.get(k, 0.0) + (v if v < float("inf") else min(times.values()))
        best_total += min(times.values())
    # Per tactic: the sum over the timed layers if it had been chosen everywhere (its own time where it ran,
    # the best time where it could not), against the sum of the winners.
    print("totals ms:", {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: kv[1])},
          "best:", round(best_total, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
