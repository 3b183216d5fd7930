"""The engine header schema (kiln.engine.schema): a header that passes can run, one that does not is
refused as damaged in one line, through the API and through ``kiln run``/``inspect``/``bench``.

Forged engines are written with ``kiln.engine.format.write_engine`` from a real engine's header
and weights, so their checksums are right and the schema is what refuses them. Files nested
too deeply for ``json.dumps`` are signed here by hand with the layout of kiln/engine/format.py.
"""
from __future__ import annotations

import copy
import json
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from _kiln_cli import run_cli

import kiln
import kiln.onnx
from kiln.engine.format import read_engine, write_engine
from kiln.engine.schema import MAX_DEPTH, header_problem
from kiln.errors import EngineFormatError, KilnError
from kiln.runtime.engine import Engine

PRELUDE = struct.Struct("<8sII QQQ II 16s")


@pytest.fixture(scope="module")
def conv(model_case, cpu_engine, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """conv_bn built for the CPU and saved: (engine path, feeds)."""
    case = model_case("conv_bn")
    engine = cpu_engine("conv_bn")
    path = tmp_path_factory.mktemp("schema") / "conv_bn.kiln"
    engine.save(path)
    return path, case.feeds(2, seed=3)


def forge(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """``src`` re-written with its header edited (write_engine recomputes both checksums)."""
    header, weights = read_engine(str(src))
    h = copy.deepcopy({k: v for k, v in header.items() if k != "weights"})
    edit(h)
    write_engine(str(dst), h, weights)
    return dst


def sign_raw(src: Path, dst: Path, head: bytes) -> Path:
    """``src`` with its header replaced by raw bytes, prelude and checksums recomputed by hand."""
    data = src.read_bytes()
    fields = PRELUDE.unpack(data[:PRELUDE.size])
    weights = data[fields[4]:fields[4] + fields[5]]
    w_off = (PRELUDE.size + len(head) + 63) // 64 * 64
    pre = PRELUDE.pack(fields[0], fields[1], 0, len(head), w_off, len(weights), zlib.crc32(head),
                       zlib.crc32(weights), b"\0" * 16)
    dst.write_bytes(pre + head + b"\0" * (w_off - PRELUDE.size - len(head)) + weights)
    return dst


def nested(depth: int) -> Any:
    v: Any = 0
    for _ in range(depth):
        v = [v]
    return v


def layer(h: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(l for l in h["plan"]["layers"] if l["kind"] == kind)


def refused(path: Path) -> str:
    with pytest.raises(EngineFormatError) as info:
        kiln.load(path)
    msg = str(info.value)
    assert "\n" not in msg and "damaged" in msg and "kiln build" in msg, msg
    with pytest.raises(EngineFormatError) as again:         # what kiln inspect and the viewer read
        kiln.engine.read_header(path)
    assert str(again.value) == msg
    return msg


def _set(path: list, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets header[path...] = value; a str step ending in '!' picks the first layer of that kind."""
    def edit(h: dict[str, Any]) -> None:
        node: Any = h
        for step in path[:-1]:
            node = layer(h, step[:-1]) if isinstance(step, str) and step.endswith("!") else node[step]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return edit


_DELETE = object()
CONV = "Convolution!"

# (id, edit, words the one-line message must hold)
CASES = [
    ("deep-build", _set(["build", "deep"], nested(MAX_DEPTH + 5)), ["nests deeper than"]),
    ("deep-attr", _set(["plan", CONV, "attrs", "pool"], {"kernel": nested(MAX_DEPTH + 5)}), ["nests deeper than"]),
    ("stride-str", _set(["plan", CONV, "attrs", "stride"], ["2", "2"]), ["'stride'", "integer"]),
    ("stride-dict", _set(["plan", CONV, "attrs", "stride"], {"a": 1}), ["'stride'", "list"]),
    ("groups-float", _set(["plan", CONV, "attrs", "groups"], 1.5), ["'groups'", "integer"]),
    ("pool-enum", _set(["plan", "Pooling!", "attrs", "type"], "median"), ["'type'", "median"]),
    ("attr-unknown", _set(["plan", CONV, "attrs", "payload"], {"__reduce__": "os.system"}),
     ["unknown attribute 'payload'"]),
    ("attr-missing", _set(["plan", CONV, "attrs", "stride"], _DELETE), ["lacks", "'stride'"]),
    ("kind-unknown", _set(["plan", CONV, "kind"], "Evil"), ["unknown kind 'Evil'"]),
    ("layer-key", _set(["plan", CONV, "eval"], "x"), ["unknown key 'eval'"]),
    ("input-empty", _set(["plan", CONV, "inputs", 1], None), ["input 1 is empty"]),
    ("input-extra", lambda h: layer(h, "Flatten")["inputs"].append("input"), ["inputs"]),
    ("layer-precision", _set(["plan", CONV, "precision"], "fp6"), ["precision"]),
    ("layer-tactic", _set(["plan", CONV, "tactic"], 7), ["'tactic'"]),
    ("device-no-name", _set(["device", "name"], _DELETE), ["device", "'name'"]),
    ("device-name-int", _set(["device", "name"], 5), ["device", "'name'"]),
    ("device-no-arch", _set(["device", "arch"], _DELETE), ["device", "'arch'"]),
    ("shape-negative", _set(["plan", "inputs", 0, "shape"], [-3]), ["shape"]),
    ("shape-huge", _set(["plan", "inputs", 0, "shape"], ["x", 2**70]), ["shape"]),
    ("shape-float", _set(["plan", "inputs", 0, "shape"], [1.5, 3, 16, 16]), ["shape"]),
    ("shape-str", _set(["plan", "inputs", 0, "shape"], "NCHW"), ["shape"]),
    ("dtype-object", _set(["plan", "inputs", 0, "dtype"], "object"), ["data type 'object'"]),
    ("dtype-foo", _set(["plan", "inputs", 0, "dtype"], "foo"), ["data type 'foo'"]),
    ("dtype-string", _set(["plan", "inputs", 0, "dtype"], "string"), ["data type 'string'"]),
    ("dtype-seq-foo", _set(["plan", "outputs", 0, "dtype"], "sequence(foo)"), ["data type"]),
    ("profile-min-gt-max", _set(["profiles", 0, "input", "min"], [8, 3, 16, 16]), ["min <= opt <= max"]),
    ("profile-rank", _set(["profiles", 0, "input"], {"min": [1, 3], "opt": [2, 3], "max": [4, 3]}), ["rank"]),
    ("profile-ghost", _set(["profiles", 0, "ghost"], {"min": [1], "opt": [1], "max": [1]}), ["'ghost'"]),
    ("profile-float", _set(["profiles", 0, "input", "opt"], [2.0, 3, 16, 16]), ["ints"]),
    ("profile-static", _set(["profiles", 0, "input"], {"min": [1, 4, 16, 16], "opt": [2, 4, 16, 16],
                                                         "max": [4, 4, 16, 16]}), ["static dims"]),
    ("precision", _set(["precision"], "fp64"), ["precision"]),
    ("tensor-dtype", _set(["plan", "tensors", "input", "dtype"], "object"), ["tensor 'input'"]),
    ("weight-missing", lambda h: h["plan"]["weights"].update({k: "w999" for k in list(h["plan"]["weights"])[:1]}),
     ["'w999'"]),
    ("memory-negative", _set(["memory", "weights_bytes"], -1), ["memory"]),
    ("plan-key", _set(["plan", "code"], "import os"), ["unknown key 'code'"]),
]
CLI_CASES = ["deep-build", "stride-str", "device-no-name", "shape-huge", "dtype-object", "profile-min-gt-max",
             "kind-unknown", "attr-unknown"]


@pytest.mark.parametrize("edit,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_forged_headers_are_refused_in_one_line(conv, tmp_path: Path, edit, words: list[str]) -> None:
    msg = refused(forge(conv[0], tmp_path / "bad.kiln", edit))
    assert all(w in msg for w in words), msg


def test_json_too_deep_for_the_parser_is_refused_in_one_line(conv, tmp_path: Path) -> None:
    """json.loads itself raises RecursionError here: that is a damaged file too, not a traceback."""
    header, _ = read_engine(str(conv[0]))
    head = json.dumps(header).replace('"build": {', '"build": {"deep": ' + "[" * 100_000 + "]" * 100_000 + ", ", 1)
    msg = refused(sign_raw(conv[0], tmp_path / "deep.kiln", head.encode()))
    assert "nests deeper than" in msg, msg


@pytest.mark.parametrize("case", CLI_CASES + ["json-too-deep"])
def test_cli_refuses_forged_headers_with_one_line_and_exit_2(conv, tmp_path: Path, case: str) -> None:
    if case == "json-too-deep":
        head = json.dumps(read_engine(str(conv[0]))[0]).replace('"build": {', '"build": {"x": ' + "[" * 50_000
                                                                 + "]" * 50_000 + ", ", 1)
        bad = sign_raw(conv[0], tmp_path / "bad.kiln", head.encode())
    else:
        bad = forge(conv[0], tmp_path / "bad.kiln", next(c[1] for c in CASES if c[0] == case))
    for cmd in (["run", str(bad)], ["inspect", str(bad)], ["bench", str(bad), "--iterations", "1"]):
        proc = run_cli(*cmd)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (cmd, proc.stderr[-2000:])
        assert "damaged" in lines[0], lines[0]


# ---- valid engines pass, round-trip and run ---------------------------------------------------------

def _control_flow_model(path: Path) -> Path:
    """If (an If nested in its then-branch), a Loop whose body reads an outer tensor, and a Scan."""
    import onnx
    from onnx import TensorProto as T, helper, numpy_helper
    vi = helper.make_tensor_value_info
    inner_then = helper.make_graph([helper.make_node("Abs", ["x"], ["a"])], "it", [], [vi("a", T.FLOAT, ["n", 3])])
    inner_else = helper.make_graph([helper.make_node("Exp", ["x"], ["b"])], "ie", [], [vi("b", T.FLOAT, ["n", 3])])
    then_g = helper.make_graph([helper.make_node("If", ["c2"], ["t"], then_branch=inner_then, else_branch=inner_else)],
                               "then", [], [vi("t", T.FLOAT, ["n", 3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [vi("e", T.FLOAT, ["n", 3])])
    body = helper.make_graph(
        [helper.make_node("Cast", ["i"], ["fi"], to=T.FLOAT), helper.make_node("Mul", ["x", "fi"], ["xi"]),
         helper.make_node("Add", ["acc", "xi"], ["acc2"]), helper.make_node("Identity", ["c"], ["c2o"])], "body",
        [vi("i", T.INT64, []), vi("c", T.BOOL, []), vi("acc", T.FLOAT, ["n", 3])],
        [vi("c2o", T.BOOL, []), vi("acc2", T.FLOAT, ["n", 3])])
    scan_body = helper.make_graph(
        [helper.make_node("Add", ["s", "row"], ["s2"]), helper.make_node("Identity", ["s2"], ["out"])], "scan",
        [vi("s", T.FLOAT, [3]), vi("row", T.FLOAT, [3])], [vi("s2", T.FLOAT, [3]), vi("out", T.FLOAT, [3])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("Less", ["s", "ten"], ["c2"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Loop", ["trip", "true", "y"], ["z"], body=body),
             helper.make_node("Scan", ["init", "z"], ["last", "rows"], body=scan_body, num_scan_inputs=1)]
    g = helper.make_graph(
        nodes, "control", [vi("x", T.FLOAT, ["n", 3])],
        [vi("z", T.FLOAT, ["n", 3]), vi("last", T.FLOAT, [3]), vi("rows", T.FLOAT, ["n", 3])],
        [numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(np.float32(10), "ten"),
         numpy_helper.from_array(np.int64(3), "trip"), numpy_helper.from_array(np.bool_(True), "true"),
         numpy_helper.from_array(np.zeros(3, np.float32), "init")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _hand_built() -> kiln.Network:
    """A network made with the API alone: conv, pooling, LRN, shuffle, reduce, softmax, topk, resize."""
    rng = np.random.default_rng(0)
    net = kiln.Network("by_hand")
    x = net.add_input("x", "float32", (1, 2, 8, 8))
    y = net.add_convolution(x, rng.standard_normal((4, 2, 3, 3)).astype(np.float32), np.zeros(4, np.float32),
                            pads=[1, 1, 1, 1]).output
    y = net.add_lrn(net.add_pooling(y, "max", [2, 2]).output, 3).output
    y = net.add_resize(y, scales=[1, 1, 2, 2]).output
    y = net.add_shuffle(y, first_transpose=[0, 2, 3, 1], reshape=[1, 64, 4]).output
    s = net.add_softmax(net.add_reduce(y, "mean", [1], keepdims=False).output, axis=-1).output
    top = net.add_topk(s, 2)
    net.mark_output(top.outputs[0], "values")
    net.mark_output(top.outputs[1], "indices")
    return net


def _engines(model_case, cpu_engine, tmp: Path) -> dict[str, tuple[Any, dict[str, np.ndarray]]]:
    out = {}
    for name in ("conv_bn", "mini_bert"):
        out[name] = (cpu_engine(name), model_case(name).feeds(2, seed=4))
    cf = _control_flow_model(tmp / "control.onnx")
    rng = np.random.default_rng(1)
    out["control_flow"] = (kiln.build(kiln.onnx.parse(cf), kiln.BuildConfig(device="cpu",
                                                                            profiles={"x": ((1, 3), (2, 3), (4, 3))})),
                           {"x": rng.standard_normal((2, 3)).astype(np.float32)})
    out["by_hand"] = (kiln.build(_hand_built(), kiln.BuildConfig(device="cpu")),
                      {"x": rng.standard_normal((1, 2, 8, 8)).astype(np.float32)})
    return out


@pytest.fixture(scope="module")
def engines(model_case, cpu_engine, tmp_path_factory):
    return _engines(model_case, cpu_engine, tmp_path_factory.mktemp("valid"))


def _layers(plan: dict[str, Any]):
    """Every layer of a plan and of its subgraph plans (the subgraph's layers after their holder)."""
    for lay in plan["layers"]:
        yield lay
        for v in lay.get("attrs", {}).values():
            if isinstance(v, dict) and "__graph__" in v:
                yield from _layers(v["__graph__"])


def test_valid_engines_pass_the_schema_round_trip_and_run(engines, tmp_path: Path) -> None:
    kinds = set()
    for name, (engine, feeds) in engines.items():
        header, weights = engine.serialize()
        assert header_problem(header, weights) is None, name
        path = tmp_path / f"{name}.kiln"
        engine.save(path)
        loaded = kiln.load(path)
        assert header_problem(read_engine(str(path))[0], w_len=path.stat().st_size) is None
        want, got = engine.context().run(feeds), loaded.context().run(feeds)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name} {k}")
        kinds |= {lay["kind"] for lay in _layers(loaded.plan)}
    assert {"Convolution", "Pooling", "If", "Loop", "Scan", "MatMul", "TopK", "Resize"} <= kinds, kinds
    if_layer = next(lay for lay in _layers(engines["control_flow"][0].plan) if lay["kind"] == "If")
    assert any(lay["kind"] == "If" for lay in if_layer["attrs"]["then_branch"]["__graph__"]["layers"])


def test_every_attribute_of_valid_engines_is_typed(engines) -> None:
    """Property: in every layer (subgraphs too) of the valid engines, replacing any one attribute with a
    value no attribute type admits, or adding an undeclared one, is refused naming that layer and attribute."""
    checked = 0
    for name, (engine, _) in engines.items():
        header, weights = engine.serialize()
        for lay in _layers(header["plan"]):
            for key in list(lay.get("attrs", {})) + ["undeclared"]:
                saved = lay.setdefault("attrs", {}).get(key, _DELETE)
                lay["attrs"][key] = {"junk": ["x"]}
                try:
                    why = header_problem(header, weights)
                finally:
                    if saved is _DELETE:
                        del lay["attrs"][key]
                    else:
                        lay["attrs"][key] = saved
                assert why is not None and f"{lay['name'][:60]!r}" in why and repr(key) in why, (name, key, why)
                checked += 1
        assert header_problem(header, weights) is None            # every edit was undone
    assert checked > 100, checked


_VALUES = [None, True, False, 0, 1, -1, 3, 2**40, 2**70, -2**70, 0.5, -1.5, float("nan"), "x", "relu", "",
           [], [0], [1], [-1], [2, 2], [1, 1, 1, 1], [0, 0, 0, 0], [2**40, 1], ["2", "2"], [1.5, 1], [[1]], {},
           {"a": 1}, {"kernel": [3, 3], "stride": [2, 2], "pads": [1, 1, 1, 1]}]


def test_any_attribute_value_that_passes_runs_or_fails_in_one_line(conv) -> None:
    """Property: each attribute of each layer of a real engine set to each of a spread of JSON values
    either fails the schema or gives an engine whose context builds and runs, or that refuses in one
    line with a KilnError; never another exception."""
    header, weights = read_engine(str(conv[0]))
    feeds = conv[1]
    passed = 0
    for i, lay in enumerate(header["plan"]["layers"]):
        for key in lay["attrs"]:
            for value in _VALUES:
                h = copy.deepcopy(header)
                h["plan"]["layers"][i]["attrs"][key] = value
                if header_problem(h, w_len=10**12) is not None:
                    continue
                passed += 1
                try:
                    Engine(h, weights, path="forged.kiln").context(cuda_graph=False).run(feeds)
                except KilnError as exc:
                    assert "\n" not in str(exc), str(exc)
    assert passed > 50, passed


def test_pointwise_program_is_checked_by_the_schema(tmp_path: Path) -> None:
    """A Pointwise program is validated against its grammar at load, so even the torch-free readers
    (kiln inspect) never walk a forged step (a ``{"__graph__": null}`` op once crashed the plugin scan)."""
    net = kiln.Network("p")
    x = net.add_input("x", "float32", (2, 3))
    pw = net.add_layer("Pointwise", [x], {"program": [{"op": "neg", "args": ["i0"]}, {"op": "exp", "args": ["v0"]}]})
    net.mark_output(pw.output, "y")
    src = tmp_path / "pw.kiln"
    kiln.build(net, kiln.BuildConfig(device="cpu", optimization_level=0)).save(str(src))
    bad = forge(src, tmp_path / "bad.kiln", lambda h: layer(h, "Pointwise")["attrs"]["program"][1].update(
        op={"__graph__": None}))
    assert "program" in refused(bad)
    proc = run_cli("inspect", str(bad))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "program" in lines[0], proc.stderr


def _loop_layer(header: dict[str, Any]) -> dict[str, Any]:
    return next(l for l in _layers(header["plan"]) if l["kind"] == "Loop")


def test_a_body_sees_only_the_outer_values_passed_to_it(engines) -> None:
    """A Loop body that reads an outer tensor its layer does not pass in (a forged swap) is refused at load,
    not a KeyError at run (fuzz finding)."""
    header, weights = copy.deepcopy(engines["control_flow"][0].serialize()[0]), engines["control_flow"][0].serialize()[1]
    loop = _loop_layer(header)
    body = loop["attrs"]["body"]["__graph__"]
    hidden = next(n for n in ("s", "c", "c2") if n not in (loop["attrs"].get("outer") or []))
    body["layers"][0]["inputs"][0] = hidden
    why = header_problem(header, weights)
    assert why is not None and f"reads {hidden!r}" in why, why


def test_a_body_whose_outputs_do_not_match_its_layer_is_refused(engines) -> None:
    header, weights = copy.deepcopy(engines["control_flow"][0].serialize()[0]), engines["control_flow"][0].serialize()[1]
    del _loop_layer(header)["attrs"]["body"]["__graph__"]["outputs"][0]
    why = header_problem(header, weights)
    assert why is not None and "body takes" in why, why
