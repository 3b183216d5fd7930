"""Parallel 8-bit GEMMs over one tensor of codes merge into one (passes/fuse_parallel_qlinear.py): a BERT-style
query/key/value projection after Kiln's --int8 and the Q/DQ fold becomes one QFullyConnected and a Split, and the
engine matches the same network run dequantized (an independent path: float GEMMs on dequantized values)."""
from __future__ import annotations

import importlib

import numpy as np
import onnx
from onnx import TensorProto, helper

import kiln
import kiln.onnx
from kiln.builder.quant import quantize

from _quant_models import _model

build_module = importlib.import_module("kiln.builder.build")


def _projections(seed: int = 0, d: int = 16, mixed: bool = False) -> onnx.ModelProto:
    """x[N, S, d] -> q, k, v = x @ Wq + bq, x @ Wk + bk, x @ Wv + bv (outputs). ``mixed``: v is relu(x @ Wv + bv)
    and an output o = k @ Wo reads k (so k's layer also writes codes): no two projections have equal epilogues."""
    rng = np.random.default_rng(seed)
    inits = {f"W{n}": (rng.standard_normal((d, d)) / d ** 0.5).astype(np.float32) for n in "qkvo"}
    inits.update({f"b{n}": rng.standard_normal(d).astype(np.float32) for n in "qkv"})
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["mq"]), helper.make_node("Add", ["mq", "bq"], ["q"]),
             helper.make_node("MatMul", ["x", "Wk"], ["mk"]), helper.make_node("Add", ["mk", "bk"], ["k"]),
             helper.make_node("MatMul", ["x", "Wv"], ["mv"]),
             helper.make_node("Add", ["mv", "bv"], ["av" if mixed else "v"]),
             *([helper.make_node("Relu", ["av"], ["v"])] if mixed else []),
             *([helper.make_node("MatMul", ["k", "Wo"], ["o"])] if mixed else [])]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4, d]) for n in ("qkvo" if mixed else "qkv")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, d])], outs, inits)


def test_qkv_projections_merge_and_match_the_dequantized_network(monkeypatch):
    rng = np.random.default_rng(3)
    calib = rng.standard_normal((8, 4, 16)).astype(np.float32)
    x = rng.standard_normal((3, 4, 16)).astype(np.float32)
    shapes = {"x": x.shape}
    qnet = quantize(kiln.onnx.parse(_projections()), kiln.BuildConfig(device="cpu", quantize="int8",
                                                                      calibration=[{"x": calib}], calibrator="max",
                                                                      profiles=shapes))
    ref = kiln.build(qnet, kiln.BuildConfig(device="cpu", profiles=shapes)).context().run({"x": x})
    monkeypatch.setattr(build_module, "folds_quantization", lambda device, config: True)
    engine = kiln.build(qnet, kiln.BuildConfig(device="cpu", profiles=shapes))
    q8 = [layer for layer in engine.layers if layer["kind"] == "QFullyConnected"]
    merged = [layer for layer in q8 if len(layer["attrs"]["w_scale"]["__array__"]["data"]) == 16 * 3]
    assert len(q8) == 1 and len(merged) == 1           # q, k, v in one
    split = next(layer for layer in engine.layers if layer["kind"] == "Split")
    assert split["inputs"][0] == merged[0]["outputs"][0] and split["attrs"]["split"] == [16, 16, 16]
    got = engine.context().run({"x": x})
    ws = np.asarray(merged[0]["attrs"]["w_scale"]["__array__"]["data"], np.float64)
    for i, name in enumerate("qkv"):
        # the same codes and scales as the dequantized run; its float bias became int32 codes of x_scale * w_scale:
        # half a code per column, plus float32 rounding
        bound = 0.5 * merged[0]["attrs"]["x_scale"] * ws[16 * i:16 * (i + 1)] + 1e-5 * np.abs(ref[name]).max()
        assert np.all(np.abs(got[name] - ref[name]) <= bound), name


def test_layers_with_different_epilogues_stay_apart(monkeypatch):
    """k's output is also requantized for o's GEMM (a second, codes output) and v has a ReLU epilogue: no two of
    q, k, v are alike, so none merge, and the engine still matches the dequantized network."""
    rng = np.random.default_rng(4)
    calib = rng.standard_normal((8, 4, 16)).astype(np.float32)
    x = rng.standard_normal((2, 4, 16)).astype(np.float32)
    shapes = {"x": x.shape}
    qnet = quantize(kiln.onnx.parse(_projections(seed=1, mixed=True)), kiln.BuildConfig(
        device="cpu", quantize="int8", calibration=[{"x": calib}], calibrator="max", profiles=shapes))
    ref = kiln.build(qnet, kiln.BuildConfig(device="cpu", profiles=shapes)).context().run({"x": x})
    monkeypatch.setattr(build_module, "folds_quantization", lambda device, config: True)
    engine = kiln.build(qnet, kiln.BuildConfig(device="cpu", profiles=shapes))
    assert [layer["kind"] for layer in engine.layers].count("QFullyConnected") == 4
    assert "Split" not in [layer["kind"] for layer in engine.layers]
    got = engine.context().run({"x": x})
    for name in "qkvo":
        assert np.abs(got[name] - ref[name]).max() <= 2e-2 * np.abs(ref[name]).max(), name
