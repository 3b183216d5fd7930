"""Mutated ONNX models: raw byte damage, and structure-aware edits made through the onnx protobuf classes.

Structure-aware kinds: dims, attributes, names (invalid UTF-8 patched into the serialized bytes,
since protobuf refuses it on assignment), external-data paths, deep If/Loop nesting, sparse
initializers with bad indices, opsets and IR versions, graph wiring, initializer data, and
hostile ``--shapes`` flags for ``kiln build``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from fuzz import mutate

HUGE = [2 ** 40, 2 ** 62, 2 ** 31, 10 ** 12]
BAD_DIMS = [-1, -2, -4, 0] + HUGE


def _graphs(graph) -> list:
    """The graph and every subgraph below it (If/Loop/Scan bodies)."""
    out = [graph]
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("g"):
                out += _graphs(a.g)
            for g in a.graphs:
                out += _graphs(g)
    return out


def _nodes(model) -> list:
    return [n for g in _graphs(model.graph) for n in g.node]


def _values(model) -> list:
    return [v for g in _graphs(model.graph) for v in (*g.input, *g.output, *g.value_info)]


def dims(model, rng: random.Random) -> str:
    from onnx import TensorProto
    if rng.random() < 0.5:
        vals = [v for v in _values(model) if v.type.tensor_type.shape.dim]
        v = rng.choice(vals)
        d = rng.choice(v.type.tensor_type.shape.dim)
        kind = rng.choice(["value", "param", "clear", "add"])
        if kind == "value":
            d.dim_value = rng.choice(BAD_DIMS)
        elif kind == "param":
            d.dim_param = rng.choice(["N", "", "<!--<script>", "a b", "x" * 300])
        elif kind == "clear":
            d.Clear()
        else:
            v.type.tensor_type.shape.dim.add().dim_value = rng.choice(BAD_DIMS)
        if rng.random() < 0.2:
            v.type.tensor_type.elem_type = rng.choice([0, TensorProto.STRING, 99, TensorProto.COMPLEX128])
        return f"dims-{kind}@{v.name}"
    inits = [t for g in _graphs(model.graph) for t in g.initializer]
    t = rng.choice(inits)
    kind = rng.choice(["neg", "huge", "zero", "extra", "dtype"])
    if kind == "neg":
        t.dims[:] = [-4] if len(t.dims) <= 1 else [-abs(d) for d in t.dims]
    elif kind == "huge":
        t.dims[:] = [rng.choice(HUGE)] + list(t.dims[1:])
    elif kind == "zero":
        t.dims[:] = [0] + list(t.dims[1:])
    elif kind == "extra":
        t.dims.extend([rng.choice([3, 1000])])
    else:
        t.data_type = rng.choice([0, 8, 16, 99, 7, 10])
    return f"initializer-dims-{kind}@{t.name}"


def attributes(model, rng: random.Random) -> str:
    import onnx
    from onnx import helper
    nodes = [n for n in _nodes(model) if n.attribute] or _nodes(model)
    n = rng.choice(nodes)
    kind = rng.choice(["retype", "huge", "negative", "delete", "unknown", "list"])
    a = rng.choice(n.attribute) if n.attribute else None
    if a is None or kind == "unknown":
        n.attribute.append(helper.make_attribute(rng.choice(["bogus", "axis", "perm", "pads"]), rng.choice([7, "s"])))
        return f"attr-unknown@{n.op_type}"
    if kind == "delete":
        n.attribute.remove(a)
        return f"attr-delete@{n.op_type}.{a.name}"
    name = a.name
    value: Any
    if kind == "retype":
        value = rng.choice([1.5, "str", b"\xff", [1.0, 2.0], ["a"], helper.make_tensor("t", 1, [1], [1.0]), 3])
    elif kind == "huge":
        value = rng.choice([2 ** 62, [2 ** 62] * 4, 1e38, [2 ** 40, 1]])
    elif kind == "negative":
        value = rng.choice([-1, -2 ** 62, [-1, -1, -1, -1], [-5] * 3, -1.0])
    else:
        value = [rng.randrange(-3, 9) for _ in range(rng.choice([0, 1, 3, 5, 17]))]
    n.attribute.remove(a)
    n.attribute.append(helper.make_attribute(name, value, attr_type=None if value != [] else onnx.AttributeProto.INTS))
    return f"attr-{kind}@{n.op_type}.{name}"


def names(model, rng: random.Random, patches: list) -> str:
    """Hostile node/tensor/op names; invalid UTF-8 goes in as a placeholder replaced after serializing."""
    n = rng.choice(_nodes(model))
    field = rng.choice(["name", "op_type", "domain", "output", "graph-input", "duplicate"])
    if field == "duplicate":
        others = [m for m in _nodes(model) if m is not n and m.output]
        if others and n.output:
            n.output[0] = rng.choice(others).output[0]
            return "names-duplicate-output"
        field = "name"
    kind = rng.choice(["utf8", "html", "empty", "long", "newline"])
    value = {"html": "<!--<script>", "empty": "", "long": "n" * 10_000, "newline": "a\nb\rc"}.get(kind)
    if kind == "utf8":
        value = f"FUZZUTF8{len(patches):04d}"
        patches.append((value.encode(), b"\xff\xfe\xc3(\x80\xed\xa0\x80\xf8\x88\x80\x80"))
    if field == "name":
        n.name = value
    elif field == "op_type":
        n.op_type = value
    elif field == "domain":
        n.domain = value
    elif field == "output" and n.output:
        old = n.output[0]
        for m in _nodes(model):
            m.input[:] = [value if x == old else x for x in m.input]
        for o in model.graph.output:
            if o.name == old:
                o.name = value
        n.output[0] = value
    else:
        model.graph.input[0].name = value
    return f"names-{kind}-{field}"


def external_data(model, rng: random.Random, case_dir: Path, secrets: list[str]) -> str:
    """Point an initializer's data at a file outside the folder (or a device, a directory, a link)."""
    from onnx import TensorProto
    t = rng.choice([t for t in model.graph.initializer if t.raw_data or t.float_data or t.int64_data])
    target = rng.choice(secrets + ["/dev/zero", "/dev/urandom", ".", "", "weights.bin", "missing.bin",
                                   "sub/../../secret.bin", "link.bin", "C:\\Windows\\win.ini", "weights.bin\0.txt"])
    if target == "weights.bin":
        (case_dir / "weights.bin").write_bytes(os.urandom(64))
    if target == "link.bin":
        os.symlink(secrets[0], case_dir / "link.bin")
    nbytes = len(t.raw_data) or 4 * max(len(t.float_data), len(t.int64_data))
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.ClearField("int64_data")
    t.data_location = TensorProto.EXTERNAL
    entries = {"location": target}
    if rng.random() < 0.5:
        entries["offset"] = str(rng.choice([0, 8, -1, 2 ** 40, "abc"]))
        entries["length"] = str(rng.choice([nbytes, 0, -1, 2 ** 40, "x"]))
    for k, v in entries.items():
        e = t.external_data.add()
        e.key, e.value = k, v
    return f"external-data={os.path.basename(target) if target in secrets else target!r}"


