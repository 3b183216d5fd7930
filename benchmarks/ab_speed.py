"""Kiln against Kiln: the harness's FP16 rows built and timed by two source trees on one GPU, alternating.

    python benchmarks/ab_speed.py --base OLD/src [--new src] [--models resnet50,bert_base] [--rounds 2]

Each model is exported once (the harness's seeded weights); then, per round, each tree builds the FP16
engine of every batch in a fresh process and times it exactly as `harness.py` does (median of CUDA-event
timed runs, measured twice). The order of the trees alternates between rounds. Prints one line per row with
both medians, their ratio, and whether both trees built the same layers with the same tactics.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def child(args) -> None:
    sys.path.insert(0, os.path.abspath(args.src))
    sys.path.insert(1, HERE)
    import torch

    import harness
    import kiln
    import kiln.onnx
    torch.manual_seed(0)
    _, make_inputs, in_names, _, _ = harness.build_model(args.model)
    rows = []
    for b in [int(v) for v in args.batches.split(",")]:
        inputs = [t.cuda().contiguous() for t in make_inputs(b)]
        shapes = {n: tuple(t.shape) for n, t in zip(in_names, inputs)}
        engine = kiln.build(kiln.onnx.parse(args.onnx),
                            kiln.BuildConfig(precision="fp16", device="cuda", profiles=shapes))
        ctx = engine.context()
        ctx.execute(inputs)
        runs = 60 if b <= 32 else 50
        t = harness.twice(lambda: ctx.execute(inputs), runs)
        layers = [(layer["kind"], layer.get("tactic")) for layer in engine.layers]
        if args.dump:
            with open(os.path.join(args.dump, f"{args.model}_b{b}_{args.tree}.json"), "w") as f:
                json.dump(engine.layers, f, indent=1, default=str)
        rows.append({"batch": b, "median_ms": t["median_ms"], "layers": layers})
        ctx = engine = None
        torch.cuda.empty_cache()
    print("AB " + json.dumps(rows), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the baseline tree's src folder")
    ap.add_argument("--new", default=os.path.join(HERE, "..", "src"), help="the new tree's src folder")
    ap.add_argument("--models", default="resnet50,mobilenet_v3_large,vit_b_16,bert_base,yolov5l,lstm")
    ap.add_argument("--batches", help="override every model's batch sizes, e.g. 1,32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dump", help="write each engine's layer list (JSON) into this folder")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    sys.path.insert(0, os.path.abspath(args.new))
    sys.path.insert(1, HERE)
    import harness
    work = tempfile.mkdtemp(prefix="kiln-ab-")
    trees = {"base": os.path.abspath(args.base), "new": os.path.abspath(args.new)}
    results: dict[tuple[str, int], dict[str, list]] = {}
    for name in args.models.split(","):
        batches = args.batches or ",".join(map(str, harness.TABLE[name]))
        path = harness.export_model(name, work)[6]
        for rnd in range(args.rounds):
            for tree in (("base", "new") if rnd % 2 == 0 else ("new", "base")):
                r = subprocess.run([sys.executable, __file__, "--base", trees["base"], "--child", "--src", trees[tree],
                                    "--onnx", path, "--model", name, "--batches", batches, "--tree", tree]
                                   + (["--dump", args.dump] if args.dump else []),
                                   capture_output=True, text=True)
                line = next((x for x in r.stdout.splitlines() if x.startswith("AB ")), None)
                if line is None:
                    print(f"{name} {tree}: failed\n{r.stderr[-2000:]}", flush=True)
                    continue
                for row in json.loads(line[3:]):
                    slot = results.setdefault((name, row["batch"]), {"base": [], "new": [], "layers": {}})
                    slot[tree].append(row["median_ms"])
                    slot["layers"][tree] = row["layers"]
        for (m, b), slot in results.items():
            if m != name or not slot["base"] or not slot["new"]:
                continue
            base, new = sorted(slot["base"])[len(slot["base"]) // 2], sorted(slot["new"])[len(slot["new"]) // 2]
            lb, ln = slot["layers"].get("base") or [], slot["layers"].get("new") or []
            same = lb == ln
            kinds_same = [k for k, _ in lb] == [k for k, _ in ln]
            print(f"{m:<20} b={b:<4} base {base:8.3f} ms  new {new:8.3f} ms  new/base {new / base:6.3f}  "
                  f"runs {slot['base']} / {slot['new']}  same layers: {kinds_same}, same tactics: {same}", flush=True)
            if not same:
                diffs = [(i, x, y) for i, (x, y) in enumerate(zip(lb, ln)) if x != y]
                print(f"    {len(lb)} / {len(ln)} layers; first differences: {diffs[:8]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
