"""Small float models for the quantization tests, a tiny classifier trained here in numpy, and the export of a
Kiln-quantized network's scales into an ONNX QDQ model that ONNX Runtime runs as the reference."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "m", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def cnn(seed: int = 0, classes: int = 10, depthwise: bool = False, residual: bool = False) -> onnx.ModelProto:
    """x[N,3,8,8] → conv3x3(8) → relu → conv3x3/2(16) → relu → global pool → flatten → Gemm(transB) → y[N,10];
    ``depthwise``: the second conv is a 3x3/2 depthwise conv (8 groups) followed by a 1x1 conv to 16;
    ``residual``: a residual block instead, relu(conv3x3(8)(r1) + r1), pooled to 8 features."""
    if residual:
        return _residual_cnn(seed, classes)
    rng = np.random.default_rng(seed)

    def w(*s: int) -> np.ndarray:
        return (rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[1:]))).astype(np.float32)
    inits = {"w1": w(8, 3, 3, 3), "b1": w(8, 1)[:, 0], "w2": w(16, 8, 3, 3), "b2": w(16, 1)[:, 0],
             "wf": w(classes, 16), "bf": w(classes, 1)[:, 0]}
    if depthwise:
        del inits["w2"]
        inits.update(wd=w(8, 1, 3, 3), bd=w(8, 1)[:, 0], wp=w(16, 8, 1, 1))
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             *([helper.make_node("Conv", ["r1", "wd", "bd"], ["d"], name="dwconv", pads=[1, 1, 1, 1], strides=[2, 2],
                                 group=8),
                helper.make_node("Conv", ["d", "wp", "b2"], ["c2"], name="conv2")] if depthwise else
               [helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2])]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
                  [helper.make_tensor_value_info("y", F, ["N", classes])], inits)


def _residual_cnn(seed: int, classes: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def w(*s: int) -> np.ndarray:
        return (rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[1:]))).astype(np.float32)
    inits = {"w1": w(8, 3, 3, 3), "b1": w(8, 1)[:, 0], "w2": w(8, 8, 3, 3), "b2": w(8, 1)[:, 0],
             "wf": w(classes, 8), "bf": w(classes, 1)[:, 0]}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r1"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
                  [helper.make_tensor_value_info("y", F, ["N", classes])], inits)


def mlp(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> onnx.ModelProto:
    """x[N,K] → MatMul(w1[K,H]) + b1 → relu → MatMul(w2[H,C]) + b2 → y[N,C]."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="mm1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
             helper.make_node("Relu", ["h1"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "w2"], ["y0"], name="mm2"),
             helper.make_node("Add", ["y0", "b2"], ["y"], name="add2")]
    inits = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", w1.shape[0]])],
                  [helper.make_tensor_value_info("y", F, ["N", w2.shape[1]])],
                  {k: v.astype(np.float32) for k, v in inits.items()})


def blobs(n: int, seed: int, k: int = 16, classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of ``classes`` Gaussian clusters in ``k`` dims (fixed centres), and their labels."""
    centres = np.random.default_rng(1234).standard_normal((classes, k)) * 2.0
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    return (centres[labels] + rng.standard_normal((n, k))).astype(np.float32), labels


def trained_mlp(hidden: int = 32, steps: int = 300) -> onnx.ModelProto:
    """A 2-layer MLP trained on ``blobs`` by full-batch gradient descent on the softmax cross-entropy."""
    x, labels = blobs(2000, seed=0)
    rng = np.random.default_rng(0)
    k, c = x.shape[1], int(labels.max()) + 1
    w1, b1 = rng.standard_normal((k, hidden)) * np.sqrt(2 / k), np.zeros(hidden)
    w2, b2 = rng.standard_normal((hidden, c)) * np.sqrt(1 / hidden), np.zeros(c)
    onehot = np.eye(c)[labels]
    for _ in range(steps):
        h = np.maximum(x @ w1 + b1, 0)
        z = h @ w2 + b2
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dz = (p - onehot) / len(x)
        dh = (dz @ w2.T) * (h > 0)
        w2 -= 0.5 * h.T @ dz
        b2 -= 0.5 * dz.sum(0)
        w1 -= 0.5 * x.T @ dh
        b1 -= 0.5 * dh.sum(0)
    return mlp(w1, b1, w2, b2)


def qdq_export(model: onnx.ModelProto, qnet) -> onnx.ModelProto:
    """``model`` with ONNX QuantizeLinear/DequantizeLinear nodes holding the scales of Kiln's quantized network
    ``qnet``: each quantized activation through Q→DQ (the Q output named as Kiln's, and a graph output too),
    each quantized weight (the float initializer) through Q→DQ per channel. ONNX Runtime quantizes the weights
    itself, so Kiln's weight rounding is checked too."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    by_name = {n.name: n for n in g.node}
    new_nodes, codes = [], []
    inits = []
    typed = onnx.shape_inference.infer_shapes(model).graph
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in [*typed.value_info, *typed.input]}

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    for layer in qnet.layers:
        if layer.kind != "QuantizeLinear":
            continue
        x = layer.inputs[0].name
        s = const(f"{x}__s", np.asarray(layer.inputs[1].value, np.float32))
        zp = const(f"{x}__zp", np.zeros((), layer.inputs[2].value.dtype))
        q = layer.outputs[0].name
        new_nodes += [helper.make_node("QuantizeLinear", [x, s, zp], [q]),
                      helper.make_node("DequantizeLinear", [q, s, zp], [f"{x}__dq"])]
        code_type = numpy_helper.from_array(np.zeros((), layer.inputs[2].value.dtype)).data_type
        codes.append(helper.make_tensor_value_info(q, code_type, [f"{q}_{i}" for i in range(rank[x])]))
        for reader, i in layer.outputs[0].uses[0][0].outputs[0].uses:
            for origin in reader.origin:
                node = by_name[origin]
                node.input[i] = f"{x}__dq"
    for layer in qnet.layers:
        if layer.kind != "DequantizeLinear" or not layer.inputs[0].is_constant:
            continue
        reader, i = layer.outputs[0].uses[0]
        node = by_name[reader.origin[0]]
        w = node.input[1]
        s = const(f"{w}__s", layer.inputs[1].value)
        zp = const(f"{w}__zp", np.zeros(layer.inputs[1].value.shape, layer.inputs[2].value.dtype))
        axis = layer.attrs["axis"]
        new_nodes += [helper.make_node("QuantizeLinear", [w, s, zp], [f"{w}__q"], axis=axis),
                      helper.make_node("DequantizeLinear", [f"{w}__q", s, zp], [f"{w}__dq"], axis=axis)]
        node.input[1] = f"{w}__dq"
    g.initializer.extend(inits)
    nodes = list(new_nodes) + list(g.node)
    del g.node[:]
    g.node.extend(_toposort(nodes, {i.name for i in g.input} | {i.name for i in g.initializer}))
    g.output.extend(codes)
    if any(c.type.tensor_type.elem_type == TensorProto.FLOAT8E4M3FN for c in codes):
        del m.opset_import[:]                          # FP8 Q/DQ is opset 19+
        m.opset_import.append(helper.make_opsetid("", 21))
        m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def _toposort(nodes, known: set[str]):
    out, pending = [], list(nodes)
    while pending:
        ready = [n for n in pending if all(i in known or not i for i in n.input)]
        assert ready, "cycle"
        for n in ready:
            out.append(n)
            known.update(n.output)
            pending.remove(n)
    return out
