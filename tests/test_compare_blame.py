"""kiln compare --per-layer on fused engines: a layer is blamed only where Kiln and ONNX Runtime really
part. Engine tensors that carry an ONNX value's name must hold that value (a fused layer carries the
name of the last value it computes), so a model whose outputs pass names no layer, and a model with
one wrong layer names that layer. Also: the relative error where the reference holds zeros."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.passes._match as match_helpers
from kiln.comparison import _mark_all, error_stats, same_meaning

ort = pytest.importorskip("onnxruntime")


# ---- models -----------------------------------------------------------------------------------
class _Graph:
    """An ONNX graph written node by node, with Paddle2ONNX-style names (node p2o.Conv.0, value
    conv_0.tmp), or without node names as some exporters leave them."""

    def __init__(self, seed: int = 0, named: bool = True) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.count: dict[str, int] = {}
        self.named = named

    def const(self, value) -> str:
        name = f"param_{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def op(self, op: str, ins: list[str], **attrs) -> str:
        k = self.count.get(op, 0)
        self.count[op] = k + 1
        out = f"{op.lower()}_{k}.tmp"
        self.nodes.append(helper.make_node(op, ins, [out], name=f"p2o.{op}.{k}" if self.named else "", **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, s: int = 1, group: int = 1, bias: bool = False) -> str:
        w = self.rng.standard_normal((cout, cin // group, k, k)) * math.sqrt(2.0 / (cin // group * k * k))
        ins = [x, self.const(w)] + ([self.const(self.rng.normal(0, 0.1, cout))] if bias else [])
        return self.op("Conv", ins, kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        return self.op("BatchNormalization", [x, self.const(r.uniform(0.5, 1.5, c)), self.const(r.normal(0, 0.2, c)),
                                              self.const(r.normal(0, 0.2, c)), self.const(r.uniform(0.5, 1.5, c))],
                       epsilon=1e-5)

    def model(self, inputs: dict[str, list[int]], outputs: list[str], opset: int = 14) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              self.inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def paddle_detector() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Conv → BatchNormalization → activation blocks as Paddle2ONNX writes them: a stem with its max
    pool, HardSwish, a depthwise conv whose BN output a PRelu reads (nothing fuses it), swish as
    Sigmoid·x, a residual Add before a ReLU, ConvTranspose → BN → LeakyRelu, and a box head
    ``(sigmoid(conv)·2 + grid)·8``."""
    g = _Graph(0)
    t = g.op("Relu", [g.bn(g.conv("x", 3, 16, 3, 2), 16)])
    t = g.op("MaxPool", [t], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])          # [1, 16, 8, 8]
    a = g.op("HardSwish", [g.bn(g.conv(t, 16, 16, 1), 16)])
    d = g.op("PRelu", [g.bn(g.conv(a, 16, 16, 3, group=16), 16), g.const(np.full((16, 1, 1), 0.1))])
    s = g.bn(g.conv(d, 16, 16, 1), 16)
    s = g.op("Mul", [s, g.op("Sigmoid", [s])])
    r = g.op("Relu", [g.op("Add", [g.bn(g.conv(s, 16, 16, 3), 16), t])])
    w_up = g.rng.standard_normal((16, 8, 2, 2)) * 0.25
    up = g.op("LeakyRelu", [g.bn(g.op("ConvTranspose", [r, g.const(w_up)], strides=[2, 2]), 8)], alpha=0.1)
    box = g.op("Sigmoid", [g.conv(r, 16, 6, 1, bias=True)])
    box = g.op("Mul", [g.op("Add", [g.op("Mul", [box, g.const(2.0)]), g.const(g.rng.random((1, 6, 8, 8)))]),
                       g.const(8.0)])
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    return g.model({"x": [1, 3, 32, 32]}, [box, up]), {"x": x}


