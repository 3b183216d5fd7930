"""Parse and build time against model size: long chains and wide graphs of cheap ops, on the CPU.

    PYTHONPATH=src python benchmarks/parse_scale.py [--sizes 8000,16000,100000] [--shapes chain,wide]
                                                   [--no-build] [--profile parse|build]

"chain": one long chain alternating Add (with a small constant) and Relu on a [1, 8] tensor.
"wide": about sqrt(n) parallel chains of that kind from one input, summed pairwise at the end.
Each model is serialized once, then timed: ``kiln.onnx.parse`` of the bytes, and ``kiln.build``
(CPU, default optimization level) of the parsed network, in wall and process CPU seconds (the first
model's build also pays for imports). Prints one line per model; with
``--profile`` the top of a cProfile of that stage for the largest size, to find hot spots.
"""
from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import kiln  # noqa: E402
import kiln.onnx  # noqa: E402

WIDTH = 8


def _step(nodes: list, inits: list, src: str, tag: str, k: int, branch: int = 0) -> str:
    """Append node ``k`` of a chain reading ``src``: an Add with its own constant (seven values per
    branch, each branch its own, so no two branches compute the same), or a Relu."""
    out = f"{tag}_{k}"
    if k % 2 == 0:
        c = f"{tag}_c{k}"
        value = 0.001 * (k % 7) - 0.002 + 1e-6 * branch
        inits.append(numpy_helper.from_array(np.full([WIDTH], value, np.float32), c))
        nodes.append(helper.make_node("Add", [src, c], [out], name=f"{tag}_add{k}"))
    else:
        nodes.append(helper.make_node("Relu", [src], [out], name=f"{tag}_relu{k}"))
    return out


def chain_model(n: int) -> onnx.ModelProto:
    nodes: list = []
    inits: list = []
    cur = "x"
    for k in range(n):
        cur = _step(nodes, inits, cur, "n", k)
    return _finish(nodes, inits, cur)


def wide_model(n: int) -> onnx.ModelProto:
    branches = max(2, int(math.sqrt(n)))
    depth = max(1, (n - branches + 1) // branches)
    nodes: list = []
    inits: list = []
    ends = []
    for b in range(branches):
        cur = "x"
        for k in range(depth):
            cur = _step(nodes, inits, cur, f"b{b}", k, b)
        ends.append(cur)
    level = 0
    while len(ends) > 1:          # pairwise sum, log depth
        nxt = []
        for i in range(0, len(ends) - 1, 2):
            out = f"sum{level}_{i}"
            nodes.append(helper.make_node("Add", [ends[i], ends[i + 1]], [out], name=f"sum{level}_{i}"))
            nxt.append(out)
        if len(ends) % 2:
            nxt.append(ends[-1])
        ends, level = nxt, level + 1
    return _finish(nodes, inits, ends[0])


def _finish(nodes: list, inits: list, last: str) -> onnx.ModelProto:
    nodes.append(helper.make_node("Identity", [last], ["y"], name="out"))
    graph = helper.make_graph(nodes, "scale", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _timed(fn, profile: bool):
    """fn's result, wall seconds and this process's CPU seconds (the machine is shared: CPU time
    shows the work done when other jobs take the cores)."""
    prof = cProfile.Profile() if profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    out = fn()
    if prof:
        prof.disable()
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    if prof:
        for key in ("cumulative", "tottime"):
            pstats.Stats(prof).sort_stats(key).print_stats(25)
    return out, dt, dc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8000,16000,100000")
    ap.add_argument("--shapes", default="chain,wide")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--profile", choices=("parse", "build"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    makers = {"chain": chain_model, "wide": wide_model}
    x = np.linspace(-1, 1, WIDTH, dtype=np.float32).reshape(1, WIDTH)
    for shape in args.shapes.split(","):
        for n in sizes:
            model = makers[shape](n)
            data = model.SerializeToString()
            last = n == max(sizes)
            net, parse_s, parse_c = _timed(lambda: kiln.onnx.parse(data), args.profile == "parse" and last)
            line = f"{shape:5s} {len(model.graph.node):7d} nodes  parse {parse_s:6.2f} s (cpu {parse_c:6.2f} s)"
            if not args.no_build:
                engine, build_s, build_c = _timed(lambda: kiln.build(net, kiln.BuildConfig(device="cpu")),
                                                  args.profile == "build" and last)
                y = engine.context().run({"x": x})["y"]
                line += f"  build {build_s:6.2f} s (cpu {build_c:6.2f} s)  {len(engine.header['plan']['layers'])} " \
                        f"engine layers, y[0,:3] {np.round(y[0, :3], 4).tolist()}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
