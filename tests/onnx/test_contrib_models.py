"""Files that ONNX Runtime's own tools write, run end to end by Kiln and compared with ONNX Runtime.

- ``onnxruntime.transformers.optimizer`` on a tiny BERT-structured encoder (exported by torch) writes
  EmbedLayerNormalization, Attention or MultiHeadAttention, SkipLayerNormalization, BiasGelu/FastGelu;
- ``quantize_dynamic`` writes DynamicQuantizeLinear + MatMulInteger (DynamicQuantizeMatMul once an ONNX Runtime
  session has optimized and saved it);
- ``quantize_static`` in QOperator format writes QLinearConv, QLinearAdd, QLinearSigmoid, QLinearMatMul,
  QLinearGlobalAveragePool, QGemm and QLinearConcat;
- ``MatMulNBitsQuantizer`` writes MatMulNBits;
- an ONNX Runtime session at ORT_ENABLE_EXTENDED saves FusedConv, FusedMatMul, FusedGemm, QuickGelu, Gelu and
  SkipLayerNormalization into its optimized model file.

ONNX Runtime runs the saved files with graph optimizations off, so it executes these ops itself.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from test_contrib_ops import assert_fp32, kiln_run, ort

RNG = np.random.default_rng(1)
VOCAB, HIDDEN, HEADS = 40, 32, 4


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _bert_module(gelu: str):
    """An encoder with BERT's structure (embeddings + LN, post-LN blocks, additive -10000 mask)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(HIDDEN, eps=1e-12), nn.LayerNorm(HIDDEN, eps=1e-12)
            self.up, self.down = nn.Linear(HIDDEN, 2 * HIDDEN), nn.Linear(2 * HIDDEN, HIDDEN)

        def heads(self, x):
            return x.view(x.shape[0], x.shape[1], HEADS, HIDDEN // HEADS).permute(0, 2, 1, 3)

        def forward(self, x, bias):
            q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HIDDEN // HEADS) + bias
            ctx = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).contiguous()
            x = self.ln1(self.o(ctx.view(ctx.shape[0], ctx.shape[1], HIDDEN)) + x)
            return self.ln2(self.down(nn.functional.gelu(self.up(x), approximate=gelu)) + x)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word, self.pos = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(16, HIDDEN)
            self.tok = nn.Embedding(2, HIDDEN)
            self.ln = nn.LayerNorm(HIDDEN, eps=1e-12)
            self.blocks = nn.ModuleList([Block(), Block()])
            self.register_buffer("position_ids", torch.arange(16).unsqueeze(0))

        def forward(self, ids, mask, types):
            x = self.ln(self.word(ids) + self.tok(types) + self.pos(self.position_ids[:, :ids.shape[1]]))
            bias = (1.0 - mask[:, None, None, :].to(torch.float32)) * -10000.0
            for block in self.blocks:
                x = block(x, bias)
            return x
    torch.manual_seed(0)
    return Encoder().eval()


@pytest.fixture(scope="module")
def bert_exports(tmp_path_factory) -> dict[str, Path]:
    import torch
    out = {}
    root = tmp_path_factory.mktemp("bert")
    ids = torch.zeros(2, 8, dtype=torch.int64)
    for gelu in ("none", "tanh"):
        path = root / f"bert_{gelu}.onnx"
        dyn = {n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "token_type_ids")}
        torch.onnx.export(_bert_module(gelu), (ids, ids, ids), str(path), opset_version=17, dynamo=False,
                          input_names=list(dyn), output_names=["hidden"], dynamic_axes=dyn)
        out[gelu] = path
    return out


@pytest.mark.parametrize("case,gelu,expected", [
    ("mask_index", "none", {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"}),
    ("raw_mask_fast_gelu", "none", {"Attention", "SkipLayerNormalization", "FastGelu"}),
    ("multi_head", "none", {"MultiHeadAttention", "SkipLayerNormalization", "BiasGelu"}),
    ("tanh_gelu", "tanh", {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "FastGelu"})])
def test_ort_optimized_bert(bert_exports, tmp_path, case, gelu, expected) -> None:
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    options = FusionOptions("bert")
    if case == "raw_mask_fast_gelu":
        options.attention_mask_format = AttentionMaskFormat.AttentionMask
        options.enable_gelu_approximation = True
    if case == "multi_head":
        options.use_multi_head_attention = True
        options.enable_embed_layer_norm = False
    opt = optimize_model(str(bert_exports[gelu]), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN,
                         optimization_options=options, opt_level=0)
    path = tmp_path / "optimized.onnx"
    opt.save_model_to_file(str(path))
    model = onnx.load(path)
    assert expected <= set(_ops(model)), f"ORT's optimizer wrote {dict(_ops(model))}"
    mask = np.ones((2, 8), np.int64)
    mask[1, 5:] = 0
    feeds = {"input_ids": RNG.integers(0, VOCAB, (2, 8)).astype(np.int64), "attention_mask": mask,
             "token_type_ids": (RNG.random((2, 8)) > 0.5).astype(np.int64)}
    assert_fp32(kiln_run(model, feeds)["hidden"], ort(model, feeds)["hidden"], "hidden")


# ---- quantizer outputs ---------------------------------------------------------------------------

def _float_model(nodes, inputs, inits: dict, out: str, path: Path) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return path


def _w(*shape, scale=0.3) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _mlp(path: Path) -> Path:
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    return _float_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])],
                        {"w1": _w(16, 32), "b1": _w(32), "w2": _w(32, 8)}, "y", path)


