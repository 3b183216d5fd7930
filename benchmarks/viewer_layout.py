"""Viewer layout timing in Python on BERT-like encoders of 1k/5k/10k/50k nodes (kiln.viewer.samples.transformer).

For each size it reports, in seconds on this machine:
  read      ONNX file → view graph (protobuf parse, shape inference)
  first     what `kiln view` lays out before the page opens: the structure of the first view's clusters only
  structure name-scope clusters + Sugiyama structure of every cluster (ranks, dummies, order) + page data
  flat      structure of the same graph with its name scopes removed (one 10k-node layer graph)
Coordinates are computed by the page (static/layout.js): benchmarks/viewer_page.py measures them in Chromium.

    python benchmarks/viewer_layout.py [--sizes 1000,5000,10000,50000] [--no-flat] [--repeat N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import onnx

from kiln.viewer import samples
from kiln.viewer.formats.onnx import read
from kiln.viewer.page import build_pane


def _t(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(nodes: int, flat: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save(samples.transformer(nodes), path)
        model, t_read = _t(lambda: read(path))
    _, t_lazy = _t(lambda: build_pane(model, lazy=True))
    pane, t_struct = _t(lambda: build_pane(model))
    row = {"nodes": len(model.graph.nodes), "clusters": len(pane.data["clusters"]), "read": t_read, "first": t_lazy,
           "structure": t_struct}
    if flat:
        for n in model.graph.nodes:
            n.group = ()
        _, row["flat"] = _t(lambda: build_pane(model))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,5000,10000,50000")
    ap.add_argument("--no-flat", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs per size; the fastest of each column is shown "
                                                          "(a shared machine only ever adds time)")
    args = ap.parse_args(argv)
    print(f"{'nodes':>7} {'clusters':>8} {'read':>7} {'first':>7} {'structure':>9} {'flat':>7}")
    for n in (int(s) for s in args.sizes.split(",")):
        runs = [measure(n, not args.no_flat) for _ in range(args.repeat)]
        r = {k: min(run[k] for run in runs) for k in runs[0]}
        print(f"{r['nodes']:>7} {r['clusters']:>8} {r['read']:>7.2f} {r['first']:>7.2f} {r['structure']:>9.2f} "
              f"{r.get('flat', float('nan')):>7.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