def nhwc_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A channels-last export as tf2onnx writes one (nodes unnamed): NHWC input, Transpose → Conv → BN →
    Relu → Transpose, a per-channel Mul/Add on the last axis, a 1×1 conv between transposes, and a
    transpose pair that cancels out."""
    g = _Graph(1, named=False)
    t = g.op("Transpose", ["x"], perm=[0, 3, 1, 2])
    t = g.op("Transpose", [g.op("Relu", [g.bn(g.conv(t, 3, 16, 3), 16)])], perm=[0, 2, 3, 1])
    t = g.op("Add", [g.op("Mul", [t, g.const(g.rng.uniform(0.5, 1.5, 16))]), g.const(g.rng.normal(0, 0.2, 16))])
    u = g.op("Transpose", [t], perm=[0, 3, 1, 2])
    u = g.op("Transpose", [g.op("Relu", [g.bn(g.conv(u, 16, 16, 1, bias=True), 16)])], perm=[0, 2, 3, 1])
    back = g.op("Transpose", [g.op("Transpose", [u], perm=[0, 3, 1, 2])], perm=[0, 2, 3, 1])
    y = g.op("Add", [back, t])
    x = np.random.default_rng(2).standard_normal((1, 12, 12, 3)).astype(np.float32)
    return g.model({"x": [1, 12, 12, 3]}, [y]), {"x": x}


def resnet_blocks() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Two bottlenecks with 1×1 convolutions of power-of-two widths: a projection shortcut (fused into
    one two-GEMM layer) and 1×1 chains across the blocks."""
    g = _Graph(2)

    def cbr(x, cin, cout, k=1, relu=True):
        y = g.bn(g.conv(x, cin, cout, k), cout)
        return g.op("Relu", [y]) if relu else y
    h = cbr(cbr("x", 16, 16), 16, 16, 3)
    y1 = g.op("Relu", [g.op("Add", [cbr(h, 16, 32, relu=False), cbr("x", 16, 32, relu=False)])])
    h = cbr(cbr(y1, 32, 16), 16, 16, 3)
    y2 = g.op("Relu", [g.op("Add", [cbr(h, 16, 32, relu=False), y1])])
    z = cbr(y2, 32, 16)
    x = np.random.default_rng(3).standard_normal((1, 16, 8, 8)).astype(np.float32)
    return g.model({"x": [1, 16, 8, 8]}, [z]), {"x": x}


class _Encoder(torch.nn.Module):
    """A BERT-like block exported at opset 13: LayerNorm and GELU as their decompositions, q/k/v
    projections of one input, scaled dot-product attention with an additive mask, add + norm."""

    def __init__(self, batch: int, seq: int, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.shape = (batch, seq, heads, d // heads)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.ff1, self.ff2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, h, hd = self.shape
        q, k, v = (p(x).reshape(b, s, h, hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1) @ v
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(b, s, h * hd)))
        return self.ln2(x + self.ff2(torch.nn.functional.gelu(self.ff1(x))))


def encoder() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    import io
    import warnings
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    mask = torch.zeros(2, 1, 1, 8)
    mask[1, ..., 6:] = -1e4
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Encoder(2, 8).eval(), (x, mask), f, input_names=["x", "mask"], output_names=["y"],
                          opset_version=13, dynamo=False)
    return onnx.load_from_string(f.getvalue()), {"x": x.numpy(), "mask": mask.numpy()}


def bert() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    pytest.importorskip("transformers")
    from passes.mini_transformers import bert as export_bert
    model, feeds = export_bert(batch=1, seq=8, layers=1)
    return onnx.load_from_string(model), feeds


MODELS = {"paddle_detector": paddle_detector, "nhwc": nhwc_model, "resnet_blocks": resnet_blocks,
          "encoder": encoder, "bert": bert}


# ---- helpers ----------------------------------------------------------------------------------
def _engine(model: onnx.ModelProto, feeds: dict[str, np.ndarray]):
    profiles = {n: tuple(v.shape) for n, v in feeds.items()}
    return kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu", profiles=profiles))


def _kinds(engine) -> set[str]:
    return {layer["kind"] for layer in engine.layers}


def _fused(engine) -> set[str]:
    """ONNX nodes that run inside an engine layer together with other nodes."""
    return {o for layer in engine.layers if len(layer["origin"]) > 1 for o in layer["origin"]}


