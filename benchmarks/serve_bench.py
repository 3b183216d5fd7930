"""Load benchmark and soak for `kiln serve`, with NVIDIA's tritonclient as the client.

    python benchmarks/serve_bench.py sweep [--repo DIR --model NAME] [--protocols http,grpc]
        [--concurrency 1,2,4,8,16,32,64] [--seconds 5] [--warmup 1] [--batching on,off] [--shm off,on]
        [--shape NAME:DIMS ...]
        [--server-flag=--instances=2 ...] [--engine-bench] [--json out.json]
    python benchmarks/serve_bench.py models --out DIR [--names resnet50,bert_base] [--precision fp16] [--max-batch 64]
    python benchmarks/serve_bench.py soak [--requests 50000] [--bad-fraction 0.1] [--concurrency 8]
        [--rss-limit-mb 50] [--json out.json]
    python benchmarks/serve_bench.py engine-load [--widths 8,4] [--batches 1,8,32] [--requests 5000]
        [--inflight N] [--delay-us 20000] [--preferred on|off] [--buckets auto|on|off] [--instances 1]
        [--device cpu|cuda] [--staged auto|on|off[,...]] [--rounds 1] [--profile ROWS] [--json out.json]

sweep: starts `python -m kiln.serve` on the repository (default: a CPU MLP built here, x [N,256] ->
256 -> 64, N 1..64; --widths 8,4 measures the server's own overhead), once with dynamic batching and once with --no-batching, and for each protocol and
concurrency C runs C closed-loop clients (threads spread over processes) sending one-row requests
with binary tensors (HTTP binary extension, gRPC raw contents) for --seconds after a warm-up. Prints
throughput (inferences/s), p50/p90/p99 latency and the mean batch the server formed (from /metrics).
Inputs are random, shaped from the model's metadata: -1 dims are 1 unless --shape gives them.
--shm on: each client thread puts its inputs and outputs in POSIX shared memory (the system
shared-memory extension: one object per thread, registered with the server) instead of the request.
--engine-bench then times the engine itself (kiln.bench, as `kiln bench`) at the batch each point formed,
and prints the server's throughput as a share of it, beside that batch's median engine latency.

engine-load: the engine process of `--frontends` alone, without HTTP or gRPC: this process loads a CPU MLP
(x [N, widths[0]] -> ... , built here) and runs kiln.serve.frontends' side of one front-end link; a child
process stands in for the front end, sending one-row requests through kiln.serve.frontend's own link code
(slab slots, request records) from --inflight coroutines (default max(16, 2 x batch)), every answer checked
against a float64 reference. For each --batches size B the model is served with --max-batch B, preferred
size B and --delay-us of queue delay (B 1: no batching), so the batcher forms batches of B; with
--preferred off --delay-us 0 it forms them from whatever is queued when an instance is free (B is then
the limit), with --buckets and --instances as `kiln serve` takes them. --device cuda builds the MLP for the
GPU; --staged on,off runs each point through the instance's staged batch buffers and then without them
(an A/B of that path in one process). Prints the engine
process's CPU time (all its threads) per request between the child's start and end marks, requests/s and the
mean batch formed; --profile N prints the N most expensive functions of the engine process (cProfile: the
loop thread only, and slower while profiled).

models: exports the harness's ResNet-50 and BERT-base (seeded random weights) and builds GPU engines with
a dynamic batch 1..--max-batch into DIR (served as resnet50 and bert_base).

soak: builds y = relu(x @ W + b) (x [N,8]), serves it, and sends --requests requests of which
--bad-fraction are malformed (bad JSON, truncated binary, wrong shape/dtype/name, outside the profile,
unknown model, oversize). Every good answer is checked against numpy (float64, float32 rounding
bound), every bad one must be a 4xx with an error message; the server's RSS growth after the first
10% of requests must stay under --rss-limit-mb and the server must still be ready, then drain on
SIGINT and exit 0. Prints a JSON verdict; exits 1 if any check failed.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
EPS32 = float(np.finfo(np.float32).eps)
LINE = re.compile(r"kiln serve: (?:HTTP on http://(?P<http>[^,;]+))?(?:, )?(?:gRPC on (?P<grpc>[^;]+))?; models")
V2_NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
            "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
            "FP32": np.float32, "FP64": np.float64}


# ---- models and the server ---------------------------------------------------------------------
def build_mlp(folder: Path, name: str, widths: tuple[int, ...], max_batch: int, seed: int = 0,
              device: str = "cpu") -> list:
    """relu(x @ W1 + b1) -> ... as ONNX, built for ``device`` into folder/name.kiln; returns [(W, b), ...]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import kiln
    rng = np.random.default_rng(seed)
    nodes, inits, layers, src = [], [], [], "x"
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        W = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        bias = rng.standard_normal(b).astype(np.float32)
        inits += [numpy_helper.from_array(W, f"W{i}"), numpy_helper.from_array(bias, f"b{i}")]
        out = "y" if i == len(widths) - 2 else f"h{i}"
        nodes += [helper.make_node("MatMul", [src, f"W{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]), helper.make_node("Relu", [f"a{i}"], [out])]
        layers.append((W.astype(np.float64), bias.astype(np.float64)))
        src = out
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", widths[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", widths[-1]])], initializer=inits)
    onnx_path = folder / f"{name}.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(onnx_path))
    profile = {"x": ((1, widths[0]), (max(1, max_batch // 2), widths[0]), (max_batch, widths[0]))}
    kiln.build(kiln.onnx.parse(str(onnx_path)), kiln.BuildConfig(device=device, profiles=profile)).save(
        str(folder / f"{name}.kiln"))
    onnx_path.unlink()
    return layers


class Server:
    """`python -m kiln.serve REPO --http-port 0 --grpc-port 0 FLAGS` until stop()."""

    def __init__(self, repo: Path, *flags: str) -> None:
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "kiln.serve", str(repo), "--http-port", "0",
                                      "--grpc-port", "0", *flags], stdout=subprocess.PIPE, stderr=self.err,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline().decode()
        m = LINE.search(line)
        if not m:
            self.err.seek(0)
            raise SystemExit(f"kiln serve did not start: {line!r} {self.err.read()[-2000:]!r}")
        self.http, self.grpc = m.group("http"), m.group("grpc")

    def children(self) -> list[int]:
        """The server's child processes (its front ends, with --frontends N)."""
        return [int(k) for k in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]

    def rss_mb(self) -> float:
        """Resident memory of the server process and its front ends together."""
        total = 0.0
        for pid in (self.proc.pid, *self.children()):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        return total

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) so far of the server process ("engine") and of its child processes
        ("frontends", with --frontends N)."""
        def used(pid: int) -> float:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                return 0.0
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return {"engine": used(self.proc.pid), "frontends": sum(used(k) for k in self.children())}

    def metrics(self) -> str:
        return _get(self.http, "/metrics")[1].decode()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def _get(at: str, path: str) -> tuple[int, bytes]:
    host, port = at.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", path)
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def _metric(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


# ---- sweep ----------------------------------------------------------------------------------
def _inputs(meta: dict, shapes: dict[str, list[int]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for t in meta["inputs"]:
        dims = shapes.get(t["name"]) or [1 if int(d) < 0 else int(d) for d in t["shape"]]
        dt = V2_NUMPY[t["datatype"]]
        out[t["name"]] = (rng.integers(0, 100, dims).astype(dt) if np.issubdtype(dt, np.integer)
                          else rng.standard_normal(dims).astype(dt))
    return out


class _ShmTensors:
    """One client thread's inputs and outputs in a POSIX shared-memory object registered with the server."""

    def __init__(self, client, tc, model: str, inputs: list, feeds: dict[str, np.ndarray], tag: str) -> None:
        from multiprocessing import shared_memory
        first = client.infer(model, inputs)                     # the output sizes, from one request in the body
        outs = first.get_response()["outputs"] if isinstance(first.get_response(), dict) else [
            {"name": o.name} for o in first.get_response().outputs]
        sizes = {o["name"]: first.as_numpy(o["name"]).nbytes for o in outs}
        total = sum(a.nbytes for a in feeds.values()) + sum(sizes.values())
        self.client, self.name = client, tag
        self.obj = shared_memory.SharedMemory(f"kiln-bench-{tag}", create=True, size=total)
        client.register_system_shared_memory(tag, "/" + self.obj.name, total)
        self.inputs, self.outputs, offset = [], [], 0
        for t in inputs:
            a = feeds[t.name()]
            np.ndarray(a.shape, a.dtype, buffer=self.obj.buf, offset=offset)[...] = a
            i = tc.InferInput(t.name(), list(a.shape), t.datatype())
            i.set_shared_memory(tag, a.nbytes, offset)
            self.inputs.append(i)
            offset += a.nbytes
        for name, n in sizes.items():
            o = tc.InferRequestedOutput(name)
            o.set_shared_memory(tag, n, offset)
            self.outputs.append(o)
            offset += n

    def close(self) -> None:
        self.client.unregister_system_shared_memory(self.name)
        self.obj.close()
        self.obj.unlink()


def _client_process(protocol: str, at: str, model: str, threads: int, seconds: float, warmup: float,
                    shapes: dict, queue, shm: bool = False) -> None:
    """Closed-loop clients on threads; puts the latencies (s) of requests that finished after the warm-up."""
    if protocol == "http":
        import tritonclient.http as tc
    else:
        import tritonclient.grpc as tc
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = time.perf_counter()
    t_measure, t_end = start + warmup, start + warmup + seconds

    def worker(k: int) -> None:
        client = tc.InferenceServerClient(at) if protocol == "grpc" else tc.InferenceServerClient(at, concurrency=1)
        meta = client.get_model_metadata(model) if protocol == "http" else client.get_model_metadata(model, as_json=True)
        feeds = _inputs(meta, shapes, np.random.default_rng(k))
        inputs = []
        for t in meta["inputs"]:
            i = tc.InferInput(t["name"], list(feeds[t["name"]].shape), t["datatype"])
            if protocol == "http":
                i.set_data_from_numpy(feeds[t["name"]], binary_data=True)
            else:
                i.set_data_from_numpy(feeds[t["name"]])
            inputs.append(i)
        outputs = ([tc.InferRequestedOutput(t["name"], binary_data=True) for t in meta["outputs"]]
                   if protocol == "http" else None)
        placed = _ShmTensors(client, tc, model, inputs, feeds, f"{os.getpid()}-{k}") if shm else None
        if placed is not None:
            inputs, outputs = placed.inputs, placed.outputs
        mine = []
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                break
            try:
                client.infer(model, inputs, outputs=outputs)
            except Exception:                   # noqa: BLE001 - counted; the sweep reports errors
                with lock:
                    errors[0] += 1
                continue
            t1 = time.perf_counter()
            if t0 >= t_measure and t1 <= t_end:
                mine.append(t1 - t0)
        with lock:
            lat.extend(mine)
        if placed is not None:
            placed.close()
        client.close()
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    queue.put((lat, errors[0]))


def run_load(protocol: str, at: str, model: str, concurrency: int, seconds: float, shapes: dict,
             processes: int, warmup: float = 1.0, rows: int = 1, shm: bool = False) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = min(processes, concurrency)
    split = [concurrency // procs + (1 if k < concurrency % procs else 0) for k in range(procs)]
    ps = [ctx.Process(target=_client_process, args=(protocol, at, model, n, seconds, warmup, shapes, q, shm))
          for n in split]
    for p in ps:
        p.start()
    lat, errors = [], 0
    for _ in ps:
        got, err = q.get(timeout=seconds + warmup + 300)
        lat += got
        errors += err
    for p in ps:
        p.join()
    a = np.asarray(lat) * 1e3
    return {"protocol": protocol, "concurrency": concurrency, "shm": shm, "requests": len(lat), "errors": errors,
            "infer_per_s": len(lat) * rows / seconds,
            **({f"p{q}_ms": float(np.percentile(a, q)) for q in (50, 90, 99)} if len(a) else {})}


@contextlib.contextmanager
def _model_repo(args: argparse.Namespace):
    """(repository folder, model name, {input: dims} from --shape): --repo's, else a CPU MLP of --widths built
    in a temporary folder for the command's duration."""
    shapes = {}
    for s in args.shape or []:
        name, dims = s.split(":")
        shapes[name] = [int(d) for d in dims.split("x")]
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(args.repo) if args.repo else Path(tmp)
        widths = tuple(int(w) for w in args.widths.split(","))
        model = args.model or f"mlp{widths[0]}"
        if not args.repo:
            build_mlp(repo, model, widths, 64)
        yield repo, model, shapes


def cmd_sweep(args: argparse.Namespace) -> int:
    with _model_repo(args) as (repo, model, shapes):
        rows, dims = [], {}
        for batching in args.batching.split(","):
            flags = list(args.server_flag or []) + ([] if batching == "on" else ["--no-batching"])
            server = Server(repo, *flags)
            try:
                meta = json.loads(_get(server.http, f"/v2/models/{model}")[1])
                dims = {t["name"]: shapes.get(t["name"]) or [1 if int(d) < 0 else int(d) for d in t["shape"]]
                        for t in meta["inputs"]}
                per_request = next(iter(dims.values()))[0] if next(iter(dims.values())) else 1
                points = [(protocol, shm, int(c)) for protocol in args.protocols.split(",")    # shm off/on side by side
                          for c in args.concurrency.split(",") for shm in args.shm.split(",")]
                for protocol, shm, c in points:
                    before, cpu0 = server.metrics(), server.cpu_seconds()
                    r = run_load(protocol, server.http if protocol == "http" else server.grpc, model, c,
                                 args.seconds, shapes, args.processes, args.warmup, per_request, shm == "on")
                    after, cpu1 = server.metrics(), server.cpu_seconds()
                    m = f'kiln_batch_size_{{}}{{{{model="{model}"'
                    n = _metric(after, m.format("count")) - _metric(before, m.format("count"))
                    rs = _metric(after, m.format("sum")) - _metric(before, m.format("sum"))
                    served = max(1, _metric(after, "kiln_requests_total") - _metric(before, "kiln_requests_total"))
                    r.update(batching=batching, mean_batch=rs / n if n else float("nan"),
                             **{f"{k}_cpu_us": (cpu1[k] - cpu0[k]) / served * 1e6 for k in cpu1})
                    rows.append(r)
                    print(f"{protocol:4} shm {shm:3} batching {batching:3} c={c:3}  {r['infer_per_s']:9.1f} infer/s  "
                          f"p50 {r.get('p50_ms', float('nan')):7.2f}  p90 {r.get('p90_ms', float('nan')):7.2f}  "
                          f"p99 {r.get('p99_ms', float('nan')):7.2f} ms  mean batch {r['mean_batch']:5.1f}  "
                          f"server CPU per request {r['engine_cpu_us']:4.0f} + {r['frontends_cpu_us']:4.0f} us "
                          f"(engine process + front ends)  errors {r['errors']}", flush=True)
            finally:
                server.stop()
        if args.engine_bench:
            engine_bench(repo / f"{model}.kiln", rows, dims, args.seconds)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "rows": rows}, indent=1))
    return 0


