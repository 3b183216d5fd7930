"""Caffe2 files as real writers lay them out, beyond test_caffe2.py's: nets named as Detectron and detectron2 save
them (<name>.pb or <name>.pbtxt, weights in <name>_init.pb), and repeated int64 arguments written unpacked (proto2's
default, which Caffe2 uses) with negative values."""
from __future__ import annotations

import numpy as np

from kiln.viewer.formats import detect, open_model

from ._pbwrite import f, msg, rep
from .conftest import input_weight
from .test_caffe2 import arg, init_net, op, predict_net

PBTXT = """name: "tiny"
op { input: "data" input: "fc_w" input: "fc_b" output: "fc" type: "FC" }
op { input: "fc" output: "prob" type: "Softmax" }
external_input: "data"
external_input: "fc_w"
external_input: "fc_b"
external_output: "prob"
"""


def test_detectron_names_pair_predict_and_init(tmp_path):
    (tmp_path / "model.pb").write_bytes(predict_net())
    (tmp_path / "model_init.pb").write_bytes(init_net())
    for opened in ("model.pb", "model_init.pb"):        # either file shows the predict net with its weights
        model = open_model(tmp_path / opened)
        g = model.graph
        assert model.properties["init_net"] == "model_init.pb" and model.path.endswith("model.pb")
        assert [n.op_type for n in g.nodes] == ["Conv", "Relu", "FC", "Softmax"]
        assert input_weight(g, g.nodes[0], "filter").load()[1, 2, 2, 2] == 53
        assert [t.name for t in g.inputs] == ["data"]


def test_detectron2_text_predict_net_takes_binary_init(tmp_path):
    (tmp_path / "model.pbtxt").write_text(PBTXT)
    (tmp_path / "model_init.pb").write_bytes(init_net())
    g = open_model(tmp_path / "model.pbtxt").graph
    assert [n.op_type for n in g.nodes] == ["FC", "Softmax"]
    assert input_weight(g, g.nodes[0], "W").load().tolist() == [[1.0, 1.0]] * 4
    assert open_model(tmp_path / "model_init.pb").graph.nodes[0].op_type == "FC"


def test_init_net_beside_another_format_opens_alone(tmp_path):
    """A <name>.pb that is not a NetDef (a TensorFlow GraphDef, say) is not taken as the predict net."""
    node = b"\x0a\x05input\x12\x0bPlaceholder"                      # NodeDef { name: "input" op: ... }
    (tmp_path / "model.pb").write_bytes(b"\x0a" + bytes([len(node)]) + node)     # GraphDef { node }
    assert detect(tmp_path / "model.pb").name == "TensorFlow"
    (tmp_path / "model_init.pb").write_bytes(init_net())
    model = open_model(tmp_path / "model_init.pb")
    assert "init_net" not in model.properties and model.graph.nodes[0].op_type == "GivenTensorFill"


def test_negative_int64_lists(tmp_path):
    """int64 is two's complement on the wire: Reshape's shape [1, -1] is [1, -1] unpacked or packed, and a
    GivenTensorInt64Fill's negative values are negative."""
    net = msg(op("Reshape", ["x", "w"], ["y", "old_shape"], arg("shape", rep(6, [1, -1]))),
              op("Transpose", ["y"], ["t"], arg("axes", f(6, [-1, 0], "packed_i"))),
              rep(7, ["x", "w"]), f(8, "t"))
    init = msg(op("GivenTensorInt64Fill", [], ["w"], arg("shape", rep(6, [3])),
                  arg("values", rep(6, [-5, 0, 1 << 40]))))
    (tmp_path / "predict_net.pb").write_bytes(net)
    (tmp_path / "init_net.pb").write_bytes(init)
    g = open_model(tmp_path / "predict_net.pb").graph
    assert g.nodes[0].attributes == {"shape": [1, -1]} and g.nodes[1].attributes == {"axes": [-1, 0]}
    w = g.weights["w"].load()
    assert w.dtype == np.int64 and w.tolist() == [-5, 0, 1 << 40]