def _ld(num: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return mutate.encode_varint(num << 3 | 2) + mutate.encode_varint(len(payload)) + payload


def _graph_attr(name: str, graph: bytes) -> bytes:
    """AttributeProto {name, type GRAPH, g}: written by hand, since protobuf objects refuse deep nesting."""
    return _ld(5, _ld(1, name.encode()) + mutate.encode_varint(20 << 3) + mutate.encode_varint(5) + _ld(6, graph))


def nesting(model, rng: random.Random) -> tuple[str, bytes]:
    """If (or Loop) nodes nested ``depth`` deep around an Identity, as bytes to append to the serialized
    model (a second ``graph`` field merges into the first, adding the node). The model stays valid."""
    import onnx
    from onnx import TensorProto, helper
    depth = rng.choice([6, 16, 30, 400])     # protobuf's own limit is about 33 levels of node/attribute/graph
    use_loop = rng.random() < 0.3
    x = model.graph.input[0]

    def info(name: str, lead: int = 0, elem: int | None = None) -> bytes:
        """A value of ``x``'s type with ``lead`` more leading dims of 1 (a Loop scan adds one per level)."""
        v = onnx.ValueInfoProto(name=name)
        if elem is not None:
            v.type.tensor_type.elem_type = elem
            v.type.tensor_type.shape.SetInParent()
        else:
            v.type.CopyFrom(x.type)
            for _ in range(lead):
                v.type.tensor_type.shape.dim.insert(0, onnx.TensorShapeProto.Dimension(dim_value=1))
        return v.SerializeToString()

    def node(*fields: bytes) -> bytes:
        return b"".join(fields)
    identity = helper.make_node("Identity", [x.name], ["deep_out"]).SerializeToString()
    leaf = _ld(1, identity) + _ld(2, b"leaf") + _ld(12, info("deep_out"))
    inner = leaf
    if use_loop:          # a Loop body takes (iteration, condition) and gives the condition back first
        inner = (_ld(1, identity) + _ld(1, helper.make_node("Identity", ["c_in"], ["c_out"]).SerializeToString())
                 + _ld(2, b"body") + _ld(11, info("i", elem=TensorProto.INT64))
                 + _ld(11, info("c_in", elem=TensorProto.BOOL)) + _ld(12, info("c_out", elem=TensorProto.BOOL))
                 + _ld(12, info("deep_out")))
    for level in range(depth + 1):
        out = f"deep_out{level}" if level < depth else "deep_y"
        lead = level + 1 if use_loop else 0
        if use_loop:
            top = node(_ld(1, b"deep_trip"), _ld(1, b"deep_cond"), _ld(2, out.encode()), _ld(4, b"Loop"),
                       _graph_attr("body", inner))
            c_in, c_out = f"c_in{level}", f"c_out{level}"
            inner = (_ld(1, top) + _ld(1, helper.make_node("Identity", [c_in], [c_out]).SerializeToString())
                     + _ld(2, f"level{level}".encode()) + _ld(11, info(f"i{level}", elem=TensorProto.INT64))
                     + _ld(11, info(c_in, elem=TensorProto.BOOL)) + _ld(12, info(c_out, elem=TensorProto.BOOL))
                     + _ld(12, info(out, lead)))
        else:
            top = node(_ld(1, b"deep_cond"), _ld(2, out.encode()), _ld(4, b"If"), _graph_attr("then_branch", inner),
                       _graph_attr("else_branch", leaf))
            inner = _ld(1, top) + _ld(2, f"level{level}".encode()) + _ld(12, info(out))
    model.graph.ClearField("node")
    model.graph.initializer.append(helper.make_tensor("deep_cond", TensorProto.BOOL, [], [True]))
    model.graph.initializer.append(helper.make_tensor("deep_trip", TensorProto.INT64, [], [1]))
    del model.graph.output[:]
    model.graph.output.append(onnx.ValueInfoProto.FromString(info("deep_y", depth + 1 if use_loop else 0)))
    return f"nesting-{'loop' if use_loop else 'if'}-{depth}", _ld(7, _ld(1, top))


def sparse(model, rng: random.Random) -> str:
    """Turn a dense initializer into a sparse one with bad indices, dims or value counts."""
    from onnx import TensorProto, helper
    t = rng.choice([t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT])
    dims = list(t.dims) or [1]
    kind = rng.choice(["out-of-range", "negative", "huge-dims", "count", "neg-dims", "2d-indices"])
    idx = [0, 1]
    vals = [1.0, 2.0]
    if kind == "out-of-range":
        idx = [0, 10 ** 9]
    elif kind == "negative":
        idx = [-1, 0]
    elif kind == "huge-dims":
        dims = [2 ** 40] + dims[1:]
    elif kind == "count":
        vals = [1.0]
    elif kind == "neg-dims":
        dims = [-4]
    values = helper.make_tensor(t.name, TensorProto.FLOAT, [len(vals)], vals)
    shape = [len(idx), len(dims)] if kind == "2d-indices" else [len(idx)]
    flat = idx * len(dims) if kind == "2d-indices" else idx
    indices = helper.make_tensor(t.name + "_idx", TensorProto.INT64, shape, flat)
    model.graph.initializer.remove(t)
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, dims))
    return f"sparse-{kind}"