def engine_bench(path: Path, rows: list[dict], dims: dict[str, list[int]], seconds: float) -> None:
    """`kiln bench` of the served engine at the batch each point formed (rounded mean), beside the point."""
    import kiln
    from kiln.bench import bench
    engine = kiln.load(str(path))
    done: dict[int, dict] = {}
    for r in rows:
        b = max(1, round(r["mean_batch"])) if r["mean_batch"] == r["mean_batch"] else 1
        if b not in done:
            shapes = {n: (b, *d[1:]) if d else () for n, d in dims.items()}
            done[b] = bench(engine, shapes=shapes, duration=seconds)
        res = done[b]
        r.update(engine_batch=b, engine_items_per_s=res["throughput_items_per_s"],
                 engine_median_ms=res["latency_ms"]["median"], vs_engine=r["infer_per_s"] / res["throughput_items_per_s"])
        print(f"{r['protocol']:4} shm {'on' if r['shm'] else 'off':3} batching {r['batching']:3} c={r['concurrency']:3}  {r['infer_per_s']:9.1f} infer/s = "
              f"{100 * r['vs_engine']:5.1f}% of the engine at batch {b} ({res['throughput_items_per_s']:.1f}/s, "
              f"median {res['latency_ms']['median']:.3f} ms); p99 {r.get('p99_ms', float('nan')):.2f} ms", flush=True)


