"""Kiln's own per-layer cost on the CPU: a chain of tiny layers, a Loop of tiny bodies, against bare torch.

    python benchmarks/cpu_overhead.py                         # 200-layer chain, 100-iteration Loop
    python benchmarks/cpu_overhead.py --corpus silero_vad_v6,magika --json overhead.json

The chain is N layers alternating ``Add`` (a [1, 8] constant) and ``Relu`` on a [1, 8] tensor, built for
the CPU at optimization level 0 so that every node stays a layer. "bare torch" runs the same torch calls
in a plain Python loop; Kiln's overhead per layer is (Kiln's time per call - bare time per call) / N. The
Loop is an ONNX Loop of T iterations whose body adds a constant and applies Relu; its overhead is per
iteration against the same two torch calls. Corpus models (tests/corpus, fetched by
scripts/fetch_corpus.py, or $KILN_CORPUS_DIR) give Kiln's and ONNX Runtime's time per call, and where
Kiln's time goes: the median wall time inside the layers of each kind and tactic (``ctx.profile``;
a subgraph body counts in its If/Loop layer).

All at one thread. Times are CPU time of this process (``time.process_time``), per call, as the median
(and the minimum) over ``--repeats`` repeats of ``--calls`` calls, so a busy machine inflates them less
than wall time; contenders alternate repeat by repeat.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import kiln  # noqa: F401  (before torch: kiln sets OpenMP's wait policy, as in a user's process)

HERE = Path(__file__).resolve().parent


def chain_model(n: int, width: int = 8):
    """An ONNX model of ``n`` layers alternating Add (a constant) and Relu on a [1, width] input."""
    from onnx import TensorProto, helper, numpy_helper
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        out = f"t{i}"
        if i % 2 == 0:
            c = np.full((1, width), 0.01 * (i % 7 - 3), np.float32)
            inits.append(numpy_helper.from_array(c, f"c{i}"))
            nodes.append(helper.make_node("Add", [prev, f"c{i}"], [out]))
        else:
            nodes.append(helper.make_node("Relu", [prev], [out]))
        prev = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def chain_reference(model) -> Callable[[Any], Any]:
    """The chain as bare torch calls in a Python loop (what Kiln's layers call, without Kiln around them)."""
    import torch
    from onnx import numpy_helper
    consts = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    ops = [(torch.add, consts[node.input[1]]) if node.op_type == "Add" else (torch.relu, None)
           for node in model.graph.node]

    def run(x):
        for fn, c in ops:
            x = fn(x) if c is None else fn(x, c)
        return x
    return run


def loop_model(trips: int, width: int = 8):
    """An ONNX Loop of ``trips`` iterations; its body is y = relu(x + c) on a [1, width] carried value."""
    from onnx import TensorProto, helper, numpy_helper
    f = TensorProto.FLOAT
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["x_in", "c"], ["s"]), helper.make_node("Relu", ["s"], ["x_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("x_in", f, [1, width])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", f, [1, width])],
        [numpy_helper.from_array(np.full((1, width), -0.01, np.float32), "c")])
    graph = helper.make_graph([helper.make_node("Loop", ["M", "", "x"], ["y"], body=body, name="loop")], "loop",
                              [helper.make_tensor_value_info("x", f, [1, width])],
                              [helper.make_tensor_value_info("y", f, [1, width])],
                              [numpy_helper.from_array(np.array(trips, np.int64), "M")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def build_cpu(model, path: Path, level: int = 0):
    """A CPU engine of ``model`` (saved to ``path`` first), one thread."""
    import onnx

    import kiln.onnx
    onnx.save(model, str(path))
    return kiln.build(kiln.onnx.parse(str(path)), kiln.BuildConfig(device="cpu", optimization_level=level))


def cpu_per_call(fns: dict[str, Callable[[], Any]], calls: int, repeats: int) -> dict[str, list[float]]:
    """Microseconds of process CPU time per call, one sample per repeat, the contenders alternating."""
    for fn in fns.values():
        for _ in range(max(3, calls // 10)):
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            for _ in range(calls):
                fn()
            out[name].append((time.process_time() - t0) / calls * 1e6)
    return out


def _stats(samples: list[float]) -> dict[str, float]:
    return {"median_us": round(statistics.median(samples), 2), "min_us": round(min(samples), 2)}


def measure_chain(n: int, calls: int, repeats: int, workdir: Path) -> dict[str, Any]:
    import torch
    model = chain_model(n)
    engine = build_cpu(model, workdir / "chain.onnx")
    if len(engine.layers) != n:
        raise SystemExit(f"the chain built to {len(engine.layers)} layers, not {n}: a pass fused them")
    ctx = engine.context(threads=1)
    x = torch.randn(1, 8)
    feeds = {"x": x.numpy()}
    bare = chain_reference(model)
    np.testing.assert_allclose(ctx.execute([x])[0].numpy(), bare(x).numpy(), rtol=0, atol=0)
    t = cpu_per_call({"bare": lambda: bare(x), "execute": lambda: ctx.execute([x]),
                      "run": lambda: ctx.run(feeds)}, calls, repeats)
    row = {k: _stats(v) for k, v in t.items()}
    row["layers"] = n
    row["overhead_per_layer_us"] = round((row["execute"]["median_us"] - row["bare"]["median_us"]) / n, 3)
    row["run_minus_execute_us"] = round(row["run"]["median_us"] - row["execute"]["median_us"], 2)
    return row


def measure_loop(trips: int, calls: int, repeats: int, workdir: Path) -> dict[str, Any]:
    import torch
    engine = build_cpu(loop_model(trips), workdir / "loop.onnx")
    ctx = engine.context(threads=1)
    x = torch.randn(1, 8)
    c = torch.full((1, 8), -0.01)

    def bare():
        y = x
        for _ in range(trips):
            y = torch.relu(torch.add(y, c))
        return y
    np.testing.assert_allclose(ctx.execute([x])[0].numpy(), bare().numpy(), rtol=0, atol=0)
    t = cpu_per_call({"bare": bare, "execute": lambda: ctx.execute([x])}, calls, repeats)
    row = {k: _stats(v) for k, v in t.items()}
    row["trips"] = trips
    row["overhead_per_iteration_us"] = round((row["execute"]["median_us"] - row["bare"]["median_us"]) / trips, 3)
    return row


def measure_corpus(name: str, calls: int, repeats: int) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    import kiln.onnx
    sys.path.insert(0, str(HERE.parent / "tests" / "corpus"))
    import corpus_lib as cl
    model = cl.load_manifest().model(name)
    path = cl.model_path(cl.corpus_dir(), model)
    if not path.exists():
        return {"skipped": f"{path} is missing (scripts/fetch_corpus.py)"}
    feeds = cl.make_feeds(model)
    engine = kiln.build(kiln.onnx.parse(str(path)),
                        kiln.BuildConfig(device="cpu", profiles={n: a.shape for n, a in feeds.items()}))
    ctx = engine.context(threads=1)
    tensors = [torch.from_numpy(np.ascontiguousarray(feeds[t["name"]])) for t in engine.inputs]
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    t = cpu_per_call({"kiln_execute": lambda: ctx.execute(tensors), "kiln_run": lambda: ctx.run(feeds),
                      "onnxruntime": lambda: sess.run(None, feeds)}, calls, repeats)
    row = {k: _stats(v) for k, v in t.items()}
    row["layers"] = len(engine.layers)
    row["inside_layers_us"] = _by_kind(ctx.profile(tensors, runs=max(5, calls)))
    return row


def _by_kind(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Microseconds per run inside the layers of each (kind, tactic), largest first, and their total."""
    total: dict[str, float] = {}
    for r in rows:
        key = f"{r['kind']}/{r['tactic']}"
        total[key] = total.get(key, 0.0) + r["ms"] * 1e3
    out = {k: round(v, 1) for k, v in sorted(total.items(), key=lambda kv: -kv[1])}
    out["all layers"] = round(sum(total.values()), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--trips", type=int, default=100)
    ap.add_argument("--calls", type=int, default=200, help="calls per repeat")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--corpus", default="", help="comma-separated corpus model ids")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    from kiln.kernels.cpu_threads import use_threads
    use_threads(1)
    rows: dict[str, Any] = {"load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        rows["chain"] = measure_chain(args.layers, args.calls, args.repeats, Path(tmp))
        print("chain", json.dumps(rows["chain"]), flush=True)
        rows["loop"] = measure_loop(args.trips, max(1, args.calls // 10), args.repeats, Path(tmp))
        print("loop", json.dumps(rows["loop"]), flush=True)
    for name in filter(None, args.corpus.split(",")):
        rows[name] = measure_corpus(name, max(1, args.calls // 10), args.repeats)
        print(name, json.dumps(rows[name]), flush=True)
    rows["load_average_after"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
