"""Model diff time against model size: two BERT-like encoders that differ in one layer, on the CPU.

    PYTHONPATH=src python benchmarks/diff_scale.py [--sizes 1000,10000,50000] [--unnamed] [--no-weights]
                                                   [--profile]

Each size builds ``kiln.viewer.samples.transformer(n)`` twice; the second copy gets one changed
attribute (a LayerNormalization epsilon) and one changed weight in its middle layer. Both are read
into view graphs (``kiln.viewer.formats.onnx.read_proto``, timed apart), then
``kiln.viewer.diff.diff_models`` is timed in wall and process CPU seconds. ``--unnamed`` clears every
node name so that all matching is structural; ``--no-weights`` skips reading weight values;
``--profile`` prints the top of a cProfile of the largest diff.
"""
from __future__ import annotations

import argparse
import cProfile
import copy
import pstats
import sys
import time
from pathlib import Path

import numpy as np
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kiln.viewer import samples  # noqa: E402
from kiln.viewer.diff import diff_models  # noqa: E402
from kiln.viewer.formats.onnx import read_proto  # noqa: E402


def pair(nodes: int, unnamed: bool):
    """Two encoders of about ``nodes`` nodes, the second with one attribute and one weight changed."""
    a = samples.transformer(nodes)
    b = copy.deepcopy(a)
    layer = (len(a.graph.node) // samples.NODES_PER_LAYER) // 2
    ln = next(n for n in b.graph.node if n.name.startswith(f"/encoder/layer.{layer}/output/LayerNorm"))
    ln.attribute.append(helper.make_attribute("epsilon", 1e-3))
    w = next(t for t in b.graph.initializer if t.name.startswith(f"/encoder/layer.{layer}/output/LayerNorm.g"))
    arr = numpy_helper.to_array(w) + np.float32(0.5)
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    if unnamed:
        for m in (a, b):
            for n in m.graph.node:
                n.name = ""
    return a, b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000,10000", help="node counts, comma-separated")
    p.add_argument("--unnamed", action="store_true", help="clear node names: match by structure only")
    p.add_argument("--no-weights", action="store_true", help="do not read weight values")
    p.add_argument("--profile", action="store_true", help="cProfile the largest diff")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    for n in sizes:
        a, b = pair(n, args.unnamed)
        t0 = time.perf_counter()
        va, vb = read_proto(a), read_proto(b)
        read_s = time.perf_counter() - t0
        w0, c0 = time.perf_counter(), time.process_time()
        d = diff_models(va, vb, weights=not args.no_weights)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        c = d.counts()
        print(f"{len(a.graph.node):>7} nodes  read both {read_s:6.2f} s  diff {wall:6.2f} s wall {cpu:6.2f} s CPU  "
              f"changed {c['changed']} added {c['added']} removed {c['removed']} unchanged {c['unchanged']}",
              flush=True)
        if args.profile and n == sizes[-1]:
            prof = cProfile.Profile()
            prof.runcall(diff_models, va, vb, weights=not args.no_weights)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(20)


if __name__ == "__main__":
    main()