# ---- transport ceiling ------------------------------------------------------------------------
def cmd_echo(args: argparse.Namespace) -> int:
    """A grpc.aio server of the v2 protocol that answers ModelInfer without reading the tensors or running
    anything: what the Python gRPC transport alone allows (a child process of `ceiling`)."""
    import asyncio

    import grpc

    from kiln.serve.proto import grpc_predict_v2_pb2 as pb
    from kiln.serve.proto import grpc_predict_v2_pb2_grpc as pb_grpc
    dims = [int(d) for d in args.dims.split("x")]

    class Echo(pb_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):
            r = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
            r.outputs.add(name="y", datatype="FP32", shape=[1])
            r.raw_output_contents.append(bytes(4))
            return r

        async def ModelMetadata(self, request, context):
            meta = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(name="echo", versions=["1"], platform="echo",
                                            inputs=[meta(name="x", datatype="FP32", shape=[-1, *dims[1:]])],
                                            outputs=[meta(name="y", datatype="FP32", shape=[1])])

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"echo on 127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()
    asyncio.run(serve())
    return 0


def cmd_ceiling(args: argparse.Namespace) -> int:
    """tritonclient gRPC load against the do-nothing server: the ceiling any Python gRPC front end meets."""
    echo = _Echo(args.dims)
    at = echo.at
    try:
        dims = [int(d) for d in args.dims.split("x")]
        for c in (int(v) for v in args.concurrency.split(",")):
            r = run_load("grpc", at, "echo", c, args.seconds, {"x": dims}, args.processes)
            print(f"echo grpc c={c:3} {r['infer_per_s']:9.1f} infer/s  p50 {r['p50_ms']:7.2f}  p99 {r['p99_ms']:7.2f} ms"
                  f"  errors {r['errors']}  ({np.prod(dims) * 4 / 1e3:.0f} KB per request)", flush=True)
    finally:
        echo.stop()
    return 0


