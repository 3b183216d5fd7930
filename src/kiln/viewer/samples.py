"""Sample ONNX models built with onnx.helper, for the viewer's tests, benchmarks and docs.

`mini_yolo()` follows the YOLOv5 (v6 architecture) layout and the node names
that ``torch.onnx.export`` gives it (``/model.24/m.0/Conv``); `transformer()`
builds a BERT-like encoder of about any node count for large-graph timing.
Weights are random; the models are valid and run in ONNX Runtime.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    """Accumulates nodes and initializers, naming nodes the way torch's exporter does."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self._names: dict[str, int] = {}
        self._values = 0

    def _unique(self, name: str) -> str:
        n = self._names.get(name, 0)
        self._names[name] = n + 1
        return name if n == 0 else f"{name}_{n}"

    def value(self) -> str:
        self._values += 1
        return f"onnx::{self._values}"

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], scale: float = 0.1) -> str:
        return self.init(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def op(self, op_type: str, scope: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str] | str:
        name = self._unique(f"{scope}/{op_type}")
        outs = [f"{name}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              name: str, opset: int = 17) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="pytorch", producer_version="2.4.0")
        model.ir_version = 8
        return model


def _conv(b: _Builder, x: str, cin: int, cout: int, k: int, s: int, scope: str, p: int | None = None) -> str:
    prefix = scope.strip("/").replace("/", ".")
    w = b.weight(f"{prefix}.conv.weight", (cout, cin, k, k))
    bias = b.weight(f"{prefix}.conv.bias", (cout,))
    y = b.op("Conv", f"{scope}/conv", [x, w, bias], kernel_shape=[k, k], strides=[s, s],
             pads=[k // 2 if p is None else p] * 4, dilations=[1, 1], group=1)
    sig = b.op("Sigmoid", f"{scope}/act", [y])
    return b.op("Mul", f"{scope}/act", [y, sig])


def _c3(b: _Builder, x: str, cin: int, cout: int, n: int, scope: str, shortcut: bool = True) -> str:
    c_ = cout // 2
    a = _conv(b, x, cin, c_, 1, 1, f"{scope}/cv1")
    for i in range(n):
        h = _conv(b, a, c_, c_, 1, 1, f"{scope}/m/m.{i}/cv1")
        h = _conv(b, h, c_, c_, 3, 1, f"{scope}/m/m.{i}/cv2")
        a = b.op("Add", f"{scope}/m/m.{i}", [a, h]) if shortcut else h
    c = _conv(b, x, cin, c_, 1, 1, f"{scope}/cv2")
    cat = b.op("Concat", scope, [a, c], axis=1)
    return _conv(b, cat, 2 * c_, cout, 1, 1, f"{scope}/cv3")


def _sppf(b: _Builder, x: str, cin: int, cout: int, scope: str) -> str:
    c_ = cin // 2
    a = _conv(b, x, cin, c_, 1, 1, f"{scope}/cv1")
    pools = [a]
    for i, sub in enumerate(("m", "m_1", "m_2")):
        pools.append(b.op("MaxPool", f"{scope}/{sub}", [pools[-1]], kernel_shape=[5, 5], pads=[2, 2, 2, 2],
                          strides=[1, 1], dilations=[1, 1], ceil_mode=0))
    cat = b.op("Concat", scope, pools, axis=1)
    return _conv(b, cat, 4 * c_, cout, 1, 1, f"{scope}/cv2")


def _detect(b: _Builder, feats: list[tuple[str, int, int]], nc: int, scope: str) -> str:
    na, no = 3, nc + 5
    outs = []
    for i, (x, cin, size) in enumerate(feats):
        stride = 640 // size
        w = b.weight(f"model.24.m.{i}.weight", (na * no, cin, 1, 1))
        bias = b.weight(f"model.24.m.{i}.bias", (na * no,))
        y = b.op("Conv", f"{scope}/m.{i}", [x, w, bias], kernel_shape=[1, 1], strides=[1, 1], pads=[0] * 4)
        shape = b.init(f"{scope}/Constant_{i}_output_0", np.array([1, na, no, size, size], np.int64))
        y = b.op("Reshape", scope, [y, shape])
        y = b.op("Transpose", scope, [y], perm=[0, 1, 3, 4, 2])
        y = b.op("Sigmoid", scope, [y])
        split = b.init(f"{scope}/Constant_{i}_split", np.array([2, 2, nc + 1], np.int64))
        xy, wh, conf = b.op("Split", scope, [y, split], n_out=3, axis=4)
        gy, gx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        grid = np.stack([gx, gy], -1).reshape(1, 1, size, size, 2).astype(np.float32) - 0.5
        two = b.init(f"{scope}/Constant_{i}_two", np.array(2.0, np.float32))
        xy = b.op("Mul", scope, [xy, two])
        xy = b.op("Add", scope, [xy, b.init(f"{scope}/grid.{i}", grid)])
        xy = b.op("Mul", scope, [xy, b.init(f"{scope}/stride.{i}", np.array(float(stride), np.float32))])
        wh = b.op("Mul", scope, [wh, two])
        wh = b.op("Pow", scope, [wh, two])
        anchors = (np.array([[10, 13], [16, 30], [33, 23]], np.float32) * (2 ** i)).reshape(1, na, 1, 1, 2)
        wh = b.op("Mul", scope, [wh, b.init(f"{scope}/anchor_grid.{i}", np.broadcast_to(
            anchors, (1, na, size, size, 2)).copy())])
        cat = b.op("Concat", scope, [xy, wh, conf], axis=4)
        flat = b.init(f"{scope}/Constant_{i}_flat", np.array([1, na * size * size, no], np.int64))
        outs.append(b.op("Reshape", scope, [cat, flat]))
    return b.op("Concat", scope, outs, axis=1)


def mini_yolo(width: int = 16, depth: tuple[int, int, int, int] = (1, 1, 1, 1), nc: int = 80,
              size: int = 640, seed: int = 0) -> onnx.ModelProto:
    """A YOLOv5-style detector; ``width=64, depth=(3, 6, 9, 3)`` gives the YOLOv5l structure."""
    b = _Builder(seed)
    c = [width * m for m in (1, 2, 4, 8, 16)]
    x = _conv(b, "images", 3, c[0], 6, 2, "/model.0", p=2)
    x = _conv(b, x, c[0], c[1], 3, 2, "/model.1")
    x = _c3(b, x, c[1], c[1], depth[0], "/model.2")
    x = _conv(b, x, c[1], c[2], 3, 2, "/model.3")
    p3 = x = _c3(b, x, c[2], c[2], depth[1], "/model.4")
    x = _conv(b, x, c[2], c[3], 3, 2, "/model.5")
    p4 = x = _c3(b, x, c[3], c[3], depth[2], "/model.6")
    x = _conv(b, x, c[3], c[4], 3, 2, "/model.7")
    x = _c3(b, x, c[4], c[4], depth[3], "/model.8")
    x = _sppf(b, x, c[4], c[4], "/model.9")
    h10 = x = _conv(b, x, c[4], c[3], 1, 1, "/model.10")
    scales = b.init("/model.11/Constant_output_0", np.array([1, 1, 2, 2], np.float32))
    x = b.op("Resize", "/model.11", [x, "", scales], mode="nearest", coordinate_transformation_mode="asymmetric",
             nearest_mode="floor")
    x = b.op("Concat", "/model.12", [x, p4], axis=1)
    x = _c3(b, x, 2 * c[3], c[3], depth[0], "/model.13", shortcut=False)
    h14 = x = _conv(b, x, c[3], c[2], 1, 1, "/model.14")
    x = b.op("Resize", "/model.15", [x, "", scales], mode="nearest", coordinate_transformation_mode="asymmetric",
             nearest_mode="floor")
    x = b.op("Concat", "/model.16", [x, p3], axis=1)
    o17 = x = _c3(b, x, 2 * c[2], c[2], depth[0], "/model.17", shortcut=False)
    x = _conv(b, x, c[2], c[2], 3, 2, "/model.18")
    x = b.op("Concat", "/model.19", [x, h14], axis=1)
    o20 = x = _c3(b, x, 2 * c[2], c[3], depth[0], "/model.20", shortcut=False)
    x = _conv(b, x, c[3], c[3], 3, 2, "/model.21")
    x = b.op("Concat", "/model.22", [x, h10], axis=1)
    o23 = _c3(b, x, 2 * c[3], c[4], depth[0], "/model.23", shortcut=False)
    s = size
    _detect(b, [(o17, c[2], s // 8), (o20, c[3], s // 16), (o23, c[4], s // 32)], nc, "/model.24")
    b.nodes[-1].output[0] = "output0"
    n_boxes = 3 * ((s // 8) ** 2 + (s // 16) ** 2 + (s // 32) ** 2)
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, s, s])]
    outputs = [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, n_boxes, nc + 5])]
    return b.model(inputs, outputs, "main_graph")


def _layer(b: _Builder, x: str, mask: str, d: int, scope: str) -> str:
    def dense(v: str, sub: str, dout: int) -> str:
        w = b.weight(f"{scope[1:].replace('/', '.')}.{sub}.weight", (d, dout))
        y = b.op("MatMul", f"{scope}/{sub}", [v, w])
        return b.op("Add", f"{scope}/{sub}", [y, b.weight(f"{scope[1:].replace('/', '.')}.{sub}.bias", (dout,))])

    heads = b.init(f"{scope}/heads_shape", np.array([0, 0, 2, d // 2], np.int64))
    att = f"{scope}/attention/self"
    qkv = []
    for which in ("query", "key", "value"):
        v = dense(x, f"attention/self/{which}", d)
        v = b.op("Reshape", att, [v, heads])
        qkv.append(b.op("Transpose", att, [v], perm=[0, 2, 1, 3] if which != "key" else [0, 2, 3, 1]))
    s = b.op("MatMul", att, [qkv[0], qkv[1]])
    s = b.op("Div", att, [s, b.init(f"{att}/scale", np.array(np.sqrt(d // 2), np.float32))])
    s = b.op("Add", att, [s, mask])
    p = b.op("Softmax", att, [s], axis=-1)
    ctx = b.op("MatMul", att, [p, qkv[2]])
    ctx = b.op("Transpose", att, [ctx], perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", att, [ctx, b.init(f"{scope}/merge_shape", np.array([0, 0, d], np.int64))])
    h = dense(ctx, "attention/output/dense", d)
    h = b.op("Add", f"{scope}/attention/output", [h, x])
    ln = f"{scope}/attention/output/LayerNorm"
    x = b.op("LayerNormalization", ln, [h, b.weight(f"{ln}.g", (d,)), b.weight(f"{ln}.b", (d,))], axis=-1)
    h = dense(x, "intermediate/dense", d)
    act = f"{scope}/intermediate/intermediate_act_fn"
    e = b.op("Div", act, [h, b.init(f"{act}/sqrt2", np.array(1.4142135, np.float32))])
    e = b.op("Erf", act, [e])
    e = b.op("Add", act, [e, b.init(f"{act}/one", np.array(1.0, np.float32))])
    e = b.op("Mul", act, [h, e])
    e = b.op("Mul", act, [e, b.init(f"{act}/half", np.array(0.5, np.float32))])
    h = dense(e, "output/dense", d)
    h = b.op("Add", f"{scope}/output", [h, x])
    ln = f"{scope}/output/LayerNorm"
    return b.op("LayerNormalization", ln, [h, b.weight(f"{ln}.g", (d,)), b.weight(f"{ln}.b", (d,))], axis=-1)


NODES_PER_LAYER = 34


def transformer(nodes: int = 10_000, d: int = 8, seq: int = 16, seed: int = 0) -> onnx.ModelProto:
    """A BERT-like encoder with about ``nodes`` nodes, scoped ``/encoder/layer.N/...``."""
    b = _Builder(seed)
    ids = "input_ids"
    emb = b.op("Gather", "/embeddings/word_embeddings", [b.weight("embeddings.word", (100, d)), ids], axis=0)
    x = b.op("Add", "/embeddings", [emb, b.weight("embeddings.position", (seq, d))])
    m = b.op("Unsqueeze", "/extended_mask", ["attention_mask", b.init("mask_axes", np.array([1, 2], np.int64))])
    m = b.op("Cast", "/extended_mask", [m], to=TensorProto.FLOAT)
    m = b.op("Sub", "/extended_mask", [b.init("mask_one", np.array(1.0, np.float32)), m])
    mask = b.op("Mul", "/extended_mask", [m, b.init("mask_min", np.array(-10000.0, np.float32))])
    n_layers = max(1, (nodes - 9) // NODES_PER_LAYER)
    for i in range(n_layers):
        x = _layer(b, x, mask, d, f"/encoder/layer.{i}")
    pooled = b.op("Gather", "/pooler", [x, b.init("cls_index", np.array(0, np.int64))], axis=1)
    pooled = b.op("Tanh", "/pooler/activation", [b.op("MatMul", "/pooler/dense", [pooled, b.weight("pooler.w", (d, d))])])
    b.nodes[-1].output[0] = "pooler_output"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, seq]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, seq])]
    outputs = [helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, [1, d])]
    return b.model(inputs, outputs, "encoder")


def control_flow() -> onnx.ModelProto:
    """A small model with an If whose branches are subgraphs, and a Loop."""
    then_out = helper.make_tensor_value_info("then_y", TensorProto.FLOAT, [2, 3])
    else_out = helper.make_tensor_value_info("else_y", TensorProto.FLOAT, [2, 3])
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["then_y"], name="then/Relu")], "then_branch",
                               [], [then_out])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["n"], name="else/Neg"),
                                helper.make_node("Sigmoid", ["n"], ["else_y"], name="else/Sigmoid")],
                               "else_branch", [], [else_out])
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "x"], ["acc_out"], name="body/Add"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body/Identity")],
        "loop_body",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2, 3])])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], name="ReduceSum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="Greater"),
        helper.make_node("If", ["c"], ["y"], name="If", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trip", "cond", "y"], ["z"], name="Loop", body=body),
    ]
    graph = helper.make_graph(
        nodes, "control", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
         numpy_helper.from_array(np.array(3, np.int64), "trip"),
         numpy_helper.from_array(np.array(True), "cond")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="kiln-tests")
    model.ir_version = 8
    return model