def _perturbed(model: onnx.ModelProto, node_name: str, factor: float = 1.05) -> onnx.ModelProto:
    """A copy whose node ``node_name`` has its weight (second input) scaled: a layer Kiln gets wrong."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    node = next(n for n in m.graph.node if n.name == node_name)
    init = next(i for i in m.graph.initializer if i.name == node.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    return m


def _ort_all(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    m = _mark_all(model)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


# ---- engine tensors hold the ONNX values they are named after ------------------------------------
@pytest.mark.parametrize("name", ["paddle_detector", "nhwc", "resnet_blocks", "encoder"])
def test_engine_tensor_names_hold_those_onnx_values(name) -> None:
    """Every engine tensor whose name is also an ONNX value holds that value (FP32, ONNX Runtime as the
    reference): what per-layer comparison relies on, checked without its own filtering."""
    model, feeds = MODELS[name]()
    engine = _engine(model, feeds)
    ours = engine.context().run_all(feeds)
    ref = _ort_all(model, feeds)
    common = [n for n in ours if n in ref]
    assert len(common) >= 4
    for n in common:
        a, b = np.asarray(ours[n], np.float64), np.asarray(ref[n], np.float64)
        assert a.shape == b.shape, n
        assert np.abs(a - b).max() <= 1e-5 + 1e-4 * np.abs(b).max(), n


# ---- passing models name no layer --------------------------------------------------------------
@pytest.mark.parametrize("name, fusions, compared", [
    # BN folding (stem, HardSwish, depthwise + PRelu, swish, residual, ConvTranspose), epilogues, stem pool,
    # pointwise head; the depthwise conv's BN output is what the PRelu reads
    ("paddle_detector", {"Pointwise", "Deconvolution"},
     ["maxpool_0.tmp", "hardswish_0.tmp", "batchnormalization_2.tmp", "prelu_0.tmp", "mul_0.tmp", "relu_1.tmp",
      "batchnormalization_5.tmp", "leakyrelu_0.tmp", "mul_2.tmp"]),
    ("nhwc", {"Pointwise"}, ["relu_0.tmp", "add_0.tmp", "relu_1.tmp", "add_1.tmp"]),   # unnamed nodes
    # the projection shortcut and both blocks' 1×1 chains: two-output layers
    ("resnet_blocks", {"Conv1x1Chain"}, ["relu_2.tmp", "relu_3.tmp", "relu_5.tmp", "relu_6.tmp"]),
    ("encoder", {"Attention", "Normalization", "Split"},
     ["/v/Add_output_0", "/MatMul_1_output_0", "/ln1/Add_1_output_0", "/Mul_1_output_0", "y"]),
    ("bert", {"Attention", "Normalization", "Split"}, ["hidden"]),
])
@pytest.mark.usefixtures("gpu_fusions")         # the GPU's 1×1 chains and projection sums: two-output layers
def test_passing_fused_model_names_no_layer(name, fusions, compared) -> None:
    model, feeds = MODELS[name]()
    engine = _engine(model, feeds)
    assert fusions <= _kinds(engine) and _fused(engine)
    r = kiln.compare(model, device="cpu", engine=engine, inputs=feeds, per_layer=True)
    assert r.passed
    assert r.layers and all(rec.passed for rec in r.layers), [rec.tensor for rec in r.layers if not rec.passed]
    assert r.first_bad is None and r.first_jump is None
    assert {rec.tensor for rec in r.layers} >= set(compared)
    text = r.report()
    assert "first bad layer" not in text and "jump" not in text


def test_paddle_detector_compares_bn_outputs_not_conv_outputs() -> None:
    """The issue's case: a conv with its BN folded is compared under the BN output's name, never under
    the conv's pre-BN one; the CLI says PASSED and blames nothing."""
    model, feeds = paddle_detector()
    r = kiln.compare(model, device="cpu", inputs=feeds, per_layer=True)
    tensors = {rec.tensor for rec in r.layers}
    assert "batchnormalization_2.tmp" in tensors and not any(t.startswith("conv_") for t in tensors)
    rec = next(x for x in r.layers if x.tensor == "batchnormalization_2.tmp")
    assert rec.node == "p2o.BatchNormalization.2" and {"p2o.Conv.2", "p2o.BatchNormalization.2"} <= set(rec.fused)