# ---- latency at concurrency 1 ----------------------------------------------------------------
STAGES = ("decode", "to_run", "run", "back", "encode", "other")


def cmd_trace_serve(args: argparse.Namespace) -> int:
    """`kiln serve` in this process with each request's stages timed (a child process of `latency`); prints the
    listening line, and on SIGINT one JSON line of per-stage p50 and p99 in microseconds. Times are taken at
    the stage functions' boundaries: decode and encode (the protocol module's functions), to_run (queued
    until the batch's run starts), run (the run, wherever it runs), back (the run's end until the caller
    resumes), other (the rest of the infer handler: lookup, checks, the access log, the protocol layer)."""
    from kiln.serve import batcher, cli, grpc_service, http
    now, last, rows = time.perf_counter, {}, []

    def timed(module, name: str, stage: str) -> None:
        fn = getattr(module, name)

        def wrapper(*a, **k):
            t0 = now()
            try:
                return fn(*a, **k)
            finally:
                last[stage] = now() - t0
        setattr(module, name, wrapper)
    for module, name, stage in ((grpc_service, "decode_grpc", "decode"), (grpc_service, "encode_grpc", "encode"),
                                (http, "decode_http", "decode"), (http, "encode_http", "encode")):
        timed(module, name, stage)
    compute, infer = batcher.Batcher._compute, batcher.Batcher.infer

    def traced_compute(self, instance, batch):
        last["run0"] = now()
        try:
            return compute(self, instance, batch)
        finally:
            last["run1"] = now()

    async def traced_infer(self, *a, **k):
        last["queued"] = now()
        out = await infer(self, *a, **k)
        last["resumed"] = now()
        return out
    batcher.Batcher._compute, batcher.Batcher.infer = traced_compute, traced_infer

    def handler(fn):
        async def wrapper(*a, **k):
            last.clear()
            t0 = now()
            out = await fn(*a, **k)
            total = now() - t0
            if {"decode", "encode", "run0", "queued"} <= last.keys():
                row = {"decode": last["decode"], "to_run": last["run0"] - last["queued"],
                       "run": last["run1"] - last["run0"], "back": last["resumed"] - last["run1"],
                       "encode": last["encode"]}
                rows.append({**row, "other": total - sum(row.values())})
            return out
        return wrapper
    grpc_service.InferenceService.ModelInfer = handler(grpc_service.InferenceService.ModelInfer)
    http.infer = handler(http.infer)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    code = cli.run(parser.parse_args(args.serve_args))
    skip = len(rows) // 10                      # the warm-up's requests
    print(json.dumps({f"p{q}": {k: float(np.percentile([r[k] for r in rows[skip:]], q) * 1e6) if rows[skip:]
                                 else float("nan") for k in STAGES} for q in (50, 99)}), flush=True)
    return code


def _client_cost(protocol: str, at: str, model: str, shapes: dict, queue) -> None:
    """tritonclient's own work per request, without the network: building the request (as infer does) and
    reading the answer (deserializing it, InferResult, as_numpy); puts the medians in microseconds."""
    if protocol == "http":
        import tritonclient.http as tc
        from tritonclient.http._utils import _get_inference_request
        client = tc.InferenceServerClient(at)
        meta = client.get_model_metadata(model)
    else:
        import tritonclient.grpc as tc
        from tritonclient.grpc import service_pb2
        from tritonclient.grpc._utils import _get_inference_request
        client = tc.InferenceServerClient(at)
        meta = client.get_model_metadata(model, as_json=True)
    feeds = _inputs(meta, shapes, np.random.default_rng(0))
    inputs = []
    for t in meta["inputs"]:
        i = tc.InferInput(t["name"], list(feeds[t["name"]].shape), t["datatype"])
        i.set_data_from_numpy(feeds[t["name"]], **({"binary_data": True} if protocol == "http" else {}))
        inputs.append(i)
    outputs = [tc.InferRequestedOutput(t["name"], **({"binary_data": True} if protocol == "http" else {}))
               for t in meta["outputs"]]
    if protocol == "http":
        build = lambda: _get_inference_request(inputs, "", outputs, 0, False, False, 0, None, None)
        body, json_size = build()
        headers = {} if json_size is None else {"Inference-Header-Content-Length": str(json_size)}
        host, port = at.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
        r = conn.getresponse()
        answer, length = r.read(), r.getheader("Inference-Header-Content-Length")
        conn.close()
        parse = lambda: [tc.InferResult.from_response_body(answer, False, int(length) if length else None).as_numpy(
            t["name"]) for t in meta["outputs"]]
    else:
        build = lambda: _get_inference_request(model, inputs, "", "", outputs, 0, False, False, 0, None,
                                               None).SerializeToString()
        answer = client.infer(model, inputs, outputs=outputs).get_response().SerializeToString()
        parse = lambda: [tc.InferResult(service_pb2.ModelInferResponse.FromString(answer)).as_numpy(t["name"])
                         for t in meta["outputs"]]
    out = {}
    for what, fn in (("build", build), ("parse", parse)):
        for _ in range(200):
            fn()
        ts = []
        for _ in range(2000):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[what] = float(np.median(ts) * 1e6)
    client.close()
    queue.put(out)


