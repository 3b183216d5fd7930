"""TensorFlow GraphDef / MetaGraphDef / SavedModel files written by field number from TF's .proto files."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.viewer.formats import detect, open_model

import struct

from . import _pbwrite as _pb
from ._pbwrite import f, msg
from .conftest import check_damaged, check_detect, check_export, edges, input_weight, node


def shape(*dims):
    return msg(*[f(2, msg(f(1, d))) for d in dims])


def attr(key, value):
    return f(5, msg(f(1, key), f(2, value)))


def tensor(dtype, dims, content=None, floats=None, ints=None):
    body = [f(1, dtype), f(2, shape(*dims))]
    if content is not None:
        body.append(f(4, content))
    if floats is not None:
        body.append(f(5, floats, "packed_f"))
    if ints is not None:
        body.append(f(7, ints, "packed_i"))
    return msg(*body)


def nodedef(name, op, inputs=(), *attrs):
    return msg(f(1, name), f(2, op), *[f(3, i) for i in inputs], *attrs)


def graph_def(with_library=False):
    filt = np.arange(54, dtype=np.float32).reshape(3, 3, 3, 2)
    nodes = [
        nodedef("x", "Placeholder", (), attr("dtype", f(6, 1)), attr("shape", f(7, shape(-1, 4, 4, 3)))),
        nodedef("block/conv/filter", "Const", (), attr("dtype", f(6, 1)),
                attr("value", f(8, tensor(1, [3, 3, 3, 2], content=filt.tobytes())))),
        nodedef("block/conv/Conv2D", "Conv2D", ("x", "block/conv/filter"), attr("T", f(6, 1)),
                attr("strides", f(1, f(3, [1, 2, 2, 1], "packed_i"))), attr("padding", f(2, "SAME"))),
        nodedef("block/conv/bias", "Const", (), attr("value", f(8, tensor(1, [2], floats=[0.5])))),
        nodedef("block/conv/BiasAdd", "BiasAdd", ("block/conv/Conv2D", "block/conv/bias:0"), attr("T", f(6, 1))),
        nodedef("block/relu", "Relu", ("block/conv/BiasAdd",)),
        nodedef("split/dim", "Const", (), attr("value", f(8, tensor(3, [], ints=[3])))),
        nodedef("split", "Split", ("split/dim", "block/relu"), attr("num_split", f(3, 2))),
        nodedef("out", "AddV2", ("split", "split:1", "^block/relu")),
    ]
    body = [f(1, n) for n in nodes]
    if with_library:
        sig = msg(f(1, "my_fn"), f(2, msg(f(1, "a"), f(3, 1))), f(3, msg(f(1, "y"))))
        fn = msg(f(1, sig), f(3, nodedef("r", "Relu", ("a",))), f(4, msg(f(1, "y"), f(2, "r:activations:0"))))
        body.append(f(2, msg(f(1, fn))))
    body.append(f(4, msg(f(1, 1087))))
    return msg(*body)


def meta_graph(with_library=False):
    info = msg(f(4, "serve"), f(5, "2.15.0"))
    tinfo = msg(f(1, "x:0"), f(2, 1), f(3, shape(-1, 4, 4, 3)))
    sig = msg(f(1, msg(f(1, "x"), f(2, tinfo))), f(2, msg(f(1, "y"), f(2, msg(f(1, "out:0"))))),
              f(3, "tensorflow/serving/predict"))
    return msg(f(1, info), f(2, graph_def(with_library)), f(5, msg(f(1, "serving_default"), f(2, sig))))


def _check_main(g):
    assert [n.op_type for n in g.nodes] == ["Conv2D", "BiasAdd", "Relu", "Split", "AddV2"]
    assert edges(g) == {("block/conv/Conv2D", "block/conv/BiasAdd"), ("block/conv/BiasAdd", "block/relu"),
                        ("block/relu", "split"), ("split", "out"), ("block/relu", "out")}
    conv = node(g, "block/conv/Conv2D")
    assert conv.group == ("block", "conv") and conv.category == "conv"
    assert conv.attributes["strides"] == [1, 2, 2, 1] and conv.attributes["padding"] == "SAME"
    w = input_weight(g, conv, "filter")
    assert w.shape == [3, 3, 3, 2] and w.dtype == "float32" and w.load()[2, 2, 2, 1] == 53
    assert input_weight(g, node(g, "block/conv/BiasAdd"), "bias").load().tolist() == [0.5, 0.5]
    assert [a.values for a in node(g, "split").outputs] == [["split"], ["split:1"]]
    assert g.inputs[0].name == "x" and g.inputs[0].shape == [None, 4, 4, 3] and g.inputs[0].dtype == "float32"
    assert node(g, "split/dim") if False else "split/dim" in g.weights


@pytest.fixture
def frozen(tmp_path):
    p = tmp_path / "frozen.pb"
    p.write_bytes(graph_def())
    return p


def test_frozen_graph(frozen):
    model = open_model(frozen)
    assert model.format == "TensorFlow" and model.properties["content"] == "GraphDef"
    _check_main(model.graph)


def test_meta_graph(tmp_path):
    p = tmp_path / "model.ckpt.meta"
    p.write_bytes(meta_graph())
    model = open_model(p)
    assert model.properties["content"] == "MetaGraphDef" and model.properties["tags"] == ["serve"]
    assert model.version == "2.15.0"
    _check_main(model.graph)


def test_saved_model_dir(tmp_path):
    d = tmp_path / "export"
    (d / "variables").mkdir(parents=True)
    (d / "saved_model.pb").write_bytes(msg(f(1, 1), f(2, meta_graph(with_library=True))))
    assert detect(d).name == "TensorFlow"
    model = open_model(d)
    assert model.properties["content"] == "SavedModel"
    assert model.properties["signatures"]["serving_default"]["inputs"] == ["x"]
    _check_main(model.graph)
    fn = model.graphs[1]
    assert fn.name == "my_fn" and [n.op_type for n in fn.nodes] == ["Relu"]
    assert [t.name for t in fn.inputs] == ["a"] and [t.name for t in fn.outputs] == ["r:activations:0"]


def test_text_graph(tmp_path):
    p = tmp_path / "graph.pbtxt"
    p.write_text('''
node { name: "x" op: "Placeholder" attr { key: "dtype" value { type: DT_FLOAT } }
       attr { key: "shape" value { shape { dim { size: -1 } dim { size: 3 } } } } }
node { name: "w" op: "Const" attr { key: "value" value { tensor { dtype: DT_FLOAT
       tensor_shape { dim { size: 3 } dim { size: 2 } } float_val: 1.5 } } } }
node { name: "mm" op: "MatMul" input: "x" input: "w" attr { key: "transpose_a" value { b: false } } }
''')
    g = open_model(p).graph
    assert [n.op_type for n in g.nodes] == ["MatMul"]
    mm = node(g, "mm")
    assert mm.attributes["transpose_a"] is False and mm.category == "matmul"
    assert input_weight(g, mm, "b").load().tolist() == [[1.5, 1.5]] * 3
    assert g.inputs[0].shape == [None, 3] and g.inputs[0].dtype == "float32"


def test_detect_damage_export(frozen, tmp_path):
    check_detect(frozen, tmp_path, "TensorFlow", ".tflite")
    meta = tmp_path / "m.meta"
    meta.write_bytes(meta_graph())
    check_detect(meta, tmp_path, "TensorFlow", ".h5")
    check_damaged(frozen, tmp_path, magic_len=2)
    check_damaged(meta, tmp_path, magic_len=2)
    check_export(open_model(frozen), tmp_path)


def test_large_constant_is_not_copied(tmp_path):
    """An 80 MiB Const opens through a memory map: listing it allocates almost nothing."""
    import tracemalloc

    n = 20 << 20
    p = tmp_path / "big.pb"
    with open(p, "wb") as fh:
        fh.write(graph_def())
        fh.write(f(1, nodedef("big", "Const", (), attr("value", f(8, tensor(1, [n], content=bytes(4 * n)))))))
    tracemalloc.start()
    try:
        model = open_model(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert model.graph.weights["big"].shape == [n]
    assert peak < (16 << 20)
    assert model.graph.weights["big"].load()[-1] == 0


def _sstable_block(entries):
    body = b"".join(_pb.varint(0) + _pb.varint(len(k)) + _pb.varint(len(v)) + k + v for k, v in entries)
    return body + struct.pack("<II", 0, 1)


def write_bundle(d, tensors):
    """A TensorBundle checkpoint: data shard plus a LevelDB-style index table (uncompressed)."""
    data, entries = b"", [(b"", msg(f(1, 1)))]
    for name, arr in tensors.items():
        entry = msg(f(1, 1), f(2, shape(*arr.shape)), f(4, len(data)), f(5, arr.nbytes))
        entries.append((name.encode(), entry))
        data += arr.tobytes()
    (d / "variables.data-00000-of-00001").write_bytes(data)
    out = b""
    block = _sstable_block(sorted(entries))
    data_handle = _pb.varint(0) + _pb.varint(len(block))
    out += block + b"\0" * 5
    meta = _sstable_block([])
    meta_handle = _pb.varint(len(out)) + _pb.varint(len(meta))
    out += meta + b"\0" * 5
    index = _sstable_block([(sorted(entries)[-1][0], data_handle)])
    index_handle = _pb.varint(len(out)) + _pb.varint(len(index))
    out += index + b"\0" * 5
    footer = (meta_handle + index_handle).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    (d / "variables.index").write_bytes(out + footer)


def test_saved_model_variables(tmp_path):
    d = tmp_path / "tf1_export"
    (d / "variables").mkdir(parents=True)
    nodes = [nodedef("x", "Placeholder", (), attr("dtype", f(6, 1))),
             nodedef("dense/kernel", "VariableV2", (), attr("dtype", f(6, 1)), attr("shape", f(7, shape(3, 2)))),
             nodedef("dense/MatMul", "MatMul", ("x", "dense/kernel"))]
    meta = msg(f(1, msg(f(4, "serve"))), f(2, msg(*[f(1, n) for n in nodes])))
    (d / "saved_model.pb").write_bytes(msg(f(1, 1), f(2, meta)))
    kernel = np.arange(6, dtype=np.float32).reshape(3, 2)
    write_bundle(d / "variables", {"dense/kernel": kernel, "global_step": np.array(7, dtype=np.float32)})
    model = open_model(d)
    assert model.properties["variables"] == 2
    var = node(model.graph, "dense/kernel")
    w = input_weight(model.graph, var, "value")
    assert w.shape == [3, 2] and w.load()[2, 1] == 5
    listing = model.graphs[-1]
    assert listing.name == "variables" and listing.weights["global_step"].load() == 7
    (d / "variables" / "variables.index").write_bytes(b"\0" * 60)   # damaged index: graph still opens
    model = open_model(d)
    assert "not a readable TensorFlow checkpoint index" in model.properties["variables"]


def _call(name, fn, inputs):
    """A StatefulPartitionedCall node whose ``f`` attribute names library function ``fn``."""
    return nodedef(name, "StatefulPartitionedCall", inputs, attr("f", f(10, msg(f(1, fn)))))


def _fn(name, args, nodes, ret):
    sig = msg(f(1, name), *[f(2, msg(f(1, a), f(3, 1))) for a in args], f(3, msg(f(1, "out"))))
    return msg(f(1, sig), *[f(3, n) for n in nodes], f(4, msg(f(1, "out"), f(2, ret))))


def test_saved_model_functions_open_under_their_calls(tmp_path):
    """TF2 keeps the layers in library functions; each call node opens its function as a subgraph."""
    model_fn = _fn("__inference_model_call_7", ["images"], [
        nodedef("conv/Conv2D", "Conv2D", ("images",), attr("T", f(6, 1))),
        nodedef("relu", "Relu", ("conv/Conv2D:output:0",)),
        _call("again", "__inference_signature_wrapper_9", ("relu:activations:0",)),   # calls back up: not nested
    ], "relu:activations:0")
    wrapper = _fn("__inference_signature_wrapper_9", ["x"], [_call("model", "__inference_model_call_7", ("x",))],
                  "model:output:0")
    graph = msg(f(1, nodedef("x", "Placeholder", (), attr("dtype", f(6, 1)))),
                f(1, _call("StatefulPartitionedCall", "__inference_signature_wrapper_9", ("x",))),
                f(2, msg(f(1, model_fn), f(1, wrapper))), f(4, msg(f(1, 1087))))
    d = tmp_path / "export"
    d.mkdir()
    (d / "saved_model.pb").write_bytes(msg(f(1, 1), f(2, msg(f(1, msg(f(4, "serve"))), f(2, graph)))))
    g = open_model(d).graph
    call = node(g, "StatefulPartitionedCall")
    wrapped = call.subgraphs["f"]
    assert wrapped.name == "__inference_signature_wrapper_9" and [t.name for t in wrapped.inputs] == ["x"]
    inner = node(wrapped, "model").subgraphs["f"]
    assert [n.op_type for n in inner.nodes] == ["Conv2D", "Relu", "StatefulPartitionedCall"]
    assert edges(inner) >= {("conv/Conv2D", "relu")} and node(inner, "conv/Conv2D").group == ("conv",)
    assert node(inner, "again").subgraphs == {}          # a cycle back to the wrapper stays closed


def test_function_nesting_is_bounded(tmp_path):
    """A chain of 200 functions each calling the next opens at most 32 levels deep (layout stays bounded)."""
    fns = [_fn(f"fn{i}", ["a"], [_call("c", f"fn{i + 1}", ("a",))], "c:output:0") for i in range(200)]
    graph = msg(f(1, nodedef("x", "Placeholder")), f(1, _call("top", "fn0", ("x",))),
                f(2, msg(*[f(1, fn) for fn in fns])))
    p = tmp_path / "chain.pb"
    p.write_bytes(graph)
    g = open_model(p).graph
    depth, n = 0, node(g, "top")
    while "f" in n.subgraphs:
        depth += 1
        n = n.subgraphs["f"].nodes[0]
    assert 1 <= depth <= 32