@pytest.mark.parametrize("session_optimized", [False, True])
def test_quantize_dynamic(tmp_path, session_optimized) -> None:
    """As quantize_dynamic writes it (DynamicQuantizeLinear + MatMulInteger), and as an ONNX Runtime session
    saves it after its own fusions (DynamicQuantizeMatMul)."""
    import onnxruntime as rt
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(_mlp(tmp_path / "f.onnx")), str(tmp_path / "q.onnx"), weight_type=QuantType.QUInt8)
    path, expected = tmp_path / "q.onnx", {"DynamicQuantizeLinear", "MatMulInteger"}
    if session_optimized:
        so = rt.SessionOptions()
        so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp_path / "o.onnx")
        rt.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        path, expected = tmp_path / "o.onnx", {"DynamicQuantizeMatMul"}
    model = onnx.load(path)
    assert expected <= set(_ops(model)), dict(_ops(model))
    feeds = {"x": _w(3, 16, scale=1.0)}
    assert_fp32(kiln_run(model, feeds)["y"], ort(model, feeds)["y"], "y")


def _conv_net(path: Path) -> Path:
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), n("Relu", ["c1"], ["r1"]),
             n("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             n("Add", ["c2", "r1"], ["s"]), n("Sigmoid", ["s"], ["g"]),
             n("Reshape", ["g", "shape"], ["flat"]), n("MatMul", ["flat", "w3"], ["m"]),
             n("GlobalAveragePool", ["g"], ["gap"]), n("Flatten", ["gap"], ["gf"]),
             n("Gemm", ["gf", "w4", "b4"], ["gm"], transB=1), n("Concat", ["m", "gm"], ["y"], axis=1)]
    inits = {"w1": _w(8, 3, 3, 3), "b1": _w(8), "w2": _w(8, 8, 3, 3, scale=0.1), "b2": _w(8),
             "shape": np.asarray([2, 8 * 6 * 6], np.int64), "w3": _w(8 * 6 * 6, 10, scale=0.05),
             "w4": _w(6, 8), "b4": _w(6)}
    return _float_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])], inits, "y", path)