def opset(model, rng: random.Random) -> str:
    kind = rng.choice(["version", "no-default", "custom-domain", "ir"])
    if kind == "version":
        model.opset_import[0].version = rng.choice([0, 1, 6, 99999, -1, 2 ** 40])
    elif kind == "no-default":
        del model.opset_import[:]
    elif kind == "custom-domain":
        imp = model.opset_import.add()
        imp.domain, imp.version = rng.choice(["com.evil", "", "ai.onnx.ml"]), rng.choice([1, 0, -3])
        rng.choice(_nodes(model)).domain = imp.domain
    else:
        model.ir_version = rng.choice([0, 1, 3, 99, -1])
    return f"opset-{kind}"


def wiring(model, rng: random.Random) -> str:
    kind = rng.choice(["dangling", "cycle", "delete-node", "no-outputs", "output-missing", "unknown-op", "empty-input"])
    nodes = list(model.graph.node)
    n = rng.choice(nodes)
    if kind == "dangling" and n.input:
        n.input[rng.randrange(len(n.input))] = "nowhere"
    elif kind == "cycle" and n.input and n.output:
        n.input[0] = n.output[0]
    elif kind == "delete-node":
        model.graph.node.remove(n)
    elif kind == "no-outputs":
        del model.graph.output[:]
    elif kind == "output-missing":
        model.graph.output[0].name = "not_produced"
    elif kind == "unknown-op":
        n.op_type, n.domain = rng.choice([("EvilOp", ""), ("Conv", "com.evil"), ("If", "ai.onnx.ml")])
    elif n.input:
        n.input[0] = ""
    return f"wiring-{kind}"


