"""kiln inspect on an INT8 engine: each quantized layer's activation scale equals the calibration cache's amax / 127
and its weight's per-channel scales (count, min, max) equal numpy's max|w| / 127 per output channel of the ONNX
weights; the Q/DQ layers show the scale stored in the engine; a damaged quantization record is ignored with a
line saying why, never trusted."""
from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from kiln.engine.quant_record import engine_notes
from kiln.engine import read_engine, write_engine

from _quant_cli import kiln_cli
from _quant_models import cnn

# the quantized layers (conv1 reads the 3 image channels: a stem, left float), output channels on axis 0
WEIGHTS = {"conv2": ("w2", (1, 2, 3)), "fc": ("wf", (1,))}
ACTS = {"conv2": "r1", "fc": "f"}
NUM = r"([-+0-9.e]+)"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("inspect")
    model = cnn(seed=3)
    onnx.save(model, d / "cnn.onnx")
    np.save(d / "calib.npy", np.random.default_rng(5).standard_normal((8, 3, 8, 8)).astype(np.float32))
    r = kiln_cli("build", "cnn.onnx", "--int8", "--calib", "calib.npy", "--calib-cache", "c.json", "--no-smoothing",
              "--device", "cpu", "--shapes", "x:4x3x8x8", "-o", "cnn.kiln", "-q", cwd=d)    # the ONNX weights as given
    assert r.returncode == 0, r.stderr[-2000:]
    amax = json.loads((d / "c.json").read_text())["amax"]
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    return d, amax, inits


def _close(text: str, want: float) -> None:
    """A value printed with 6 significant digits."""
    assert abs(float(text) - want) <= 1e-5 * abs(want), (text, want)


def test_inspect_prints_the_calibration_scales(built):
    d, amax, inits = built
    r = kiln_cli("inspect", "cnn.kiln", cwd=d)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    for layer, (w, axes) in WEIGHTS.items():
        i = next(k for k, ln in enumerate(lines) if re.match(rf"\s+\d+ {layer} ", ln))
        note = next(ln for ln in lines[i + 1:i + 6] if "int8:" in ln)
        m = re.search(rf"int8: input '{ACTS[layer]}' scale {NUM}; weight '[^']+' (\d+) per-channel scales \(axis 0\) "
                      rf"min {NUM} max {NUM}", note)
        assert m, note
        _close(m.group(1), float(np.float32(amax[ACTS[layer]] / 127.0)))
        per_channel = np.abs(inits[w]).max(axis=axes) / 127.0
        assert int(m.group(2)) == per_channel.size
        _close(m.group(3), per_channel.min())
        _close(m.group(4), per_channel.max())
    # each QuantizeLinear shows the scale the engine stores, the cache's amax / 127 again
    qs = [k for k, ln in enumerate(lines) if "[QuantizeLinear]" in ln]
    assert len(qs) == len(ACTS)
    for k in qs:
        tensor = re.search(r"in:  ([^:]+):", lines[k + 1]).group(1)
        _close(re.search(rf"^\s+scale {NUM}$", lines[k + 4]).group(1), float(np.float32(amax[tensor] / 127.0)))
    r = kiln_cli("inspect", "cnn.kiln", "--json", cwd=d)
    layers = {layer["name"]: layer for layer in json.loads(r.stdout)["layers"]}
    assert layers["fc"]["scales"].startswith("int8: input 'f' scale ")


def test_damaged_record_is_ignored_with_a_reason(built, tmp_path):
    """A record that breaks its schema (a negative weight scale, a string where a scale goes) is not shown as
    scales; the Q/DQ layers' own scales still are."""
    d, amax, _ = built
    header, weights = read_engine(str(d / "cnn.kiln"))
    for bad in ({"weight": {"min": -1.0}}, {"inputs": {"r1": "1e-3; rm -rf /"}}):
        h = json.loads(json.dumps(header))
        for key, value in bad.items():
            h["build"]["quantization"]["layers"]["conv2"][key].update(value)
        h.pop("weights")
        write_engine(str(tmp_path / "bad.kiln"), h, dict(weights))
        r = kiln_cli("inspect", "bad.kiln", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "quantization record ignored: quantized layer 'conv2' has malformed" in r.stdout
        assert "int8:" not in r.stdout and "rm -rf" not in r.stdout
        assert sum(bool(re.match(r"^\s+scale [0-9.e-]+$", ln)) for ln in r.stdout.splitlines()) == 2 * len(ACTS)


def test_folded_layer_scales_from_attrs():
    """An 8-bit layer folded from Q/DQ carries its scales as (schema-checked) attributes."""
    header = {"precision": "fp16", "build": {}, "plan": {"weights": {}},
              "tensors": {"xq": {"dtype": "int8"}},
              "layers": [{"name": "c", "kind": "QConvolution", "inputs": ["xq", "w", "b"], "outputs": ["y"],
                          "attrs": {"x_scale": 0.5, "out_scale": None,
                                    "w_scale": {"__array__": {"dtype": "float32", "shape": [3],
                                                              "data": [0.25, 0.125, 1.0]}}}}]}
    notes, summary = engine_notes(header, {})
    assert summary is None
    assert notes == ["int8: input scale 0.5; weight 3 per-channel scales min 0.125 max 1"]


def test_record_schema_is_closed():
    """Every field of the record is typed: a bool or NaN for a number, an unknown or missing key, a kept layer
    that is not a name, an unknown metric: each is a problem that names where it is."""
    from kiln.engine.quant_record import record_problem
    good_layer = {"type": "int8", "inputs": {"x": 0.01},
                  "weight": {"tensor": "w", "axis": 0, "count": 4, "min": 0.001, "max": 0.002}}
    good_acc = {"target": "rel_l2<=0.1", "metric": "rel_l2", "achieved": 0.05, "all_quantized": None, "kept": ["a"],
                "quantized": 3, "samples": 8}
    assert record_problem({"mode": "int8", "layers": {"c": good_layer}, "accuracy": good_acc}) is None

    def layer(**change):
        rec = json.loads(json.dumps(good_layer))
        for k, v in change.items():
            (rec["weight"] if k in good_layer["weight"] else rec)[k] = v
        return {"layers": {"c": rec}}

    def acc(**change):
        return {"accuracy": {**good_acc, **change}}
    bad = [layer(type="int4"), layer(inputs={"x": True}), layer(inputs={"x": float("nan")}), layer(inputs={"x": 0.0}),
           layer(count=0), layer(axis=-1), layer(min=0.003), layer(max=float("inf")), layer(tensor=3),
           {"layers": {"c": {**good_layer, "extra": 1}}}, {"layers": []}, [],
           acc(metric="rmse"), acc(kept=[1]), acc(achieved="0.1"), acc(samples=-1), {"accuracy": {"target": "x"}}]
    for q in bad:
        why = record_problem(q)
        assert why and "\n" not in why, q