def _in_child(target, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    out = q.get(timeout=300)
    p.join()
    return out


class _Echo:
    """The do-nothing gRPC server (`echo`) in a child process, for requests carrying an FP32 input of ``dims``."""

    def __init__(self, dims: str) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "echo", "--dims", dims], stdout=subprocess.PIPE)
        self.at = self.proc.stdout.readline().decode().split()[-1]   # "echo on HOST:PORT" once it serves

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def cmd_latency(args: argparse.Namespace) -> int:
    """Where one request's time goes at concurrency 1: end to end (tritonclient, closed loop), the client's own
    work, each server stage (from `_trace-serve`), the engine alone, and the same client against `echo`."""
    if any(f.startswith("--frontends") for f in args.server_flag or []):
        raise SystemExit("latency times the stages inside one server process; run it without --frontends.")
    with _model_repo(args) as (repo, model, shapes):
        rows, dims = [], {}
        points = [(b, p, shm) for b in args.batching.split(",") for p in args.protocols.split(",")
                  for shm in args.shm.split(",")]
        for batching, protocol, shm in points:               # one server per point: its stages are that point's
            flags = [*(args.server_flag or []), *([] if batching == "on" else ["--no-batching"])]
            proc = subprocess.Popen([sys.executable, __file__, "_trace-serve", str(repo), "--http-port", "0",
                                     "--grpc-port", "0", *flags], stdout=subprocess.PIPE,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                m = LINE.search(proc.stdout.readline().decode())
                if not m:
                    raise SystemExit("kiln serve (traced) did not start")
                meta = json.loads(_get(m.group("http"), f"/v2/models/{model}")[1])
                dims = {t["name"]: shapes.get(t["name"]) or [1 if int(d) < 0 else int(d) for d in t["shape"]]
                        for t in meta["inputs"]}
                r = run_load(protocol, m.group(protocol), model, 1, args.seconds, shapes, 1, args.warmup,
                             shm=shm == "on")
                r.update(batching=batching, client_us=_in_child(_client_cost, protocol, m.group(protocol),
                                                                  model, shapes))
            finally:
                proc.send_signal(signal.SIGINT)
                out, _ = proc.communicate(timeout=120)
            r["server_us"] = json.loads(out.decode().strip().splitlines()[-1])
            rows.append(r)
        echo = _Echo("x".join(str(d) for d in next(iter(dims.values()))))
        try:
            ceiling = run_load("grpc", echo.at, "echo", 1, args.seconds, {"x": next(iter(dims.values()))}, 1,
                               args.warmup)
        finally:
            echo.stop()
        import kiln
        from kiln.bench import bench
        engine = bench(kiln.load(str(repo / f"{model}.kiln")), shapes={n: tuple(d) for n, d in dims.items()},
                       duration=args.seconds)["latency_ms"]["median"] * 1e3
    print(f"engine alone (kiln bench, median): {engine:.0f} us; echo gRPC server (no work) at c=1: "
          f"p50 {ceiling['p50_ms'] * 1e3:.0f} us, p99 {ceiling['p99_ms'] * 1e3:.0f} us")
    print("protocol batching shm |  p50 e2e  p99 e2e | client build parse | server    " +
          " ".join(f"{s:>6}" for s in STAGES) + " | unaccounted at p50 (us)")
    for r in rows:
        c, sv = r["client_us"], r["server_us"]
        rest = r["p50_ms"] * 1e3 - c["build"] - c["parse"] - sum(sv["p50"].values())
        for q in ("p50", "p99"):
            head = (f"{r['protocol']:8} {r['batching']:8} {'on' if r['shm'] else 'off':3} | {r['p50_ms'] * 1e3:8.0f} "
                    f"{r['p99_ms'] * 1e3:8.0f} | {c['build']:12.0f} {c['parse']:5.0f} |" if q == "p50" else
                    " " * 22 + "|" + " " * 19 + "|" + " " * 20 + "|")
            print(f"{head} {q:>8} " + " ".join(f"{sv[q][s]:6.0f}" for s in STAGES)
                  + (f" | {rest:8.0f}" if q == "p50" else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"engine_us": engine, "echo": ceiling, "rows": rows}, indent=1))
    return 0