def data(model, rng: random.Random) -> str:
    """Initializer contents: short raw data, huge or negative shape values (Reshape, Expand targets)."""
    import numpy as np
    from onnx import numpy_helper
    t = rng.choice(list(model.graph.initializer))
    kind = rng.choice(["short", "values", "empty"])
    if kind == "short" and t.raw_data:
        t.raw_data = t.raw_data[:len(t.raw_data) // 2]
    elif kind == "empty":
        t.ClearField("raw_data")
    else:
        arr = numpy_helper.to_array(t)
        bad = rng.choice([-(2 ** 40), 2 ** 40, -7, 0, np.nan, np.inf])
        if arr.size:
            arr = arr.copy()
            try:
                arr.flat[rng.randrange(arr.size)] = bad
            except (OverflowError, ValueError):
                arr.flat[0] = -1
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return f"data-{kind}@{t.name}"


STRUCTURED = {"dims": dims, "attributes": attributes, "opset": opset, "wiring": wiring, "data": data,
              "sparse": sparse}
SHAPE_FLAGS = ["x:-2x3x16x16", "x:0x8", "x:1099511627776x8", "x:2x8x1x1x1x1x1x1x1", "x:", "x:axb", "y:2x8",
               "x:99999999999999999999999x8"]


def make(seed_file: Path, out: Path, rng: random.Random, secrets: list[str]) -> tuple[str, list[str]]:
    """Write one mutated model to ``out``; return (label, extra ``kiln build`` flags)."""
    import onnx
    model = onnx.load(str(seed_file), load_external_data=False)
    pick = rng.random()
    if pick < 0.2:
        body, label = (mutate.pb_mutation if rng.random() < 0.5 else mutate.raw)(model.SerializeToString(), rng)
        out.write_bytes(body)
        return "raw-" + label, []
    patches: list[tuple[bytes, bytes]] = []
    flags: list[str] = []
    tail = b""
    if pick < 0.27:
        label, tail = nesting(model, rng)
    elif pick < 0.35:
        label = names(model, rng, patches)
    elif pick < 0.45:
        label = external_data(model, rng, out.parent, secrets)
    elif pick < 0.5:
        label = "shapes-flag"
        flags = ["--shapes", rng.choice(SHAPE_FLAGS)]
    else:
        kind = rng.choice(sorted(STRUCTURED))
        label = STRUCTURED[kind](model, rng)
    body = model.SerializeToString() + tail
    for placeholder, bad in patches:
        body = body.replace(placeholder, bad[:len(placeholder)].ljust(len(placeholder), b"\xff"))
    out.write_bytes(body)
    return label, flags


def calls(path: Path, flags: list[str], seed_name: str) -> list[list[str]]:
    """The CLI commands run on a mutated model: check, inspect, build (then run what was built), view."""
    engine = path.parent / "built.kiln"
    if not flags and seed_name == "mlp":
        flags = ["--shapes", "x:2x8"]
    return [["check", str(path)], ["inspect", str(path)],
            ["build", str(path), "-o", str(engine), "--device", "cpu", "-q", *flags],
            ["run", str(engine)],
            ["view", str(path), "--export", str(path.parent / "view.html")]]