def test_quantize_static_qoperator(tmp_path) -> None:
    """QOperator format; each quantized op runs bit-exactly as in ONNX Runtime, so the dequantized output
    matches within float rounding."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": _w(2, 3, 6, 6, scale=1.0)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(_conv_net(tmp_path / "f.onnx")), str(tmp_path / "q.onnx"), Reader(),
                    quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, reduce_range=True)
    model = onnx.load(tmp_path / "q.onnx")
    expected = {"QLinearConv", "QLinearAdd", "QLinearSigmoid", "QLinearMatMul", "QLinearGlobalAveragePool", "QGemm",
                "QLinearConcat"}
    assert expected <= set(_ops(model)), dict(_ops(model))
    feeds = {"x": _w(2, 3, 6, 6, scale=1.0)}
    assert_fp32(kiln_run(model, feeds)["y"], ort(model, feeds)["y"], "y")


def test_matmul_nbits_quantizer(tmp_path) -> None:
    pytest.importorskip("onnx_ir", reason="ONNX Runtime's MatMulNBitsQuantizer needs the onnx-ir package")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    float_model = onnx.load(_mlp(tmp_path / "f.onnx"))
    quant = MatMulNBitsQuantizer(float_model, block_size=16, is_symmetric=False)
    quant.process()
    model = quant.model.model
    assert _ops(model)["MatMulNBits"] == 2, dict(_ops(model))
    feeds = {"x": _w(3, 16, scale=1.0)}
    assert_fp32(kiln_run(model, feeds)["y"], ort(model, feeds)["y"], "y")


def test_ort_session_optimized_file(tmp_path) -> None:
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), n("Relu", ["c1"], ["r1"]),
             n("Reshape", ["r1", "shape"], ["f"]),                                               # [2, 8, 36]
             n("Transpose", ["w2"], ["w2t"], perm=[1, 0]), n("MatMul", ["f", "w2t"], ["m"]),
             n("Mul", ["m", "half"], ["ms"]),                                                    # → FusedMatMul
             n("Mul", ["ms", "k"], ["a"]), n("Sigmoid", ["a"], ["sg"]), n("Mul", ["ms", "sg"], ["qg"]),  # → QuickGelu
             n("Div", ["qg", "sqrt2"], ["d"]), n("Erf", ["d"], ["e"]), n("Add", ["e", "one"], ["e1"]),
             n("Mul", ["qg", "e1"], ["g0"]), n("Mul", ["g0", "half"], ["g"]),                      # → Gelu
             n("Add", ["g", "skip"], ["sk"]),
             n("LayerNormalization", ["sk", "gamma", "beta"], ["ln"]),                           # → SkipLayerNorm
             n("Reshape", ["ln", "shape2"], ["ln2"]), n("Gemm", ["ln2", "w3", "b3"], ["gm"], transB=1),
             n("LeakyRelu", ["gm"], ["y"], alpha=0.2)]                                           # → FusedGemm
    inits = {"w1": _w(8, 3, 3, 3), "b1": _w(8), "shape": np.asarray([2, 8, 36], np.int64), "w2": _w(16, 36),
             "half": np.float32(0.5), "k": np.float32(1.702), "sqrt2": np.float32(np.sqrt(2)), "one": np.float32(1),
             "skip": _w(2, 8, 16), "gamma": _w(16), "beta": _w(16), "shape2": np.asarray([2, 128], np.int64),
             "w3": _w(10, 128, scale=0.1), "b3": _w(10)}
    src = _float_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])], inits, "y",
                       tmp_path / "f.onnx")
    import onnxruntime as rt
    so = rt.SessionOptions()
    so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "o.onnx")
    rt.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    model = onnx.load(tmp_path / "o.onnx")
    expected = {"FusedConv", "FusedMatMul", "QuickGelu", "Gelu", "SkipLayerNormalization", "FusedGemm"}
    assert expected <= set(_ops(model)), dict(_ops(model))
    feeds = {"x": _w(2, 3, 6, 6, scale=1.0)}
    assert_fp32(kiln_run(model, feeds)["y"], ort(model, feeds)["y"], "y")


@pytest.mark.slow
@pytest.mark.parametrize("arch,expected", [("bert", {"Attention", "SkipLayerNormalization", "BiasGelu"}),
                                           ("gpt2", {"SkipLayerNormalization", "FastGelu"})])
def test_ort_optimized_transformers_model(tmp_path, arch, expected) -> None:
    """Hugging Face BERT and GPT-2 (tiny random configs, eager attention) through ONNX Runtime's optimizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from onnxruntime.transformers.optimizer import optimize_model
    if arch == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                                      num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                                      max_position_embeddings=16)
        names = ["input_ids", "attention_mask", "token_type_ids"]
    else:
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=16,
                                      use_cache=False)
        names = ["input_ids", "attention_mask"]
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    inner = (transformers.BertModel if arch == "bert" else transformers.GPT2Model)(cfg).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(**dict(zip(names, args))).last_hidden_state
    ids = torch.zeros(2, 8, dtype=torch.int64)
    torch.onnx.export(Wrapper(), tuple(ids for _ in names), str(tmp_path / "m.onnx"), opset_version=17, dynamo=False,
                      input_names=names, output_names=["hidden"])
    opt = optimize_model(str(tmp_path / "m.onnx"), model_type=arch, num_heads=HEADS, hidden_size=HIDDEN, opt_level=0)
    opt.save_model_to_file(str(tmp_path / "o.onnx"))
    model = onnx.load(tmp_path / "o.onnx")
    assert expected <= set(_ops(model)), dict(_ops(model))
    mask = np.ones((2, 8), np.int64)
    mask[1, 5:] = 0
    feeds = {"input_ids": RNG.integers(0, VOCAB, (2, 8)).astype(np.int64), "attention_mask": mask,
             "token_type_ids": np.zeros((2, 8), np.int64)}
    feeds = {k: feeds[k] for k in names}
    assert_fp32(kiln_run(model, feeds)["hidden"], ort(model, feeds)["hidden"], "hidden")
