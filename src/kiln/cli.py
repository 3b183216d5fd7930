"""The `kiln` command: thin wrappers over the Python API.

Heavy modules are imported inside each command, so `kiln --help` is instant and
a missing optional dependency breaks only the command that needs it. A user
error (any KilnError) prints one line and exits 2; anything else is a bug and
shows its traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Sequence

from kiln.cli_args import (Parser, check_output_dir, check_output_file, number, parse_inputs, parse_shapes,
                           plugin_flag, profiles_from_args, quote, shape_flags, warn)
from kiln.errors import KilnError


# ---- small helpers ------------------------------------------------------------------------
class Progress:
    """A one-line progress bar on stderr (plain lines when not a terminal)."""

    STAGES = ("parse", "passes", "tactics", "serialize")
    open_line = False          # a bar is drawn without its newline (an error message must start below it)

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = None

    def __call__(self, stage: str, frac: float = 0.0) -> None:
        if not self.enabled:
            return
        i = self.STAGES.index(stage) if stage in self.STAGES else 0
        done = (i + min(max(frac, 0.0), 1.0)) / len(self.STAGES)
        width = 24
        bar = "#" * int(done * width) + "-" * (width - int(done * width))
        line = f"[{bar}] {stage:<9} {time.perf_counter() - self.t0:6.1f}s"
        if self.tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
            Progress.open_line = True
        elif stage != self.last:
            sys.stderr.write(line + "\n")
        self.last = stage

    def done(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            Progress.open_line = False


def _load_plugins(paths: Sequence[str] | None) -> None:
    if paths:
        from kiln.plugins import load
        for p in paths:
            load(p)


def _summary(name: str, arr) -> str:
    import numpy as np
    a = np.asarray(arr)
    head = f"{name}: {a.dtype} {list(a.shape)}"
    if a.size == 0:
        return head + " (empty)"
    if a.dtype.kind == "c":                    # complex outputs (DFT/STFT): summarize the magnitudes
        a = np.abs(a)
        head += " |z|"
    if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
        f = a.astype(np.float64)
        fin = f[np.isfinite(f)]
        stats = (f" min {fin.min():.6g} max {fin.max():.6g} mean {fin.mean():.6g} std {fin.std():.6g}"
                 if fin.size else "")
        bad = int(f.size - fin.size)
        return head + stats + (f" non-finite {bad}" if bad else "")
    if a.dtype.kind in "iub":
        return head + f" min {a.min()} max {a.max()}"
    return head


# ---- commands ---------------------------------------------------------------------------
def cmd_build(args) -> int:
    check_output_file(args.output, "-o", keep=[args.model, args.timing_cache or ""])
    profiles = profiles_from_args(args)
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "tf32" if args.tf32 else "fp32"
    workspace = max(1, int(args.workspace * (1 << 20))) if args.workspace is not None else None
    import kiln
    config = kiln.BuildConfig(precision=precision, device=args.device, profiles=profiles, workspace=workspace,
                              optimization_level=args.opt_level, timing_cache=args.timing_cache,
                              fp32_layers=args.fp32_layers or (), fallback=args.fallback)
    note = config.precision_note(config.resolved_device())
    _load_plugins(args.plugins)
    progress = Progress(not args.quiet)
    progress("parse", 0.0)
    network = kiln.onnx.parse(args.model, fallback=args.fallback)
    engine = kiln.build(network, config, progress=progress)
    progress("serialize", 0.0)
    engine.header.setdefault("build", {})["command"] = "kiln " + " ".join(
        quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["build"] else None
    try:
        engine.save(args.output)
    except OSError as exc:
        raise KilnError(f"Cannot write the engine to {args.output!r} ({exc.strerror or exc}); check the disk and "
                        f"the path.") from None
    progress("serialize", 1.0)
    progress.done()
    if note:
        warn(f"--{precision}: {note}")
    size = os.path.getsize(args.output)
    print(f"Built {args.output} ({size / 1e6:.1f} MB): {len(engine.layers)} layers, {precision}, "
          f"{engine.header['device']['name']} ({engine.device}), {time.perf_counter() - progress.t0:.1f} s")
    return 0


def cmd_run(args) -> int:
    import numpy as np

    import kiln
    inputs = parse_inputs(args.input)
    shapes = parse_shapes(args.shapes, "--shapes")
    if args.output_dir:
        check_output_dir(args.output_dir, "--output-dir")
    _load_plugins(args.plugins)
    engine = kiln.load(args.engine)
    feeds = {}
    for name, path in inputs.items():
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise KilnError(f"Cannot read {path!r} for input {name!r}: {exc}; save it with numpy.save.") from None
    rng = np.random.default_rng(args.seed)
    for spec in engine.inputs:
        if spec["name"] in feeds:
            continue
        shape = shapes[spec["name"]] if spec["name"] in shapes else _default_shape(engine, spec)
        feeds[spec["name"]] = _random(rng, spec["dtype"], shape)
        print(f"random input {_summary(spec['name'], feeds[spec['name']])}")
    ctx = engine.context()
    t0 = time.perf_counter()
    outputs = ctx.run(feeds)
    ms = (time.perf_counter() - t0) * 1e3
    for name, value in outputs.items():
        print(_summary(name, value))
    if args.output_dir:
        for name, value in outputs.items():
            safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
            try:
                np.save(os.path.join(args.output_dir, f"{safe}.npy"), np.asarray(value))
            except OSError as exc:
                raise KilnError(f"Cannot write output {name!r} to {args.output_dir!r} ({exc.strerror or exc}).") \
                    from None
        print(f"wrote {len(outputs)} outputs to {args.output_dir}")
    print(f"first run {ms:.2f} ms on {engine.header['device']['name']}")
    return 0


def _default_shape(engine, spec) -> tuple[int, ...]:
    for p in engine.profiles:
        if spec["name"] in p:
            return tuple(p[spec["name"]]["opt"])
    dims = spec["shape"] or []
    if any(not isinstance(d, int) for d in dims):
        raise KilnError(f"Input {spec['name']!r} has dynamic shape {dims}; give --shapes {spec['name']}:DIMS.")
    return tuple(dims)


def _random(rng, dtype: str, shape):
    """A seeded random array of ``dtype`` and ``shape`` (an ndarray also for shape ())."""
    import numpy as np

    from kiln.errors import KilnError
    from kiln.ir.dtypes import np_dtype
    need = math.prod(shape) * 8                 # the generator's float64/int64 draw
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        free = None
    if free is not None and need > free:
        raise KilnError(f"A random input of shape {tuple(shape)} needs {need / 2**30:.1f} GiB, more than the "
                        f"{free / 2**30:.1f} GiB of free memory; give smaller --shapes or the data with --input.")
    try:
        if dtype == "bool":
            return np.asarray(rng.random(shape) > 0.5)
        if dtype.startswith(("int", "uint")):
            return np.asarray(rng.integers(0, 16, size=shape)).astype(np_dtype(dtype))
        return np.asarray(rng.standard_normal(shape)).astype(np_dtype(dtype))
    except MemoryError:
        raise KilnError(f"A random input of shape {tuple(shape)} ({need / 2**30:.1f} GiB) could not be allocated; "
                        f"give smaller --shapes or the data with --input.") from None


def _as_text(v):
    """``v`` with every bytes value (a name that is not UTF-8) as text with \\x escapes."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    if isinstance(v, dict):
        return {_as_text(k): _as_text(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return type(v)(_as_text(x) for x in v)
    return v


def _inspect_onnx(path: str, as_json: bool) -> int:
    """An ONNX model's inputs, outputs and every node (name, op, inputs → outputs): the names that
    ``--fp32-layers`` patterns and ``kiln compare --per-layer`` refer to."""
    import onnx

    from kiln.errors import ParseError
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise ParseError(f"{path!r} is neither a Kiln engine nor a readable ONNX model "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}).") from None

    def value_desc(v):
        t = v.type.tensor_type
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "?"
        except (KeyError, ValueError):      # a type number ONNX does not define: shown, not trusted
            dtype = f"unknown type {t.elem_type}"
        return {"name": v.name, "dtype": dtype, "shape": dims}
    inits = {i.name for i in proto.graph.initializer}
    info = {"opsets": {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import},
            "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
            "inputs": [value_desc(v) for v in proto.graph.input if v.name not in inits],
            "outputs": [value_desc(v) for v in proto.graph.output],
            "initializers": len(inits),
            "nodes": [{"name": n.name, "op": n.op_type, "domain": n.domain or "ai.onnx", "inputs": list(n.input),
                       "outputs": list(n.output)} for n in proto.graph.node]}
    info, inits = _as_text(info), _as_text(inits)     # protobuf hands invalid UTF-8 over as bytes
    if as_json:
        print(json.dumps(info, indent=1))
        return 0
    ops = ", ".join(f"{d} {v}" for d, v in info["opsets"].items())
    print(f"Model {path}: opsets {ops}; producer {info['producer'] or '-'}; {len(info['nodes'])} nodes, "
          f"{info['initializers']} initializers")
    for title, key in (("Inputs: ", "inputs"), ("Outputs:", "outputs")):
        print(title, ", ".join(f"{v['name']}:{v['dtype']}{v['shape']}" for v in info[key]))
    print(f"Nodes ({len(info['nodes'])}):")
    for i, n in enumerate(info["nodes"]):
        ins = ", ".join(x for x in n["inputs"] if x and x not in inits)
        print(f"  {i:4d} {n['name'] or '(unnamed)'}  [{n['op']}]  {ins or '-'} -> {', '.join(n['outputs'])}")
    return 0


def cmd_inspect(args) -> int:
    from kiln.engine import read_header
    from kiln.engine.format import MAGIC
    if os.path.isfile(args.engine) and not args.engine.endswith(".kiln"):
        with open(args.engine, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                return _inspect_onnx(args.engine, args.json)
    header = read_header(args.engine)
    if args.json:
        slim = {k: v for k, v in header.items() if k != "plan"}
        print(json.dumps(slim, indent=1, default=str))
        return 0
    dev = header["device"]
    print(f"Engine {args.engine}: {header.get('name')}  precision {header.get('precision')}  "
          f"format v{header['format_version']}  kiln {dev.get('kiln')}")
    cc = f" (compute capability {dev['compute_capability']})" if dev.get("compute_capability") else ""
    print(f"Device: {dev['kind']} {dev['name']}{cc}, {dev['arch']}, torch {dev.get('torch')}, "
          f"CUDA {dev.get('cuda') or '-'}, cuDNN {dev.get('cudnn') or '-'}")
    mem = header.get("memory")
    if mem:
        print(f"Memory: weights {mem.get('weights_bytes', 0) / 1e6:.1f} MB, peak activations "
              f"{mem.get('peak_activation_bytes', 0) / 1e6:.1f} MB at the largest profile shape")
    for i, p in enumerate(header.get("profiles", [])):
        for n, r in p.items():
            print(f"Profile {i}: {n} min {r['min']} opt {r['opt']} max {r['max']}")
    fp32 = header.get("build", {}).get("fp32_layers")
    if fp32:
        print(f"FP32 layers (--fp32-layers): {', '.join(fp32)}")
    tensors = header.get("tensors", {})

    def desc(names):
        out = []
        for n in names:
            if n is None:
                continue
            t = tensors.get(n, {})
            shape = "x".join("?" if d is None else str(d) for d in (t.get("shape") or []))
            out.append(f"{n}:{t.get('dtype', '?')}[{shape}]")
        return ", ".join(out)
    print("Inputs:  " + ", ".join(f"{t['name']}:{t['dtype']}{t['shape']}" for t in header["inputs"]))
    print("Outputs: " + ", ".join(f"{t['name']}:{t['dtype']}{t['shape']}" for t in header["outputs"]))
    print(f"Layers ({len(header['layers'])}):")
    for i, layer in enumerate(header["layers"]):
        origin = ", ".join(layer.get("origin") or []) or "-"
        print(f"  {i:4d} {layer['name']}  [{layer['kind']}]  {layer.get('precision') or '-'}  "
              f"tactic {_tactic_name(layer)}{'  (host)' if layer.get('host') else ''}")
        print(f"       in:  {desc(layer['inputs'])}")
        print(f"       out: {desc(layer['outputs'])}")
        print(f"       from: {origin}")
    if header.get("plugins"):
        print("Plugins: " + ", ".join(f"{p.get('namespace') + '::' if p.get('namespace') else ''}{p['name']} "
                                       f"v{p['version']}" for p in header["plugins"]))
    return 0


def _tactic_name(layer: dict) -> str:
    if layer["kind"] == "Plugin":
        rec = (layer.get("attrs") or {}).get("plugin", {}).get("__plugin__", {})
        chosen = (layer.get("attrs") or {}).get("plugin_tactic")
        return f"{rec.get('name', 'plugin')}:{chosen or 'default'}"
    if layer["kind"] == "OrtIsland":      # nodes that fall back to ONNX Runtime (--fallback onnxruntime)
        return f"onnxruntime ({', '.join(dict.fromkeys(layer['attrs']['ops']))})"
    return layer.get("tactic") or "-"


def cmd_check(args) -> int:
    import kiln
    _load_plugins(args.plugins)
    problems = kiln.onnx.check(args.model, fallback=args.fallback)
    blocking = [p for p in problems if not p.get("fallback")]
    if args.json:
        print(json.dumps(problems, indent=1))
        return 1 if blocking else 0
    if not problems:
        print(f"{args.model}: every node is supported.")
        return 0
    print(f"{args.model}: {len(problems)} unsupported node(s):")
    for p in problems:
        why = "falls back to ONNX Runtime" if p.get("fallback") else "; ".join(
            r.rstrip(".") for r in (p.get("reason"), p.get("fallback_reason") and
                                    f"cannot fall back to ONNX Runtime: {p['fallback_reason']}") if r)
        print(f"  {p['name']}  op {p['op_type']}  domain {p.get('domain') or 'ai.onnx'}  opset {p['opset']}"
              + (f"  ({why})" if why else ""))
    if not blocking:
        print(f"All {len(problems)} run as ONNX Runtime islands (on the CPU) with kiln build --fallback onnxruntime.")
        return 0
    print("Supply a plugin for each (kiln.Plugin subclass, registered) and pass --plugins file.py"
          + (", or build with --fallback onnxruntime to run them in ONNX Runtime." if not args.fallback else "."))
    return 1


def cmd_plugins(args) -> int:
    from kiln.plugins import describe_fields, load_builtins, registry
    load_builtins()
    _load_plugins(args.plugins)
    items = registry.list()
    if args.json:
        print(json.dumps([{"name": c.name, "namespace": c.namespace, "version": c.version, "source": src,
                           "fields": describe_fields(c), "tactics": c.tactics} for c, src in items], indent=1))
        return 0
    if not items:
        print("No plugins registered.")
        return 0
    for cls, src in items:
        ns = f"{cls.namespace}::" if cls.namespace else ""
        print(f"{ns}{cls.name} v{cls.version}   from {src}")
        tac = ", ".join(f"{d}: {'/'.join(t)}" for d, t in cls.tactics.items())
        print(f"    tactics: {tac}")
        for f in describe_fields(cls):
            default = "required" if f["required"] else f"default {f['default']!r}"
            choices = f" one of {f['choices']}" if f["choices"] else ""
            print(f"    {f['name']}: {f['type']} ({default}){choices}")
    return 0


def cmd_demo(args) -> int:
    from kiln.demo import run_demo
    check_output_dir(args.output_dir, "--output-dir")
    return run_demo(device=args.device, precision="fp16" if args.fp16 else "fp32", out_dir=args.output_dir)


def cmd_compare(args) -> int:
    from kiln.comparison import compare
    inputs = parse_inputs(args.input)
    shapes = parse_shapes(args.shapes, "--shapes")
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    per_layer = args.per_layer or bool(args.save_errors)
    errors_out = args.save_errors or os.path.splitext(os.path.basename(args.model))[0] + ".errors.json"
    if per_layer:
        check_output_file(errors_out, "--save-errors", keep=[args.model])
    if args.reduce and args.reduce_output:
        check_output_file(args.reduce_output, "--reduce-output", keep=[args.model])
    _load_plugins(args.plugins)
    progress = (lambda msg: print(f"  reduce: {msg}", file=sys.stderr)) if args.verbose else None
    result = compare(args.model, precision=precision, device=args.device, engine=args.engine, inputs=inputs,
                     data=args.data, shapes=shapes, atol=args.atol, rtol=args.rtol,
                     check_error_stat=args.check_error_stat, per_layer=per_layer, growth=args.growth,
                     reduce=args.reduce, reduce_output=args.reduce_output, seed=args.seed,
                     log=progress, fp32_layers=args.fp32_layers or ())
    if args.engine is None:
        import kiln
        note = kiln.BuildConfig(precision=precision).precision_note(result.device)
        if note:
            warn(f"--{precision}: {note}")
    print(result.report(histogram=not args.no_histogram))
    if per_layer:
        result.save_errors(errors_out)
        print(f"wrote per-layer errors to {errors_out}; see them on the graph: kiln view {quote(args.model)} "
              f"--errors {quote(errors_out)}")
    if result.reduced is not None:
        print("reproduce: " + reproduce_command(args, result))
    return 0 if result.passed else 1


def reproduce_command(args, result) -> str:
    """The `kiln compare` command that checks the reduced model as this run checked the full one:
    its saved inputs, the same precision, device, tolerances, error statistic, FP32 layers and plugins."""
    data = os.path.splitext(result.reduced_path)[0] + "-data"
    parts = ["kiln", "compare", result.reduced_path, "--data", data, "--device", result.device]
    if result.precision in ("fp16", "bf16"):
        parts.append(f"--{result.precision}")
    parts += ["--atol", repr(float(result.atol)), "--rtol", repr(float(result.rtol)),
              "--check-error-stat", result.check_error_stat]
    if args.fp32_layers:
        parts += ["--fp32-layers", args.fp32_layers]
    for plugin in args.plugins or ():
        parts += ["--plugins", plugin]
    return " ".join(quote(p) for p in parts)


# ---- parser -----------------------------------------------------------------------------
def fallback_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fallback", choices=("onnxruntime",),
                   help="run nodes Kiln has no converter or plugin for in ONNX Runtime (CPU) islands")


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="kiln", description="Build fast, device-specific inference engines from ONNX models, run them, "
                                 "benchmark them and look inside them.")
    from kiln import __version__
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("build", help="parse an ONNX model and build an engine file for this device",
                       description="Parse MODEL, optimize it for the target device and write an engine file.")
    p.add_argument("model", help="the .onnx model (external data files beside it are read too)")
    p.add_argument("-o", "--output", required=True, help="engine file to write (.kiln)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fp16", action="store_true", help="FP16 compute (accumulation, softmax and norms in FP32)")
    g.add_argument("--bf16", action="store_true", help="BF16 compute (accumulation, softmax and norms in FP32)")
    g.add_argument("--tf32", action="store_true", help="FP32 tensors with TF32 matrix math on the GPU")
    p.add_argument("--device", choices=("cpu", "cuda"), help="target device (default: cuda when available)")
    shape_flags(p, profile=True, help="static input shapes")
    p.add_argument("--workspace", type=number(float, 0, above=True), metavar="MB",
                   help="memory limit for activations and scratch, in MB")
    p.add_argument("--opt-level", type=number(int, 0, 5), default=3, metavar="0-5",
                   help="0: first valid tactic per layer; 3 (default): time likely candidates; 5: time everything")
    p.add_argument("--timing-cache", metavar="FILE",
                   help="read and update measured tactic timings in FILE (created when missing; a file that is not "
                        "a Kiln timing cache is refused, never overwritten)")
    p.add_argument("--fp32-layers", metavar="PATTERN[,..]",
                   help="with --fp16/--bf16: keep the layers whose ONNX node names match these fnmatch patterns in "
                        "FP32 (weights too), e.g. '/conv1/*,/layer1/*'")
    plugin_flag(p)
    fallback_flag(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("run", help="run an engine once on given or random inputs and summarize each output",
                       description="Run ENGINE once. Inputs come from .npy files or are random (seeded).")
    p.add_argument("engine", help="the .kiln engine file")
    p.add_argument("--input", action="append", metavar="NAME=FILE.npy", help="an input from a .npy file (repeatable)")
    shape_flags(p, help="shapes for random inputs (default: profile opt)")
    p.add_argument("--output-dir", metavar="DIR", help="save each output as DIR/<name>.npy")
    p.add_argument("--seed", type=number(int, 0), default=0, help="seed for random inputs")
    plugin_flag(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="show an engine's device, profiles and layers (or an ONNX model's nodes)",
                       description="Show ENGINE's device fingerprint, profiles, memory and every layer: kind, shapes, "
                                   "dtypes, precision, tactic and the ONNX nodes it came from. Given an .onnx "
                                   "model instead: its inputs, outputs and every node's name and op (the names "
                                   "--fp32-layers patterns match).")
    p.add_argument("engine", help="the .kiln engine file, or an .onnx model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("check", help="list every ONNX node Kiln cannot build, before building",
                       description="Check MODEL for unsupported nodes (name, op, domain, opset). Exit 1 if any "
                                   "(with --fallback onnxruntime: any that ONNX Runtime cannot run either).")
    p.add_argument("model", help="the .onnx model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    plugin_flag(p)
    fallback_flag(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("plugins", help="list registered plugins with their fields and origin",
                       description="List every registered plugin: name, namespace, version, fields, tactics and "
                                   "where it came from (built-in, file, entry point).")
    plugin_flag(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("compare",
                       help="run a model with Kiln and ONNX Runtime on the same inputs; find where they differ",
                       description="Build (or load --engine) and run MODEL with Kiln and with ONNX Runtime (CPU, the "
                                   "reference) on the same inputs. Per output: shape, max/mean absolute and relative "
                                   "error, pass/fail and an error histogram. A tensor passes when "
                                   "STAT(|kiln-ref|) <= atol + rtol*STAT(|ref|). Exit 0 when all pass, 1 when any "
                                   "fails, 2 on a usage error.")
    p.add_argument("model", help="the .onnx model")
    p.add_argument("--engine", help="use this built engine instead of building one")
    p.add_argument("--device", choices=("cpu", "cuda"), help="device to build for (default: cuda when available)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fp16", action="store_true", help="build in FP16")
    g.add_argument("--bf16", action="store_true", help="build in BF16")
    p.add_argument("--fp32-layers", metavar="PATTERN[,..]",
                   help="with --fp16/--bf16: keep the layers whose ONNX node names match these fnmatch patterns in "
                        "FP32 (weights too), e.g. '/conv1/*,/layer1/*'")
    shape_flags(p, help="shapes of random inputs with dynamic dims")
    p.add_argument("--input", action="append", metavar="NAME=FILE.npy", help="an input from a .npy file (repeatable)")
    p.add_argument("--data", metavar="DIR|FILE.npz", help="inputs from a folder of NAME.npy (or input_N.pb) files")
    p.add_argument("--seed", type=number(int, 0), default=0, help="seed for random inputs (default 0)")
    p.add_argument("--atol", type=number(float, 0), default=None,
                   help="absolute tolerance (default: fp32 1e-5, fp16 1e-2, bf16 5e-2)")
    p.add_argument("--rtol", type=number(float, 0), default=None,
                   help="relative tolerance (default: fp32 1e-4, fp16 1e-2, bf16 5e-2)")
    p.add_argument("--check-error-stat", choices=("max", "mean", "median"), default="max",
                   help="the error statistic checked against the tolerances (default max)")
    p.add_argument("--per-layer", action="store_true",
                   help="compare every intermediate tensor too and name the first layer whose error jumps")
    p.add_argument("--growth", type=number(float, 0, above=True), default=10.0, metavar="X",
                   help="a layer 'jumps' when its error is X times its inputs' (default 10)")
    p.add_argument("--save-errors", metavar="FILE.json",
                   help="where --per-layer writes the errors for kiln view --errors (default MODEL.errors.json)")
    p.add_argument("--reduce", action="store_true",
                   help="shrink a failing model to the smallest subgraph that still fails and save it")
    p.add_argument("--reduce-output", metavar="FILE.onnx", help="where --reduce saves (default MODEL.reduced.onnx)")
    p.add_argument("--no-histogram", action="store_true", help="leave out the error histograms")
    p.add_argument("-v", "--verbose", action="store_true", help="log each --reduce step")
    plugin_flag(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="build and run a small built-in example model end to end",
                       description="Create a small ONNX model, build it, save and reload the engine, run it, check it "
                                   "against ONNX Runtime when installed, and print timing and the engine's layers.")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--fp16", action="store_true", help="build in FP16")
    p.add_argument("--output-dir", default=".", help="where to write demo.onnx and demo.kiln (default: .)")
    p.set_defaults(func=cmd_demo)

    try:
        from kiln.bench import add_parser as add_bench
        add_bench(sub)
    except ImportError:
        pass
    try:
        from kiln.viewer.command import add_parser as add_view
        add_view(sub)
    except ImportError:
        pass
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = make_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        try:
            code = int(args.func(args) or 0)
        except KilnError as exc:
            if Progress.open_line:
                sys.stderr.write("\n")
            msg = " ".join(str(exc).split())
            print(f"kiln: error: {msg}", file=sys.stderr)
            return 2
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except SystemExit:                   # --help, --version and usage errors exit through argparse
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _stdout_to_devnull()
        raise
    except BrokenPipeError:              # the reader went away (`kiln plugins | head -1`): stop quietly
        _stdout_to_devnull()
        return 1


def _stdout_to_devnull() -> None:
    """Output still buffered would fail again at exit, so stdout now points at devnull (the Python docs'
    recipe for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, ValueError, OSError):      # stdout replaced by an object without a descriptor
        sys.stdout = os.fdopen(devnull, "w")


if __name__ == "__main__":
    sys.exit(main())
