"""Per-layer FP32 constraints in FP16/BF16 builds (BuildConfig.fp32_layers, ``--fp32-layers``): the
matched layers keep FP32 weights and FP32 inputs, casts sit only where precisions meet, and outputs
agree with ONNX Runtime. Runs on the CPU: the precision rewrite is the same on CUDA."""
from __future__ import annotations


import numpy as np
import onnxruntime as ort
import pytest
import torch

import kiln
from kiln.errors import BuildError

from _kiln_cli import run_cli
from _models import onnx_bytes


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(16, 8, 1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y))
        y = torch.relu(self.conv3(y)).mean((2, 3))
        return self.fc(y)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12) * 3
    data = onnx_bytes(_Net().eval(), x)
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    return data, x.numpy(), ref


def _build(data, **kw):
    return kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu", precision="fp16", **kw))


def _rel(a, b) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


def _layer(engine, origin_part: str):
    return next(layer for layer in engine.layers if any(origin_part in o for o in layer.get("origin", [layer["name"]]))
                or origin_part in layer["name"])


def test_every_layer_fp32_is_an_fp32_engine(model):
    data, x, ref = model
    engine = _build(data, fp32_layers=("*",))
    assert {layer["precision"] for layer in engine.layers} == {"fp32"}
    assert not any(layer["kind"] == "Cast" for layer in engine.layers)      # nothing rounds through FP16
    got = engine.context().run({"x": x})
    assert _rel(next(iter(got.values())), ref) < 1e-5


def test_first_layer_fp32_reads_the_input_unrounded(model):
    data, x, ref = model
    plain = _build(data)
    engine = _build(data, fp32_layers=("/conv1/*",))
    conv1 = _layer(engine, "/conv1/")
    assert conv1["precision"] == "fp32" and conv1["inputs"][0] == "x"         # no cast in front of it
    assert engine._host_weights[engine.plan["weights"][conv1["inputs"][1]]].dtype == np.float32   # FP32 weights
    conv2 = _layer(engine, "/conv2/")
    assert engine._host_weights[engine.plan["weights"][conv2["inputs"][1]]].dtype == np.float16
    after = [layer for layer in engine.layers if layer["kind"] == "Cast" and conv1["outputs"][0] in layer["inputs"]]
    assert len(after) == 1 and after[0]["attrs"]["to"] == "float16"        # one cast where FP32 meets FP16
    others = [layer for layer in engine.layers if layer is not conv1 and layer["kind"] not in ("Cast",)]
    assert all(layer["precision"] != "fp32" for layer in others)
    got = next(iter(engine.context().run({"x": x}).values()))
    base = next(iter(plain.context().run({"x": x}).values()))
    assert _rel(got, ref) < 2e-2 and _rel(base, ref) < 2e-2
    assert engine.header["build"]["fp32_layers"] == ["/conv1/*"]


def test_two_fp32_neighbours_pass_fp32_between_them(model):
    data, x, ref = model
    engine = _build(data, fp32_layers=("/conv1/*", "/conv2/*"))
    conv1, conv2 = _layer(engine, "/conv1/"), _layer(engine, "/conv2/")
    assert conv2["inputs"][0] == conv1["outputs"][0]                          # no FP16 round trip
    assert _rel(next(iter(engine.context().run({"x": x}).values())), ref) < 2e-2


@pytest.mark.parametrize("kw, match", [
    ({"fp32_layers": ("/conv9/*",)}, "matches no layer"),
    ({"fp32_layers": ("*",), "precision": "fp32"}, "FP16 or BF16 build"),
])
def test_bad_constraints_are_one_line_errors(model, kw, match):
    data = model[0]
    with pytest.raises(BuildError, match=match) as err:
        kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(**{"device": "cpu", "precision": "fp16", **kw}))
    assert "\n" not in str(err.value)


def test_cli_build_and_round_trip(model, tmp_path):
    data, x, ref = model
    src = tmp_path / "net.onnx"
    src.write_bytes(data)
    out = tmp_path / "net.kiln"
    run = run_cli("build", src, "-o", out, "--device", "cpu", "--fp16", "--fp32-layers", "/conv1/*,/fc/*", "-q")
    assert run.returncode == 0, run.stderr[-2000:]
    engine = kiln.load(out)
    assert engine.header["build"]["fp32_layers"] == ["/conv1/*", "/fc/*"]
    assert _layer(engine, "/conv1/")["precision"] == "fp32" and _layer(engine, "/fc/")["precision"] == "fp32"
    assert _rel(next(iter(engine.context().run({"x": x}).values())), ref) < 2e-2
    shown = run_cli("inspect", out)
    assert "FP32 layers (--fp32-layers): /conv1/*, /fc/*" in shown.stdout
    bad = run_cli("build", src, "-o", tmp_path / "b.kiln", "--device", "cpu", "--fp16", "--fp32-layers", "/nope/*",
                  "-q")
    assert bad.returncode != 0 and "matches no layer" in bad.stderr
    assert not (tmp_path / "b.kiln").exists()


@pytest.mark.gpu
def test_gpu_fp32_layers_are_exact_fp32(model):
    """On CUDA an FP16 engine runs its FP32 layers without TF32: with every layer constrained it
    matches ONNX Runtime's FP32 to FP32 rounding; with the first one only, the rest stays FP16."""
    data, x, ref = model
    every = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cuda", precision="fp16", fp32_layers=("*",)))
    assert _rel(next(iter(every.context().run({"x": x}).values())), ref) < 1e-5
    first = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cuda", precision="fp16",
                                                               fp32_layers=("/conv1/*",)))
    assert _layer(first, "/conv1/")["precision"] == "fp32" and _layer(first, "/conv2/")["precision"] == "fp16"
    assert _rel(next(iter(first.context().run({"x": x}).values())), ref) < 2e-2


def test_compare_takes_the_constraint(model, tmp_path):
    """kiln.compare builds with the patterns: with every layer in FP32 the FP16 build meets FP32's tolerance."""
    data, x, _ = model
    src = tmp_path / "net.onnx"
    src.write_bytes(data)
    result = kiln.compare(str(src), precision="fp16", device="cpu", inputs={"x": x}, atol=1e-5, rtol=1e-5,
                          fp32_layers=("*",))
    assert result.passed
    loose = kiln.compare(str(src), precision="fp16", device="cpu", inputs={"x": x}, atol=1e-5, rtol=1e-5)
    assert not loose.passed          # the same tolerance fails the plain FP16 build


def test_inspect_lists_an_onnx_models_node_names(model, tmp_path, capsys):
    """The names --fp32-layers patterns match: `kiln inspect MODEL.onnx` lists every node."""
    import json

    import kiln.cli
    src = tmp_path / "net.onnx"
    src.write_bytes(model[0])
    assert kiln.cli.main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "Inputs:  x:float32[2, 3, 12, 12]" in text and "/conv1/Conv  [Conv]  x -> " in text
    assert kiln.cli.main(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [n["op"] for n in info["nodes"]][:2] == ["Conv", "Relu"] and info["outputs"][0]["shape"] == [2, 5]
    (tmp_path / "junk.bin").write_bytes(b"\x08\x01garbage\xff\xff")
    assert kiln.cli.main(["inspect", str(tmp_path / "junk.bin")]) == 2
    assert "neither a Kiln engine nor" in capsys.readouterr().err