# ---- a wrong layer is still named ---------------------------------------------------------------
@pytest.mark.parametrize("name, wrong, blamed", [
    # the swish block: Conv+BN+Sigmoid+Mul run as one layer, compared at the Mul's output
    ("paddle_detector", "p2o.Conv.3", "p2o.Mul.0"),
    # after the depthwise conv whose BN output stays visible
    ("paddle_detector", "p2o.Conv.2", "p2o.BatchNormalization.2"),
    # the second output of a 1×1 chain (the next block's first conv)
    ("resnet_blocks", "p2o.Conv.4", "p2o.Relu.3"),
])
def test_wrong_fused_layer_is_named(name, wrong, blamed) -> None:
    model, feeds = MODELS[name]()
    engine = _engine(_perturbed(model, wrong), feeds)       # Kiln runs a conv with 5% larger weights
    r = kiln.compare(model, device="cpu", engine=engine, inputs=feeds, per_layer=True)
    assert not r.passed and r.first_bad is not None
    assert r.first_bad.node == blamed and wrong in r.first_bad.fused
    assert all(rec.passed for rec in r.layers if rec.index < r.first_bad.index)
    assert f"first bad layer: node {blamed!r}" in r.report() and repr(wrong) in r.report()


def test_wrong_attention_projection_is_named() -> None:
    """In the encoder, q/k/v run as one GEMM and a Split; a wrong value projection is blamed at the
    value's Split output (its Add), not at the fused attention."""
    model, feeds = encoder()
    engine = _engine(_perturbed(model, "/v/MatMul", 1.2), feeds)
    assert {"Attention", "Split"} <= _kinds(engine)
    r = kiln.compare(model, device="cpu", engine=engine, inputs=feeds, per_layer=True)
    assert not r.passed and r.first_bad is not None
    assert r.first_bad.node == "/v/Add" and r.first_bad.tensor == "/v/Add_output_0"
    assert "/v/MatMul" in r.first_bad.fused


# ---- compare checks the meaning of a name itself -----------------------------------------------
def test_same_meaning_rules() -> None:
    fused = ["conv", "bn"]
    assert same_meaning("bn", True, {"relu"}, fused, 1)
    assert not same_meaning("conv", True, {"bn"}, fused, 1)              # the layer computes past it
    assert not same_meaning("other", True, set(), fused, 1)              # written by a layer not running it
    assert same_meaning("add", True, {"norm"}, ["add", "norm"], 2)       # a second output may be inner
    assert same_meaning("relu", True, set(), [], 1)                      # a cast the builder added
    assert not same_meaning("mvn", True, {"neg"}, ["mvn"], 1, [["mvn"]])  # the node goes on past it
    assert same_meaning("lstm", False, {"neg"}, ["lstm"], 1, [["lstm"]])  # Y_h taken from Y: both outputs


def test_node_converted_to_several_layers_is_not_blamed_for_an_intermediate() -> None:
    """tf2onnx names a node's output NODE:0, the name the parser also gives the first layer it adds for
    that node: a three-input Mean becomes a sum, then a division, and the sum must not be compared with
    the node's output (the Mean is not compared at all; the Neg after it is)."""
    nodes = [helper.make_node("Relu", ["x"], ["model/a:0"], name="model/a"),
             helper.make_node("Mean", ["model/a:0", "x", "c"], ["model/mean:0"], name="model/mean"),
             helper.make_node("Neg", ["model/mean:0"], ["y"], name="model/neg")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.full(4, 0.5, np.float32), "c")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    for level in (0, 3):
        engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu", optimization_level=level))
        r = kiln.compare(model, device="cpu", engine=engine, inputs={"x": x}, per_layer=True)
        assert r.passed and r.first_jump is None and all(rec.passed for rec in r.layers)
        assert {"model/a:0", "y"} <= {rec.tensor for rec in r.layers}