# ---- soak -----------------------------------------------------------------------------------
def _bad_bodies(x: np.ndarray) -> list[tuple[str, str, dict, bytes]]:
    """(what, path, headers, body) of each malformed request kind."""
    good = {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    j = lambda obj: json.dumps(obj).encode()
    return [
        ("bad json", "/v2/models/mlp/infer", {}, b'{"inputs": [{"name": "x", '),
        ("truncated binary", "/v2/models/mlp/infer", {"Inference-Header-Content-Length": str(len(head))},
         head + x.tobytes()[:-4]),
        ("wrong shape", "/v2/models/mlp/infer", {}, j({"inputs": [{**good, "shape": [x.shape[0], 9]}]})),
        ("wrong dtype", "/v2/models/mlp/infer", {}, j({"inputs": [{**good, "datatype": "INT32"}]})),
        ("wrong name", "/v2/models/mlp/infer", {}, j({"inputs": [{**good, "name": "q"}]})),
        ("outside profile", "/v2/models/mlp/infer", {}, j({"inputs": [{**good, "shape": [99, 8],
                                                                       "data": [0.0] * 792}]})),
        ("unknown model", "/v2/models/nope/infer", {}, j({"inputs": [good]})),
        ("oversize", "/v2/models/mlp/infer", {}, b"{" + b" " * (1 << 20) + b"}"),
    ]


def cmd_soak(args: argparse.Namespace) -> int:
    import tritonclient.http as tc
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        (W, b), = build_mlp(Path(tmp), "mlp", (8, 4), 16)
        server = Server(Path(tmp), "--max-request-mb", "1", "--grpc-port", "off", *(args.server_flag or []))
        stats = {"good": 0, "good_ok": 0, "bad": 0, "bad_ok": 0}
        failures: list[str] = []
        lock = threading.Lock()
        counter = iter(range(args.requests))
        rss: dict[str, float] = {}
        warm_at = max(1, args.requests // 10)
        every = max(1, int(round(1 / args.bad_fraction))) if args.bad_fraction > 0 else 0

        def note(kind: str, ok: bool, why: str) -> None:
            with lock:
                stats[kind] += 1
                stats[kind + "_ok"] += ok
                if not ok and len(failures) < 10:
                    failures.append(why)

        def worker(k: int) -> None:
            rng = np.random.default_rng(1000 + k)
            client = tc.InferenceServerClient(server.http, concurrency=1)
            host, port = server.http.rsplit(":", 1)
            for i in counter:
                if i == warm_at:
                    rss["warm"] = server.rss_mb()
                x = rng.standard_normal((1 + i % 4, 8)).astype(np.float32)
                if every and i % every == every - 1:
                    what, path, headers, body = _bad_bodies(x)[(i // every) % 8]
                    try:
                        conn = http.client.HTTPConnection(host, int(port), timeout=60)
                        conn.request("POST", path, body=body, headers=headers)
                        r = conn.getresponse()
                        payload = r.read()
                        conn.close()
                        msg = json.loads(payload).get("error", "") if payload else ""
                        note("bad", 400 <= r.status < 500 and bool(msg), f"{what}: {r.status} {payload[:200]!r}")
                    except Exception as exc:    # noqa: BLE001 - a failure of the soak, reported
                        note("bad", False, f"{what}: {type(exc).__name__}: {exc}")
                    continue
                try:
                    inp = tc.InferInput("x", list(x.shape), "FP32")
                    inp.set_data_from_numpy(x, binary_data=bool(i % 2))
                    y = client.infer("mlp", [inp]).as_numpy("y")
                    x64 = x.astype(np.float64)
                    ref = np.maximum(x64 @ W + b, 0)
                    bound = 4 * (W.shape[0] + 2) * EPS32 * (np.abs(x64) @ np.abs(W) + np.abs(b)) + 1e-30
                    note("good", y.shape == ref.shape and bool(np.all(np.abs(y - ref) <= bound)), f"request {i}: wrong")
                except Exception as exc:        # noqa: BLE001 - a failure of the soak, reported
                    note("good", False, f"request {i}: {type(exc).__name__}: {exc}")
            client.close()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rss["end"] = server.rss_mb()
        ready = _get(server.http, "/v2/health/ready")[0] == 200
        code = server.stop()
    growth = rss["end"] - rss.get("warm", rss["end"])
    verdict = {"requests": args.requests, **stats, "failures": failures, "rss_warm_mb": round(rss.get("warm", 0), 1),
               "rss_end_mb": round(rss["end"], 1), "rss_growth_mb": round(growth, 1), "ready_after": ready,
               "exit_code": code, "seconds": round(time.perf_counter() - t_start, 1)}
    verdict["passed"] = (stats["good_ok"] == stats["good"] and stats["bad_ok"] == stats["bad"] and ready and code == 0
                         and growth < args.rss_limit_mb and stats["good"] + stats["bad"] == args.requests)
    print(json.dumps(verdict, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(verdict, indent=1))
    return 0 if verdict["passed"] else 1


# ---- engine-load: the engine process of --frontends, fed straight through kiln.serve.ipc --------------
def cmd_engine_load(args: argparse.Namespace) -> int:
    """Engine-process CPU per request at each --batches size (see the module docstring)."""
    import asyncio
    widths = tuple(int(w) for w in args.widths.split(","))
    batches = [int(b) for b in args.batches.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="kiln-engine-load-"))
    layers = build_mlp(folder, "m", widths, max(batches), device=args.device)
    x = np.random.default_rng(0).random((1, widths[0]), dtype=np.float32)
    ref, err, mag = x.astype(np.float64), np.zeros((1, widths[0])), np.abs(x.astype(np.float64))
    for W, b in layers:                                     # float64 reference and a float32 rounding bound
        err = err @ np.abs(W) + 4 * (W.shape[0] + 2) * EPS32 * (mag @ np.abs(W) + np.abs(b))
        ref, mag = np.maximum(ref @ W + b, 0), mag @ np.abs(W) + np.abs(b)
    check = {"x": x.tolist(), "ref": ref.tolist(), "bound": (err + 1e-30).tolist()}
    rows = []
    stagings = args.staged.split(",")
    if not set(stagings) <= {"auto", "on", "off"}:
        raise SystemExit(f"--staged takes auto, on and off (comma-separated), got {args.staged!r}.")
    for r in range(args.rounds):
        for b in batches:
            for staged in stagings:                         # side by side: old path and new in one process
                row = asyncio.run(_engine_point(folder, b, check, args, staged))
                rows.append(row)
                print(f"round {r + 1} batch {b:>3} staged {staged:4}: {row['cpu_us']:7.1f} us engine CPU per "
                      f"request, {row['rps']:8.0f} requests/s, mean batch {row['mean_batch']:.1f}, "
                      f"{row['inflight']} in flight", flush=True)
    for b in batches:
        for staged in stagings:
            us = sorted(row["cpu_us"] for row in rows if row["batch"] == b and row["staged"] == staged)
            print(f"batch {b:>3} staged {staged:4}: median {us[len(us) // 2]:.1f} us engine CPU per request over "
                  f"{len(us)} rounds")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


async def _engine_point(folder: Path, batch: int, check: dict, args: argparse.Namespace, staged: str = "auto") -> dict:
    """One measurement: this process is the engine process (kiln.serve.frontends' own loop over one link),
    a child process (``_engine-feed``) is a front end sending one-row requests through the real
    kiln.serve.frontend link code. CPU is this process's (all threads) between the child's two marks."""
    import asyncio
    import cProfile
    import pstats
    import socket
    from kiln.serve import frontends, ipc
    from kiln.serve.model import ModelOptions
    from kiln.serve.server import ServeConfig, load_repository
    preferred = (batch,) if batch > 1 and args.preferred == "on" else ()
    opts = ModelOptions(batching=batch > 1, max_batch=batch, preferred_batch_sizes=preferred,
                        max_queue_delay_us=args.delay_us if batch > 1 else 0, instances=args.instances,
                        buckets=args.buckets)
    from kiln.serve import instance, repository
    flag = {"auto": None, "on": True, "off": False}[staged]
    repository.EngineInstance = lambda engine: instance.EngineInstance(engine, staged=flag)
    repo = await load_repository(ServeConfig(path=str(folder), frontends=2, model=opts))
    inflight = args.inflight or max(16, 2 * batch)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    slab = ipc.Slab()
    marks_r, marks_w = os.pipe()
    spec = {**check, "inflight": inflight, "requests": args.requests, "warmup": args.warmup_requests,
            "slots": slab.slots, "slot_bytes": slab.slot_bytes}
    spec_path = folder / "feed.json"                       # a file: a wide input is too long for a command line
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_engine-feed", str(theirs.fileno()),
                             str(slab.fd), str(marks_w), str(spec_path)],
                            pass_fds=(theirs.fileno(), slab.fd, marks_w), stdout=subprocess.PIPE)
    theirs.close()
    os.close(marks_w)
    loop = asyncio.get_running_loop()
    link = frontends.Link(0, proc, slab, repo, [])
    link.links.append(link)
    link.stopping = True                                   # its exit at the end is expected
    await link.open(ours)
    prof = cProfile.Profile() if args.profile else None
    marks: dict[str, tuple[float, float]] = {}

    def watch() -> None:                                    # the child's "s" and "e": CPU and wall clock now
        for tag in "se":
            if os.read(marks_r, 1) != tag.encode():
                return
            marks[tag] = (time.process_time(), time.perf_counter())
            if prof is not None:
                loop.call_soon_threadsafe(prof.enable if tag == "s" else prof.disable)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    link.channel.send_json(frontends.model_table(repo))
    await frontends._serve(link, loop.create_future())
    out = (await asyncio.to_thread(proc.communicate))[0].decode()
    await asyncio.to_thread(watcher.join)
    os.close(marks_r)
    stats = repo.metrics.model("m").batch_size
    await repo.close()
    slab.close()
    if proc.returncode or set(marks) != {"s", "e"}:
        raise SystemExit(f"the stand-in front end failed (exit {proc.returncode}): {out[-2000:]}")
    cpu, wall = (marks["e"][0] - marks["s"][0]), (marks["e"][1] - marks["s"][1])
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
    return {"batch": batch, "staged": staged, "inflight": inflight, "requests": args.requests,
            "cpu_us": cpu / args.requests * 1e6,
            "rps": args.requests / wall, "mean_batch": stats.total / max(stats.count, 1)}


def cmd_engine_feed(args: argparse.Namespace) -> int:
    """The stand-in front end of engine-load: ``inflight`` coroutines each sending one-row requests through
    kiln.serve.frontend's RemoteBatcher, every answer checked against a float64 reference."""
    import asyncio
    import socket
    from kiln.serve import frontend, ipc
    from kiln.serve.metrics import Metrics
    from kiln.serve.model import ModelOptions
    spec = json.loads(Path(args.spec).read_text())

    async def feed() -> None:
        link = frontend.EngineLink(ipc.Slab(args.slab, spec["slots"], spec["slot_bytes"]))
        core = frontend.FrontendCore(frontend.RemoteRepository(link, ModelOptions()), Metrics(), "off")
        ready = asyncio.Event()
        link.on_message = frontend._handler(link, core, ready)
        await link.open(socket.socket(fileno=args.sock))
        await ready.wait()
        entry = core.repository.get("m", None)
        x, ref, bound = (np.array(spec[k], np.float32 if k == "x" else np.float64) for k in ("x", "ref", "bound"))
        rows, key = entry.model.check_request({"x": x})

        async def worker(left: list[int]) -> None:
            while left[0] > 0:
                left[0] -= 1
                y = (await entry.batcher.infer({"x": x}, rows, key, 60.0))["y"]
                if y.shape != ref.shape or not np.all(np.abs(y - ref) <= bound):
                    raise SystemExit(f"a wrong answer: {y} (float64 reference {ref})")

        for tag, n in (("", spec["warmup"]), ("s", spec["requests"])):
            if tag:
                os.write(args.marks, tag.encode())
            left = [n]
            await asyncio.gather(*(worker(left) for _ in range(spec["inflight"])))
        os.write(args.marks, b"e")

    asyncio.run(feed())
    return 0


# ---- GPU models ------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    """The zoo's ResNet-50 / BERT-base (benchmarks/harness.py: seeded random weights) as engines with a
    dynamic batch 1..--max-batch, into --out, ready for `sweep --repo`."""
    import kiln
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import harness
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.names.split(","):
        _, _, in_names, _, _, example, onnx_path, _ = harness.export_model(name, str(out))
        profiles = {n: ((1, *t.shape[1:]), (max(1, args.max_batch // 2), *t.shape[1:]), (args.max_batch, *t.shape[1:]))
                    for n, t in zip(in_names, example)}
        config = kiln.BuildConfig(precision=args.precision, device=args.device, profiles=profiles)
        kiln.build(kiln.onnx.parse(onnx_path), config).save(str(out / f"{name}.kiln"))
        os.remove(onnx_path)
        print(f"{out / name}.kiln: {args.precision}, inputs " +
              ", ".join(f"{n} {list(t.shape[1:])}" for n, t in zip(in_names, example)), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--repo")
    s.add_argument("--model")
    s.add_argument("--widths", default="256,256,64", help="layer widths of the CPU MLP built when no --repo")
    s.add_argument("--protocols", default="http,grpc")
    s.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    s.add_argument("--seconds", type=float, default=5.0)
    s.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring, per point")
    s.add_argument("--batching", default="on,off")
    s.add_argument("--shm", default="off", help="off, on or off,on: clients put tensors in system shared memory")
    s.add_argument("--shape", action="append", help="NAME:DIMS (e.g. input_ids:1x128) for an input's -1 dims")
    s.add_argument("--processes", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    s.add_argument("--server-flag", action="append", help="extra kiln serve flag, e.g. --server-flag=--instances=2")
    s.add_argument("--engine-bench", action="store_true",
                   help="also time the served engine (kiln bench) at the batch each point formed, for comparison")
    s.add_argument("--json")
    k = sub.add_parser("soak")
    k.add_argument("--requests", type=int, default=50_000)
    k.add_argument("--bad-fraction", type=float, default=0.1)
    k.add_argument("--concurrency", type=int, default=8)
    k.add_argument("--rss-limit-mb", type=float, default=50.0)
    k.add_argument("--server-flag", action="append")
    k.add_argument("--json")
    c = sub.add_parser("ceiling", help="the same load against a gRPC server that does no work")
    c.add_argument("--dims", default="1x3x224x224", help="the FP32 input each request carries")
    c.add_argument("--concurrency", default="1,16,64")
    c.add_argument("--seconds", type=float, default=4.0)
    c.add_argument("--processes", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    lt = sub.add_parser("latency", help="where one request's time goes at concurrency 1")
    lt.add_argument("--repo")
    lt.add_argument("--model")
    lt.add_argument("--widths", default="256,256,64", help="layer widths of the CPU MLP built when no --repo")
    lt.add_argument("--protocols", default="grpc,http")
    lt.add_argument("--batching", default="on,off")
    lt.add_argument("--shm", default="off", help="off, on or off,on: the client's tensors in system shared memory")
    lt.add_argument("--seconds", type=float, default=4.0)
    lt.add_argument("--warmup", type=float, default=1.0)
    lt.add_argument("--shape", action="append", help="NAME:DIMS (e.g. input_ids:1x128) for an input's -1 dims")
    lt.add_argument("--server-flag", action="append", help="extra kiln serve flag, e.g. --server-flag=--warmup")
    lt.add_argument("--json")
    t = sub.add_parser("_trace-serve", help=argparse.SUPPRESS)
    t.add_argument("serve_args", nargs=argparse.REMAINDER)
    e = sub.add_parser("echo", help=argparse.SUPPRESS)
    e.add_argument("--dims", required=True)
    g = sub.add_parser("models")
    g.add_argument("--out", required=True)
    g.add_argument("--names", default="resnet50,bert_base")
    g.add_argument("--precision", default="fp16")
    g.add_argument("--device", default="cuda")
    g.add_argument("--max-batch", type=int, default=64)
    el = sub.add_parser("engine-load", help="engine-process CPU per request, fed through the IPC protocol")
    el.add_argument("--widths", default="8,4", help="layer widths of the CPU MLP built here")
    el.add_argument("--batches", default="1,8,32", help="batch sizes for the batcher to form")
    el.add_argument("--requests", type=int, default=5000)
    el.add_argument("--warmup-requests", type=int, default=500)
    el.add_argument("--inflight", type=int, default=0, help="requests in flight (default: max(16, 2 x batch))")
    el.add_argument("--delay-us", type=int, default=20000, help="--max-queue-delay-us for batches above 1")
    el.add_argument("--preferred", choices=("on", "off"), default="on",
                    help="off: no preferred batch size, so batches form from what is queued (with --delay-us 0: "
                         "whatever is queued when an instance is free)")
    el.add_argument("--buckets", choices=("auto", "on", "off"), default="auto", help="--batch-buckets")
    el.add_argument("--instances", type=int, default=1, help="--instances")
    el.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the device the MLP is built for")
    el.add_argument("--staged", default="auto",
                    help="batch buffers: on = pinned host and fixed device buffers (kiln.serve.instance's staged "
                         "path), off = host buffers and ExecutionContext.run, auto = on for a CUDA engine; "
                         "several (on,off) run side by side at each point")
    el.add_argument("--rounds", type=int, default=1)
    el.add_argument("--profile", type=int, default=0, help="cProfile the engine process: print this many rows")
    el.add_argument("--json")
    ef = sub.add_parser("_engine-feed", help=argparse.SUPPRESS)
    ef.add_argument("sock", type=int)
    ef.add_argument("slab", type=int)
    ef.add_argument("marks", type=int)
    ef.add_argument("spec", help="a JSON file: the reference check and the load to send")
    args = p.parse_args(argv)
    return {"sweep": cmd_sweep, "soak": cmd_soak, "models": cmd_models, "ceiling": cmd_ceiling,
            "echo": cmd_echo, "latency": cmd_latency, "_trace-serve": cmd_trace_serve,
            "engine-load": cmd_engine_load, "_engine-feed": cmd_engine_feed}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
