"""Model diff on real files: two torch exports, an ONNX model and its FP16 engine, two opset versions; and
`kiln diff` (exit status, JSON, one-line errors, names from files shown safely)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import defs, helper, version_converter

import kiln
from kiln.cli import main as kiln_main
from kiln.viewer.diff import diff_models
from kiln.viewer.diff_build import explain_build
from kiln.viewer.formats import open_model

torch = pytest.importorskip("torch")


class Net(torch.nn.Module):
    def __init__(self, k: int = 3, pad: int = 1) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, k, padding=pad)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.mean((2, 3), keepdim=True).squeeze(3).squeeze(2))


def export_net(net: torch.nn.Module, path, opset: int = 17) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), torch.zeros(1, 3, 8, 8), str(path), dynamo=False, opset_version=opset,
                          input_names=["x"], output_names=["y"])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """a.onnx; b.onnx: c2 with a 5×5 kernel (same output shape) and its bias moved; c.onnx: c2 without padding."""
    d = tmp_path_factory.mktemp("diff-models")
    torch.manual_seed(0)
    a, b, c = Net(), Net(5, 2), Net(3, 0)
    for other in (b, c):
        other.c1.load_state_dict(a.c1.state_dict())
        other.fc.load_state_dict(a.fc.state_dict())
    c.c2.load_state_dict(a.c2.state_dict())
    with torch.no_grad():
        b.c2.bias.copy_(a.c2.bias + torch.linspace(-0.5, 0.25, 8))
    for name, net in (("a", a), ("b", b), ("c", c)):
        export_net(net, d / f"{name}.onnx")
    return d, a, b


def test_two_exports_with_one_layer_changed(exports):
    d, a, b = exports
    diff = diff_models(open_model(d / "a.onnx"), open_model(d / "b.onnx"))
    changes = diff.changes()
    assert [c.node.name for c in changes] == ["/c2/Conv"]
    assert diff.counts()["unchanged"] == len(onnx.load(d / "a.onnx").graph.node) - 1
    details = {(x.kind, x.name): x for x in changes[0].details}
    assert set(details) == {("attribute", "kernel_shape"), ("attribute", "pads"), ("weight", "W"), ("weight", "B")}
    assert (details["attribute", "kernel_shape"].a, details["attribute", "kernel_shape"].b) == ([3, 3], [5, 5])
    assert (details["attribute", "pads"].a, details["attribute", "pads"].b) == ([1] * 4, [2] * 4)
    w = details["weight", "W"]
    assert (w.a["shape"], w.b["shape"], w.stats) == (list(a.c2.weight.shape), list(b.c2.weight.shape), None)
    ref = (a.c2.bias.detach().double() - b.c2.bias.detach().double()).abs()
    stats = details["weight", "B"].stats
    assert stats["max_abs"] == pytest.approx(ref.max().item(), rel=1e-12)
    assert stats["mean_abs"] == pytest.approx(ref.mean().item(), rel=1e-12)
    assert diff.groups("b") == {("c1",): "unchanged", ("c2",): "changed", ("fc",): "unchanged"}


def test_kiln_diff_text_json_and_exit_status(exports, capsys):
    d, _, _ = exports
    assert kiln_main(["diff", str(d / "a.onnx"), str(d / "a.onnx")]) == 0
    assert "0 added, 0 removed, 0 changed" in capsys.readouterr().out
    assert kiln_main(["diff", str(d / "a.onnx"), str(d / "b.onnx")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("0 added, 0 removed, 1 changed, ")
    assert out[3] == "~ /c2/Conv (Conv)"
    assert "    attribute kernel_shape: [3, 3] → [5, 5]" in out
    assert "    weight W: float 8×8×3×3 → float 8×8×5×5" in out
    assert kiln_main(["diff", str(d / "a.onnx"), str(d / "b.onnx"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["differs"] and doc["counts"]["changed"] == 1 and doc["changes"][0]["b"]["name"] == "/c2/Conv"
    assert doc["groups"]["a"]["c2"] == "changed"


def test_kiln_diff_bad_input_is_one_line(exports, tmp_path, capsys):
    d, _, _ = exports
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01not a model at all" * 10)
    for args in (["diff", str(d / "a.onnx"), str(tmp_path / "missing.onnx")], ["diff", str(junk), str(d / "a.onnx")]):
        assert kiln_main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("kiln: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_names_from_files_are_escaped_in_text(tmp_path, capsys):
    def model(name: str):
        g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="/a/Relu"),
                               helper.make_node("Neg", ["r"], ["y"], name=name)], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model("/a/Neg"), tmp_path / "a.onnx")
    onnx.save(model("evil\x1b[2J\nfake line\u202e"), tmp_path / "b.onnx")
    onnx.save(model("/a/Neg"), tmp_path / "b2.onnx")
    assert kiln_main(["diff", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")]) == 0   # matched by structure
    assert kiln_main(["diff", str(tmp_path / "b.onnx"), str(tmp_path / "b2.onnx")]) == 0
    capsys.readouterr()
    b = onnx.load(tmp_path / "b.onnx")
    b.graph.node[1].op_type = "Abs"
    onnx.save(b, tmp_path / "b.onnx")
    assert kiln_main(["diff", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out
    assert "+ evil\\x1b[2J\\nfake line\\u202e (Abs)" in out.splitlines()


def test_opset_versions_of_one_model(exports, tmp_path, capsys):
    _, a, _ = exports
    export_net(a, tmp_path / "o11.onnx", opset=11)
    old = onnx.load(tmp_path / "o11.onnx")
    new = version_converter.convert_version(old, 18)
    onnx.save(new, tmp_path / "o18.onnx")
    diff = diff_models(open_model(tmp_path / "o11.onnx"), open_model(tmp_path / "o18.onnx"))
    assert [(x.kind, x.a, x.b) for x in diff.model] == [("version", "opset 11", "opset 18")]
    # what changed, from the two protos and ONNX's own schemas
    before = {n.name: n for n in old.graph.node}
    expect_changed = set()
    for n in new.graph.node:
        o = before.get(n.name) if n.name else None
        if o is None:
            continue
        since = [defs.get_schema(x.op_type, v).since_version for x, v in ((o, 11), (n, 18))]
        if ({a.name for a in o.attribute} != {a.name for a in n.attribute} or len(o.input) != len(n.input)
                or since[0] != since[1]):
            expect_changed.add(n.name)
    assert expect_changed >= {"/Squeeze", "/Squeeze_1"}
    assert {c.node.name for c in diff.changes() if c.status == "changed"} == expect_changed
    added = [c.node.op_type for c in diff.changes() if c.status == "added"]
    assert len(added) == len(new.graph.node) - len(old.graph.node) and set(added) == {"Constant"}
    squeeze = next(c for c in diff.changes() if c.node.name == "/Squeeze")
    kinds = {(x.kind, x.name) for x in squeeze.details}
    assert {("attribute", "axes"), ("input", "axes")} <= kinds
    assert kiln_main(["diff", str(tmp_path / "o11.onnx"), str(tmp_path / "o18.onnx")]) == 1
    assert "version: opset 11 → opset 18" in capsys.readouterr().out


@pytest.fixture(scope="module")
def fp16_engine(exports):
    d, _, _ = exports
    try:
        engine = kiln.build(kiln.onnx.parse(str(d / "a.onnx")), kiln.BuildConfig(device="cpu", precision="fp16"))
    except kiln.KilnError as exc:
        pytest.skip(f"no FP16 CPU build here: {exc}")
    engine.save(str(d / "a.kiln"))
    return d / "a.kiln"


def test_onnx_model_and_its_fp16_engine(exports, fp16_engine, capsys):
    d, _, _ = exports
    model, eng = open_model(d / "a.onnx"), open_model(fp16_engine)
    build = explain_build(model, eng)
    assert not build.differs
    layers = kiln.engine.read_header(str(fp16_engine))["layers"]
    expect = ["plugin" if l["kind"] == "Plugin" else "inserted" if not l["origin"] else
              "kept" if len(l["origin"]) == 1 else "fused" for l in layers]
    assert [lo.status for lo in build.layers] == expect
    assert [lo.layer.overlay["precision"] for lo in build.layers] == [l["precision"] for l in layers]
    fused = {o for l in layers if len(l["origin"]) > 1 for o in l["origin"]}
    built = {o for l in layers for o in l["origin"]}
    fates = {f.node.name: f.status for f in build.nodes}
    assert {n for n, s in fates.items() if s == "fused"} == fused
    assert {n for n, s in fates.items() if s == "folded"} == {n.name for n in onnx.load(d / "a.onnx").graph.node} - built
    conv = next(lo for lo in build.layers if "/c1/Conv" in [n.name for n in lo.nodes])
    assert conv.layer.overlay["precision"] == "fp16" and "/Relu" in [n.name for n in conv.nodes]
    assert any(lo.status == "inserted" for lo in build.layers)      # the casts into and out of FP16
    assert kiln_main(["diff", str(d / "a.onnx"), str(fp16_engine)]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("fused /c1/Conv (") and "fp16" in line and "/Relu (Relu)" in line
               for line in out.splitlines())
    # the engine beside another model: c2 without padding gives other shapes
    assert kiln_main(["diff", str(fp16_engine), str(d / "c.onnx"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "build" and doc["differs"] and doc["shapes"]


def test_fp32_and_fp16_engines_differ_in_precision(exports, fp16_engine):
    d, _, _ = exports
    fp32 = kiln.build(kiln.onnx.parse(str(d / "a.onnx")), kiln.BuildConfig(device="cpu"))
    fp32.save(str(d / "a32.kiln"))
    diff = diff_models(open_model(d / "a32.kiln"), open_model(fp16_engine))
    conv = next(c for c in diff.nodes if c.a is not None and c.a.name == "/c1/Conv")
    assert conv.status == "changed"
    prec = [(x.a, x.b) for x in conv.details if (x.kind, x.name) == ("overlay", "precision")]
    assert prec == [("fp32", "fp16")]
    assert any(c.status == "added" and c.node.op_type == "Cast" for c in diff.nodes)
    assert np.isfinite([x.stats["max_abs"] for x in conv.details if x.kind == "weight" and x.stats]).all()


def test_nodes_run_as_plugins(tmp_path, capsys):
    """GridSample runs as Kiln's built-in plugin: the build explanation says so for the node and its layer."""
    nodes = [helper.make_node("GridSample", ["x", "grid"], ["g"], name="/sample/GridSample", align_corners=0),
             helper.make_node("Relu", ["g"], ["y"], name="/act/Relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4]),
                                       helper.make_tensor_value_info("grid", onnx.TensorProto.FLOAT, [1, 3, 3, 2])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 3, 3])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 16)]), tmp_path / "gs.onnx")
    kiln.build(kiln.onnx.parse(str(tmp_path / "gs.onnx")), kiln.BuildConfig(device="cpu")).save(str(tmp_path / "gs.kiln"))
    kinds = {l["name"]: l["kind"] for l in kiln.engine.read_header(str(tmp_path / "gs.kiln"))["layers"]}
    assert kinds["/sample/GridSample"] == "Plugin"
    build = explain_build(open_model(tmp_path / "gs.onnx"), open_model(tmp_path / "gs.kiln"))
    assert {f.node.name: f.status for f in build.nodes} == {"/sample/GridSample": "plugin", "/act/Relu": "kept"}
    assert build.counts()["layers"]["plugin"] == 1
    assert kiln_main(["diff", str(tmp_path / "gs.onnx"), str(tmp_path / "gs.kiln")]) == 0
    assert "plugin /sample/GridSample (Plugin) [fp32, torch] ← /sample/GridSample (GridSample)" in \
        capsys.readouterr().out.splitlines()


def test_kiln_view_two_models(exports, tmp_path, capsys):
    from kiln.viewer import command
    d, _, _ = exports
    out = tmp_path / "ab.html"
    assert command.main(["view", str(d / "a.onnx"), str(d / "b.onnx"), "--export", str(out)]) == 0
    html = out.read_text()
    assert '"diff":{"mode":"models"' in html and 'src="static/diff.js"' not in html and "Kiln.diff" in html
    assert command.main(["view", str(d / "a.onnx"), str(d / "b.onnx"), "--profile", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--profile" in err and "two models" in err
    assert command.main(["view", str(d / "a.onnx"), str(tmp_path / "missing.onnx"), "--export", str(out)]) == 2
    assert "missing.onnx" in capsys.readouterr().err
