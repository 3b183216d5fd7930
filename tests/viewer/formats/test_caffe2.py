"""Caffe2 predict_net.pb + init_net.pb written by field number from caffe2.proto."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.viewer.formats import open_model

from ._pbwrite import f, msg, rep
from .conftest import check_damaged, check_detect, check_export, edges, input_weight


def arg(name, *fields):
    return f(5, msg(f(1, name), *fields))


def op(type_, inputs, outputs, *args, name=None):
    return f(2, msg(rep(1, inputs), rep(2, outputs), *( [f(3, name)] if name else []), f(4, type_), *args))


def predict_net():
    return msg(f(1, "tiny"),
               op("Conv", ["data", "conv_w", "conv_b"], ["conv"], arg("kernel", f(3, 3)), arg("order", f(4, "NCHW"))),
               op("Relu", ["conv"], ["conv"]),   # in place
               op("FC", ["conv", "fc_w", "fc_b"], ["fc"]),
               op("Softmax", ["fc"], ["prob"]),
               rep(7, ["data", "conv_w", "conv_b", "fc_w", "fc_b"]), f(8, "prob"))


def init_net():
    def fill(out, shape, values):
        return op("GivenTensorFill", [], [out], arg("shape", rep(6, shape)), arg("values", f(5, values, "packed_f")))
    return msg(f(1, "tiny_init"),
               fill("conv_w", [2, 3, 3, 3], np.arange(54)), fill("conv_b", [2], [1, 2]),
               fill("fc_w", [4, 2], np.ones(8)), fill("fc_b", [4], np.zeros(4)))


@pytest.fixture
def nets(tmp_path):
    (tmp_path / "predict_net.pb").write_bytes(predict_net())
    (tmp_path / "init_net.pb").write_bytes(init_net())
    return tmp_path


def test_predict_with_init_weights(nets):
    model = open_model(nets / "predict_net.pb")
    g = model.graph
    assert model.format == "Caffe2" and model.properties["init_net"] == "init_net.pb"
    assert [n.op_type for n in g.nodes] == ["Conv", "Relu", "FC", "Softmax"]
    assert edges(g) == {("conv", "conv"), ("conv", "fc"), ("fc", "prob")}   # Relu is named after its output
    assert g.nodes[1].inputs[0].values == ["conv"] and g.nodes[1].outputs[0].values == ["conv:1"]
    assert [t.name for t in g.inputs] == ["data"] and [t.name for t in g.outputs] == ["prob"]
    conv = g.nodes[0]
    assert conv.attributes == {"kernel": 3, "order": "NCHW"} and conv.category == "conv"
    w = input_weight(g, conv, "filter")
    assert w.shape == [2, 3, 3, 3] and w.load()[1, 2, 2, 2] == 53
    assert g.weights["conv_b"].load().tolist() == [1, 2]
    assert open_model(nets / "init_net.pb").graph.nodes[0].op_type == "Conv"   # init net opens its predict net


def test_predict_alone_and_text(tmp_path):
    p = tmp_path / "model.pb"
    p.write_bytes(predict_net())
    g = open_model(p).graph
    assert len(g.nodes) == 4 and not g.weights
    t = tmp_path / "predict_net.pbtxt"
    t.write_text('name: "t"\nop { input: "x" output: "y" type: "Relu" }\n'
                 'op { input: "y" output: "z" type: "Sigmoid" arg { name: "a" i: 2 } }\nexternal_input: "x"\n')
    g = open_model(t).graph
    assert [n.op_type for n in g.nodes] == ["Relu", "Sigmoid"] and edges(g) == {("y", "z")}
    assert g.nodes[1].attributes == {"a": 2}


def test_detect_damage_export(nets, tmp_path):
    check_detect(nets / "predict_net.pb", tmp_path, "Caffe2", ".caffemodel")
    check_damaged(nets / "predict_net.pb", tmp_path, magic_len=2, cuts=(3, 0.3))
    check_export(open_model(nets / "predict_net.pb"), tmp_path)
