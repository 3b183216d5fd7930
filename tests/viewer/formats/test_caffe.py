"""Caffe prototxt (text) and caffemodel (binary, V1 and V2) files, written by field number from caffe.proto."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import ViewerError
from kiln.viewer.formats import open_model

from ._pbwrite import f, msg, rep
from .conftest import check_damaged, check_detect, check_export, edges, input_weight, node

PROTOTXT = '''name: "TinyNet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 2 kernel_size: 3 stride: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }   # in place
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 4 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
'''


def blob(shape, values):
    return msg(f(7, f(1, list(shape), "packed_i")), f(5, list(values), "packed_f"))


def v2_layer(name, type_, bottoms, tops, *extra):
    return f(100, msg(f(1, name), f(2, type_), rep(3, bottoms), rep(4, tops), *extra))


def caffemodel_v2():
    conv_w = np.arange(54, dtype=np.float32)
    return msg(
        f(1, "TinyNet"),
        v2_layer("data", "Input", [], ["data"], f(143, f(1, f(1, [1, 3, 8, 8], "packed_i")))),
        v2_layer("conv1", "Convolution", ["data"], ["conv1"], f(7, blob([2, 3, 3, 3], conv_w)),
                 f(7, blob([2], [0.25, -0.25])), f(106, msg(f(1, 2), f(4, 3), f(6, 1)))),
        v2_layer("relu1", "ReLU", ["conv1"], ["conv1"]),
        v2_layer("pool1", "Pooling", ["conv1"], ["pool1"], f(121, msg(f(1, 0), f(2, 2), f(3, 2)))),
        v2_layer("fc", "InnerProduct", ["pool1"], ["fc"], f(7, blob([4, 18], np.ones(72))), f(117, f(1, 4))),
        v2_layer("prob", "Softmax", ["fc"], ["prob"]),
    )


def caffemodel_v1():
    def layer(name, type_, bottoms, tops, *extra):
        return f(2, msg(rep(2, bottoms), rep(3, tops), f(4, name), f(5, type_), *extra))
    legacy_blob = msg(f(1, 2), f(2, 3), f(3, 3), f(4, 3), f(5, list(np.arange(54) * 0.5), "packed_f"))
    return msg(f(1, "OldNet"), f(3, "data"), f(4, 1), f(4, 3), f(4, 8), f(4, 8),
               layer("conv1", 4, ["data"], ["conv1"], f(6, legacy_blob), f(10, msg(f(1, 2), f(4, 3)))),
               layer("relu1", 18, ["conv1"], ["conv1"]),
               layer("pool1", 17, ["conv1"], ["pool1"], f(19, msg(f(1, 1), f(2, 2)))))


def _check_v2(g, with_weights=True):
    assert [n.op_type for n in g.nodes] == ["Convolution", "ReLU", "Pooling", "InnerProduct", "Softmax"]
    assert edges(g) == {("conv1", "relu1"), ("relu1", "pool1"), ("pool1", "fc"), ("fc", "prob")}
    assert g.inputs[0].name == "data" and g.inputs[0].shape == [1, 3, 8, 8]
    conv = node(g, "conv1")
    assert conv.attributes["num_output"] == 2 and conv.attributes["kernel_size"] == 3
    assert node(g, "pool1").attributes["pool"] == "MAX" and node(g, "pool1").category == "pooling"
    assert node(g, "relu1").category == "activation"
    if with_weights:
        w = input_weight(g, conv, "weights")
        assert w.shape == [2, 3, 3, 3] and w.load()[1, 2, 2, 2] == 53
        assert input_weight(g, conv, "bias").load().tolist() == [0.25, -0.25]


def test_binary_v2(tmp_path):
    p = tmp_path / "tiny.caffemodel"
    p.write_bytes(caffemodel_v2())
    model = open_model(p)
    assert model.format == "Caffe" and model.version == "V2 layers"
    _check_v2(model.graph)


def test_prototxt_with_caffemodel_weights(tmp_path):
    p = tmp_path / "tiny.prototxt"
    p.write_text(PROTOTXT)
    _check_v2(open_model(p).graph, with_weights=False)
    (tmp_path / "tiny.caffemodel").write_bytes(caffemodel_v2())
    _check_v2(open_model(p).graph, with_weights=True)


def test_v1_binary_and_text(tmp_path):
    p = tmp_path / "old.caffemodel"
    p.write_bytes(caffemodel_v1())
    model = open_model(p)
    g = model.graph
    assert model.version == "V1 layers"
    assert [n.op_type for n in g.nodes] == ["Convolution", "ReLU", "Pooling"]
    assert edges(g) == {("conv1", "relu1"), ("relu1", "pool1")}
    assert g.inputs[0].shape == [1, 3, 8, 8]
    assert node(g, "pool1").attributes["pool"] == "AVE"
    w = input_weight(g, node(g, "conv1"), "weights")
    assert w.shape == [2, 3, 3, 3] and w.load()[0, 0, 0, 3 - 2] == 0.5
    t = tmp_path / "old.prototxt"
    t.write_text('name: "OldNet"\ninput: "data"\ninput_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n'
                 'layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"\n'
                 '  convolution_param { num_output: 2 kernel_size: 3 } }\n'
                 'layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }\n')
    g = open_model(t).graph
    assert [n.op_type for n in g.nodes] == ["Convolution", "ReLU"]
    assert input_weight(g, node(g, "conv1"), "weights").load()[0, 0, 0, 1] == 0.5


def test_detect_damage_export(tmp_path):
    p = tmp_path / "tiny.caffemodel"
    p.write_bytes(caffemodel_v2())
    check_detect(p, tmp_path, "Caffe", ".pb")
    t = tmp_path / "net.prototxt"
    t.write_text(PROTOTXT)
    check_detect(t, tmp_path, "Caffe", ".txt")
    v1 = tmp_path / "v1.caffemodel"
    v1.write_bytes(caffemodel_v1())
    check_detect(v1, tmp_path, "Caffe", ".bin")
    check_damaged(p, tmp_path, magic_len=2)
    check_damaged(v1, tmp_path, magic_len=2)
    check_damaged(t, tmp_path, magic_len=10, cuts=(0.5,), strict_random=True)
    check_export(open_model(p), tmp_path)


def test_fields_outside_the_schema(tmp_path):
    """Unknown fields are legal protobuf: a CaffeOnSpark-style first layer (field 10001) and SSD-style
    parameters (field 206) in V2, an unknown field in a V1 layer with unpacked blob floats, all open."""
    fork = f(10001, msg(f(1, "com.yahoo.ml.caffe.ImageDataSource")))
    first = v2_layer("data", "MemoryData", [], ["data", "label"], f(8, f(1, 0)), f(10, 0),
                     f(119, msg(f(1, 32), f(2, 3), f(3, 8), f(4, 8))), fork)
    v2 = caffemodel_v2().replace(f(1, "TinyNet"), f(1, "TinyNet") + first, 1)
    v2 += v2_layer("norm", "Normalize", ["prob"], ["norm"], f(206, msg(f(2, 1), f(3, 1e-10))))
    p = tmp_path / "fork.caffemodel"
    p.write_bytes(v2)
    g = open_model(p).graph
    assert [n.op_type for n in g.nodes][:2] == ["MemoryData", "Convolution"] and node(g, "norm").op_type == "Normalize"
    assert input_weight(g, node(g, "conv1"), "weights").load()[1, 2, 2, 2] == 53

    unpacked = msg(f(1, 1), f(2, 1), f(3, 1), f(4, 3), *[f(5, float(x)) for x in (1.5, 2.5, 3.5)])
    v1 = msg(f(1, "OldNet"), f(3, "data"), *[f(4, d) for d in (1, 1, 1, 3)],
             f(2, msg(f(2, "data"), f(3, "ip"), f(4, "ip"), f(5, 14), f(6, unpacked), f(17, f(1, 1)), f(60, 7))),
             f(2, msg(f(2, "ip"), f(3, "prob"), f(4, "prob"), f(5, 20))))
    p1 = tmp_path / "old.caffemodel"
    p1.write_bytes(v1)
    m = open_model(p1)
    assert m.version == "V1 layers" and [n.op_type for n in m.graph.nodes] == ["InnerProduct", "Softmax"]
    assert input_weight(m.graph, node(m.graph, "ip"), "weights").load().ravel().tolist() == [1.5, 2.5, 3.5]


def test_opencv_fp16_raw_data(tmp_path):
    """cv.dnn.shrinkCaffeModel stores blobs as FP16 bytes (raw_data = 12, raw_data_type = 10 with FLOAT16 = 2):
    the weights show as float16 with their values; a blob whose bytes do not fill its shape is refused."""
    w = (np.arange(54, dtype=np.float32) / 8 - 3).astype(np.float16)
    fp16 = msg(f(7, f(1, [2, 3, 3, 3], "packed_i")), f(10, 2), f(12, w.astype("<f2").tobytes()))
    bias = msg(f(7, f(1, [2], "packed_i")), f(10, 2), f(12, np.array([0.5, -2], "<f2").tobytes()))
    net = msg(f(1, "Shrunk"), v2_layer("conv1", "Convolution", ["data"], ["conv1"], f(7, fp16), f(7, bias)))
    p = tmp_path / "shrunk.caffemodel"
    p.write_bytes(net)
    g = open_model(p).graph
    weights = input_weight(g, node(g, "conv1"), "weights")
    assert weights.dtype == "float16" and weights.shape == [2, 3, 3, 3]
    np.testing.assert_array_equal(weights.load(), w.reshape(2, 3, 3, 3))
    assert input_weight(g, node(g, "conv1"), "bias").load().tolist() == [0.5, -2.0]

    short = msg(f(7, f(1, [2, 3, 3, 3], "packed_i")), f(10, 2), f(12, w[:50].tobytes()))
    p.write_bytes(msg(f(1, "Shrunk"), v2_layer("conv1", "Convolution", ["data"], ["conv1"], f(7, short))))
    with pytest.raises(ViewerError, match="holds 50 values; the file is damaged"):
        input_weight(open_model(p).graph, node(open_model(p).graph, "conv1"), "weights").load()