def _forgetful_replace_output(net, old, new) -> None:
    """replace_output as a careless pass would write it: the fused tensor keeps its old name."""
    name = old.name
    was_output = old in net.outputs
    net.replace_all_uses(old, new)
    if was_output:
        net.tensors.pop(name, None)
        old.name = name + "#dead"
        net.rename(new, name)


def test_compare_skips_names_a_pass_left_on_fused_values(monkeypatch) -> None:
    """If fusion passes left a conv's name on its fused conv+BN+activation output, comparison must skip
    that name (the engine's own record of what it fused says the value differs), not blame the conv."""
    import kiln.passes.bn_fold as bn_fold
    import kiln.passes.fuse_epilogue as fuse_epilogue
    import kiln.passes.fuse_stem_pool as fuse_stem_pool
    for mod in (match_helpers, bn_fold, fuse_epilogue, fuse_stem_pool):
        monkeypatch.setattr(mod, "replace_output", _forgetful_replace_output)
    model, feeds = paddle_detector()
    engine = _engine(model, feeds)
    ours = engine.context().run_all(feeds)
    assert "conv_0.tmp" in ours and "relu_0.tmp" not in ours      # the stem's conv name on its fused output
    r = kiln.compare(model, device="cpu", engine=engine, inputs=feeds, per_layer=True)
    assert r.passed and r.layers and r.first_jump is None and all(rec.passed for rec in r.layers)
    assert not any(rec.tensor.startswith("conv_") for rec in r.layers)


# ---- relative error where the reference is zero --------------------------------------------------
def test_relative_error_is_floored_at_atol() -> None:
    ref = np.array([0.0, 0.0, 2.0, -4.0, 0.0])
    got = np.array([3e-6, 0.0, 2.002, -4.0, -5e-5])
    atol = 1e-5
    s = error_stats(got, ref, atol=atol, rtol=1e-4)
    want = [abs(g - r) / max(abs(r), atol) for g, r in zip(got, ref)]   # 0.3, 0, 1e-3, 0, 5
    assert s.max_rel == pytest.approx(max(want)) and s.mean_rel == pytest.approx(sum(want) / len(want))
    assert s.max_abs == pytest.approx(2e-3) and not s.passed          # 2e-3 > 1e-5 + 1e-4·4
    zeros = np.zeros(4)
    s = error_stats(np.full(4, 2e-6), zeros, atol=atol, rtol=1e-4)
    assert s.passed and s.max_rel == pytest.approx(0.2) and s.rel_l2 == pytest.approx(0.2)
    assert s.metric == pytest.approx(0.2)
    s = error_stats(np.full(4, 2e-6), zeros, atol=0.0, rtol=1e-4)     # no floor at all: infinitely relative
    assert s.max_rel == math.inf and not s.passed
    assert error_stats(zeros, zeros, atol=0.0, rtol=0.0).max_rel == 0.0


def test_report_prints_a_bounded_relative_error_on_zero_outputs() -> None:
    """A ReLU output holds exact zeros where Kiln, built from a slightly shifted model, is off by up to
    0.05: the relative error there is at most 0.05 / atol = 5e3, not 1e300."""
    def relu_of(shift: float) -> onnx.ModelProto:
        g = _Graph(0)
        y = g.op("Relu", [g.op("Sub", ["x", g.const(shift)])])
        return g.model({"x": [4, 16]}, [y])
    x = np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(4, 16)
    engine = _engine(relu_of(0.45), {"x": x})
    got = engine.context().run({"x": x})["relu_0.tmp"].astype(np.float64)
    ref = np.maximum(x.astype(np.float64) - 0.5, 0.0)
    assert (ref == 0).any() and (got[ref == 0] > 0).any()
    want = float(np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-5)))
    r = kiln.compare(relu_of(0.5), device="cpu", engine=engine, inputs={"x": x})
    s = r.outputs[0].stats
    assert not r.passed and s.max_rel == pytest.approx(want, rel=1e-3) and 1.0 < s.max_rel <= 5.001e3
    assert f"max rel {s.max_rel:.3e}" in r.report() and "rel = |diff| / max(|ref|, 1e-05)" in r.report()
