"""TensorFlow Lite files written with the flatbuffers builder, following schema.fbs slot numbers."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.viewer.formats import open_model

from .conftest import check_damaged, check_detect, check_export, edges, input_weight, node

flatbuffers = pytest.importorskip("flatbuffers", reason="flatbuffers is not installed")


def _table(b, fields):
    """fields: list of (slot, kind, value); kind in int32/uint32/int8/uint8/float32/int64/offset."""
    b.StartObject(max(s for s, _, _ in fields) + 1 if fields else 0)
    for slot, kind, value in fields:
        if kind == "offset":
            b.PrependUOffsetTRelativeSlot(slot, value, 0)
        else:
            getattr(b, {"int32": "PrependInt32Slot", "uint32": "PrependUint32Slot", "int8": "PrependInt8Slot",
                        "uint8": "PrependUint8Slot", "float32": "PrependFloat32Slot",
                        "uint64": "PrependUint64Slot"}[kind])(slot, value, 0)
    return b.EndObject()


def _offsets(b, offs):
    b.StartVector(4, len(offs), 4)
    for o in reversed(offs):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def _ints(b, values, dtype=np.int32):
    return b.CreateNumpyVector(np.asarray(values, dtype=dtype))


def build_tflite() -> bytes:
    b = flatbuffers.Builder(1024)
    b.ForceDefaults(True)   # write every slot we set, even zeros
    conv_w = np.arange(18, dtype=np.float32).reshape(2, 3, 3, 1)
    fc_w = np.array([[1, -2, 3, -4, 5, -6, 7, -8]], dtype=np.int8)
    buffers = [_table(b, [])]
    for data in (conv_w.tobytes(), np.zeros(2, np.float32).tobytes(), fc_w.tobytes(),
                 np.array([1, 8], np.int32).tobytes()):
        vec = b.CreateNumpyVector(np.frombuffer(data, dtype=np.uint8))
        buffers.append(_table(b, [(0, "offset", vec)]))
    # tensors: 0 input, 1 conv_w, 2 conv_b, 3 conv_out, 4 shape, 5 reshaped, 6 fc_w (int8), 7 fc_out, 8 custom_out
    specs = [("input", [1, 4, 4, 1], 0, 0), ("conv/filter", [2, 3, 3, 1], 0, 1), ("conv/bias", [2], 0, 2),
             ("conv/out", [1, 2, 2, 2], 0, 0), ("shape", [2], 2, 4), ("flat", [1, 8], 0, 0),
             ("fc/weights", [1, 8], 9, 3), ("fc/out", [1, 1], 0, 0), ("final", [1, 1], 0, 0)]
    tensors = []
    for name, shape, ttype, buf in specs:
        s = b.CreateString(name)
        shp = _ints(b, shape)
        fields = [(0, "offset", shp), (1, "int8", ttype), (2, "uint32", buf), (3, "offset", s)]
        if name == "fc/weights":
            scale = b.CreateNumpyVector(np.array([0.5], np.float32))
            zp = b.CreateNumpyVector(np.array([3], np.int64))
            q = _table(b, [(2, "offset", scale), (3, "offset", zp)])
            fields.append((4, "offset", q))
        tensors.append(_table(b, fields))
    conv_opts = _table(b, [(0, "int8", 1), (1, "int32", 2), (2, "int32", 2), (3, "int8", 1)])
    reshape_opts = _table(b, [(0, "offset", _ints(b, [1, 8]))])
    ops = [
        _table(b, [(0, "uint32", 0), (1, "offset", _ints(b, [0, 1, 2])), (2, "offset", _ints(b, [3])),
                   (3, "uint8", 1), (4, "offset", conv_opts)]),
        _table(b, [(0, "uint32", 1), (1, "offset", _ints(b, [3, 4])), (2, "offset", _ints(b, [5])),
                   (3, "uint8", 17), (4, "offset", reshape_opts)]),
        _table(b, [(0, "uint32", 2), (1, "offset", _ints(b, [5, 6, -1])), (2, "offset", _ints(b, [7]))]),
        _table(b, [(0, "uint32", 3), (1, "offset", _ints(b, [7])), (2, "offset", _ints(b, [8])),
                   (5, "offset", b.CreateNumpyVector(np.arange(5, dtype=np.uint8)))]),
    ]
    custom_name = b.CreateString("MyCustomOp")
    codes = [_table(b, [(0, "int8", 3), (3, "int32", 3)]), _table(b, [(0, "int8", 22), (3, "int32", 22)]),
             _table(b, [(0, "int8", 9), (3, "int32", 9), (2, "int32", 2)]),
             _table(b, [(0, "int8", 32), (1, "offset", custom_name), (3, "int32", 32)])]
    main = _table(b, [(0, "offset", _offsets(b, tensors)), (1, "offset", _ints(b, [0])),
                      (2, "offset", _ints(b, [8])), (3, "offset", _offsets(b, ops)),
                      (4, "offset", b.CreateString("main"))])
    # a second, tiny subgraph: one RELU
    t2 = [_table(b, [(0, "offset", _ints(b, [3])), (3, "offset", b.CreateString(n))]) for n in ("a", "b")]
    relu_code_index = 4
    op2 = _table(b, [(0, "uint32", relu_code_index), (1, "offset", _ints(b, [0])), (2, "offset", _ints(b, [1]))])
    codes.append(_table(b, [(0, "int8", 19), (3, "int32", 19)]))
    sub = _table(b, [(0, "offset", _offsets(b, t2)), (1, "offset", _ints(b, [0])), (2, "offset", _ints(b, [1])),
                     (3, "offset", _offsets(b, [op2]))])
    desc = b.CreateString("kiln test converter")
    model = _table(b, [(0, "uint32", 3), (1, "offset", _offsets(b, codes)), (2, "offset", _offsets(b, [main, sub])),
                       (3, "offset", desc), (4, "offset", _offsets(b, buffers))])
    b.Finish(model, file_identifier=b"TFL3")
    return bytes(b.Output())


@pytest.fixture
def tfl(tmp_path):
    p = tmp_path / "model.tflite"
    p.write_bytes(build_tflite())
    return p


def test_reads_graph(tfl):
    model = open_model(tfl)
    assert model.format == "TensorFlow Lite" and model.producer == "kiln test converter"
    assert len(model.graphs) == 2 and [n.op_type for n in model.graphs[1].nodes] == ["RELU"]
    g = model.graph
    assert [n.op_type for n in g.nodes] == ["CONV_2D", "RESHAPE", "FULLY_CONNECTED", "MyCustomOp"]
    assert edges(g) == {("conv/out", "flat"), ("flat", "fc/out"), ("fc/out", "final")}
    conv = node(g, "conv/out")
    assert conv.category == "conv"
    assert conv.attributes["padding"] == "VALID" and conv.attributes["stride_w"] == 2
    assert conv.attributes["fused_activation_function"] == "RELU"
    assert node(g, "flat").attributes["new_shape"] == [1, 8]
    assert node(g, "final").category == "custom" and node(g, "final").attributes["custom_options"] == "5 bytes"
    assert node(g, "fc/out").attributes["version"] == 2
    filt = input_weight(g, conv, "filter")
    assert filt.shape == [2, 3, 3, 1] and filt.dtype == "float32"
    assert filt.load()[1, 2, 2, 0] == 17
    fc_w = g.tensors["fc/weights"]
    assert fc_w.dtype == "int8" and fc_w.quantization == {"scale": [0.5], "zero_point": [3]}
    assert input_weight(g, node(g, "fc/out"), "weights").load()[0, 3] == -4
    assert [t.name for t in g.inputs] == ["input"] and g.inputs[0].shape == [1, 4, 4, 1]
    assert [t.name for t in g.outputs] == ["final"]


def test_detect_damage_export(tfl, tmp_path):
    check_detect(tfl, tmp_path, "TensorFlow Lite", ".onnx")
    check_damaged(tfl, tmp_path, magic_len=8)
    check_export(open_model(tfl), tmp_path)
