"""`kiln inspect`: an engine's device, profiles, memory and layers, or an ONNX model's nodes."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from kiln.cli.base import Json, Tool, register


@register
class Inspect(Tool):
    name = "inspect"
    help = "show an engine's device, profiles and layers (or an ONNX model's nodes)"
    description = ("Show ENGINE's device fingerprint, profiles, memory and every layer: kind, shapes, dtypes, "
                   "precision, tactic and the ONNX nodes it came from. Given an .onnx model instead: its inputs, "
                   "outputs and every node's name and op (the names --fp32-layers patterns match).")
    groups = (Json(),)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("engine", help="the .kiln engine file, or an .onnx model")

    def run(self, args: argparse.Namespace) -> int:
        from kiln.engine import read_header
        from kiln.engine.format import MAGIC
        if os.path.isfile(args.engine) and not args.engine.endswith(".kiln"):
            with open(args.engine, "rb") as f:
                if f.read(len(MAGIC)) != MAGIC:
                    return inspect_onnx(args.engine, args.json)
        header = read_header(args.engine)
        notes, summary = _quant_notes(args.engine, header)
        if args.json:
            slim = {k: v for k, v in header.items() if k != "plan"}
            slim["layers"] = [dict(layer, scales=n) if n else layer for layer, n in zip(header["layers"], notes)]
            print(json.dumps(slim, indent=1, default=str))
            return 0
        _print_engine(args.engine, header, notes, summary)
        return 0


def _quant_notes(path: str, header: dict[str, Any]) -> tuple[list[str | None], str | None]:
    """Each layer's 8-bit scales (kiln.engine.quant_record); the engine's weights are read only when it has
    Q/DQ layers."""
    from kiln.engine.quant_record import engine_notes
    weights = {}
    if any(layer["kind"] in ("QuantizeLinear", "DequantizeLinear") for layer in header["layers"]):
        from kiln.engine import read_engine
        _, weights = read_engine(path, verify_weights=False)
    return engine_notes(header, weights)


def _print_engine(path: str, header: dict[str, Any], notes: list[str | None], summary: str | None) -> None:
    """The engine header as text: device, memory, profiles, then each layer (with its 8-bit scales, ``notes``)."""
    dev = header["device"]
    print(f"Engine {path}: {header.get('name')}  precision {header.get('precision')}  "
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
    if summary:
        print(summary)
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
        if notes[i]:
            print(f"       {notes[i]}")
    if header.get("plugins"):
        print("Plugins: " + ", ".join(f"{p.get('namespace') + '::' if p.get('namespace') else ''}{p['name']} "
                                       f"v{p['version']}" for p in header["plugins"]))


def _tactic_name(layer: dict[str, Any]) -> str:
    if layer["kind"] == "Plugin":
        rec = (layer.get("attrs") or {}).get("plugin", {}).get("__plugin__", {})
        chosen = (layer.get("attrs") or {}).get("plugin_tactic")
        return f"{rec.get('name', 'plugin')}:{chosen or 'default'}"
    if layer["kind"] == "OrtIsland":      # nodes that fall back to ONNX Runtime (--fallback onnxruntime)
        return f"onnxruntime ({', '.join(dict.fromkeys(layer['attrs']['ops']))})"
    per_bucket = layer.get("bucket_tactics")
    if per_bucket:           # a range engine: the tactic of each shape bucket, in the header's bucket order
        return f"{layer.get('tactic') or '-'} (per bucket: {', '.join(per_bucket)})"
    return layer.get("tactic") or "-"


def _as_text(v: Any) -> Any:
    """``v`` with every bytes value (a name that is not UTF-8) as text with \\x escapes."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    if isinstance(v, dict):
        return {_as_text(k): _as_text(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return type(v)(_as_text(x) for x in v)
    return v


def inspect_onnx(path: str, as_json: bool) -> int:
    """An ONNX model's inputs, outputs and every node (name, op, inputs → outputs): the names that
    ``--fp32-layers`` patterns and ``kiln compare --per-layer`` refer to. The file is read by
    kiln.onnx.reader (onnx is imported only where that needs it), its tensors' values not at all."""
    from kiln.errors import ParseError
    from kiln.onnx.reader import load
    from kiln.onnx.validate import onnx_dtype
    try:
        proto = load(path, load_external_data=False)
    except Exception as exc:
        raise ParseError(f"{path!r} is neither a Kiln engine nor a readable ONNX model "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}).") from None

    def value_desc(v):
        t = v.type.tensor_type
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
        try:
            dtype = onnx_dtype(t.elem_type) if t.elem_type else "?"
        except ParseError:                  # a type number Kiln does not know: shown, not trusted
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
