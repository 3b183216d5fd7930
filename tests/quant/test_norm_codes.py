"""A LayerNorm/RMSNorm writes the 8-bit codes its quantized readers need (passes/fold_qdq.py's rule
"Q(layer/RMS norm's output) -> its codes output"): the Triton add+norm kernel (TRITON_INTERPRET on the CPU)
against the torch tactic, the fold on a post-LN transformer block quantized by Kiln's own PTQ (forced on for a
CPU build) against the same network run dequantized, and the engine schema of the new attributes."""
from __future__ import annotations

import copy
import importlib
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.engine.format import read_engine, write_engine
from kiln.errors import EngineFormatError
from kiln.kernels import KernelContext, get_tactic
from kiln.kernels.quantize import quantize_values
from kiln.triton_support import HAS_TRITON, interpreting

from _quant_models import _model

build_module = importlib.import_module("kiln.builder.build")
CODE_TYPES = {"int8": (torch.int8, 3), "uint8": (torch.uint8, 128), "float8_e4m3fn": (torch.float8_e4m3fn, 0)}


def _ordinal(codes: torch.Tensor) -> np.ndarray:
    """Each code as its position among its type's codes, so neighbouring codes differ by one: the integer itself,
    or for FP8 E4M3 the signed rank of the magnitude's bit pattern (monotonic in the value; -0 and +0 are 0)."""
    if codes.dtype != torch.float8_e4m3fn:
        return codes.to(torch.int32).numpy()
    bits = codes.view(torch.uint8).to(torch.int32).numpy()
    return np.where(bits & 0x80, -(bits & 0x7F), bits & 0x7F)


def _assert_codes_close(ours: torch.Tensor, ref: torch.Tensor, what: str, equal: float = 0.99,
                        steps: int = 1) -> None:
    """8-bit codes: within ``steps`` code steps everywhere (a value within float rounding of a rounding boundary
    may go either way: one step; codes computed from codes that already differ by a step: more), at least
    ``equal`` of them equal, and a real spread of codes compared."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, what
    a, b = _ordinal(ours.cpu()), _ordinal(ref.cpu())
    assert np.abs(a - b).max() <= steps, what
    assert np.mean(a == b) >= equal, what
    assert np.unique(b).size > 20, what


def _attrs(kind: str, codes_to: str, scale: float, residual: bool, sum_output: bool) -> dict:
    return {"type": kind, "axis": -1, "epsilon": 1e-5, "sum_output": sum_output and residual,
            "codes_scale": scale, "codes_zero_point": CODE_TYPES[codes_to][1], "codes_to": codes_to}


# (norm type, input dtype, residual, sum output): plain, with a residual, pre-LN with the sum read again; RMS; FP16
KERNEL_CASES = [("layer", torch.float32, False, False), ("layer", torch.float32, True, False),
                ("layer", torch.float32, True, True), ("rms", torch.float32, True, False),
                ("layer", torch.float16, True, True)]


@pytest.mark.skipif(not HAS_TRITON or not interpreting(), reason="runs the Triton kernel in TRITON_INTERPRET mode")
@pytest.mark.parametrize("codes_to", list(CODE_TYPES))
@pytest.mark.parametrize("kind,dtype,residual,sum_output", KERNEL_CASES)
def test_triton_kernel_writes_the_torch_tactics_codes(codes_to, kind, dtype, residual, sum_output):
    """The Triton kernel's codes (one pass with y) against the torch tactic's QuantizeLinear of its own y: within one
    code step, nearly all equal; y and the sum as the torch tactic's; the codes are those of the kernel's y as stored
    (rounded to its dtype), so an FP16 y gives the codes of FP16 values. The scales saturate the tails."""
    from kiln.kernels.int8_gemm import Codes
    from kiln.kernels.norm_triton import add_norm
    g = torch.Generator().manual_seed(len(codes_to) + 7 * residual + 3 * sum_output)
    x = (torch.randn(6, 48, generator=g) * 2).to(dtype)             # 48: not a power of two (a masked tail)
    r = torch.randn(6, 48, generator=g).to(dtype) if residual else None
    w, b = (torch.rand(48, generator=g) + 0.5).to(dtype), (torch.randn(48, generator=g) * 0.3).to(dtype)
    scale = 0.02 if codes_to != "float8_e4m3fn" else 0.006        # |y| up to ~4: int8 saturates past 2.5
    attrs = _attrs(kind, codes_to, scale, residual, sum_output)
    want = get_tactic("Normalization", "torch").make(attrs, KernelContext(device="cpu"))(x, w, b, None, None, r)
    assert len(want) == 2 + attrs["sum_output"]
    torch_dt, zp = CODE_TYPES[codes_to]
    got = add_norm(x, r, w, b, 1e-5, attrs["sum_output"], kind == "rms", None, Codes(torch_dt, scale, zp))
    y, s, q = got
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 4e-3}
    torch.testing.assert_close(y.float(), want[0].float(), **tol)
    if attrs["sum_output"]:
        torch.testing.assert_close(s, want[1])
    else:
        assert s is None
    # FP16: the two y may differ by an FP16 ulp (at most 1/10 of a code step at these scales) on any element
    _assert_codes_close(q, want[-1], f"{kind} {dtype} {codes_to}", 0.99 if dtype == torch.float32 else 0.9)
    # the kernel quantizes its own y as stored: the FP32 reciprocal of the scale where ONNX divides (see int8_gemm)
    _assert_codes_close(q, quantize_values(y, scale, zp, codes_to), "codes of y as stored")
    if codes_to != "float8_e4m3fn":
        info = torch.iinfo(torch_dt)
        assert int(q.min()) == info.min or int(q.max()) == info.max        # saturated, not wrapped
    else:
        assert float(q.float().abs().max()) == 448.0                          # saturated to E4M3's largest


def test_torch_rms_norm_keeps_its_bias():
    """The torch tactic's RMS norm with a bias (as the Triton kernel computes it) against numpy in float64."""
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(3, 24, generator=g), torch.rand(24, generator=g) + 0.5, torch.randn(24, generator=g)
    (y,) = get_tactic("Normalization", "torch").make({"type": "rms", "epsilon": 1e-6}, KernelContext(device="cpu"))(
        x, w, b)
    xd = x.double().numpy()
    want = xd / np.sqrt((xd * xd).mean(-1, keepdims=True) + 1e-6) * w.double().numpy() + b.double().numpy()
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)


def test_codes_output_arity_and_dtypes_on_meta():
    """The torch tactic's outputs, as shape inference sees them on meta tensors: y, the sum (sum_output), the
    codes (codes_scale) in their 8-bit type; none without codes_scale."""
    make = get_tactic("Normalization", "torch").make
    x = torch.empty(2, 3, 16, device="meta", dtype=torch.float16)
    for sum_output in (False, True):
        for codes_to, (dt, _) in CODE_TYPES.items():
            outs = make(_attrs("layer", codes_to, 0.1, True, sum_output), KernelContext(device="cpu"))(
                x, None, None, None, None, x)
            assert [o.dtype for o in outs] == [torch.float16] * (1 + sum_output) + [dt]
            assert all(o.shape == x.shape for o in outs)
        plain = make({"type": "layer", "sum_output": sum_output}, KernelContext(device="cpu"))(x, None, None, None,
                                                                                                None, x)
        assert len(plain) == 1 + sum_output


def _post_ln_block(hidden: int = 16, ffn: int = 32) -> onnx.ModelProto:
    """x[N, S, H] -> LayerNorm = h0 -> Q/K/V MatMuls (+ bias) -> single-head attention -> output MatMul + h0 ->
    LayerNorm = h1 -> FFN (MatMul, ReLU, MatMul) + h1 -> LayerNorm -> y: a post-LN (BERT) block after an embedding
    LayerNorm; h0 and h1 feed both quantized GEMMs and a residual add."""
    rng = np.random.default_rng(61)

    def w(*s: int) -> np.ndarray:
        return (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
    inits = {f"w{n}": w(hidden, hidden) for n in "qkvo"}
    inits.update({f"b{n}": (rng.standard_normal(hidden) * 0.1).astype(np.float32) for n in "qkvo"})
    inits.update(w1=w(hidden, ffn), b1=(rng.standard_normal(ffn) * 0.1).astype(np.float32), w2=w(ffn, hidden),
                 b2=(rng.standard_normal(hidden) * 0.1).astype(np.float32),
                 scale=np.asarray(1 / math.sqrt(hidden), np.float32))
    for i in range(3):
        inits[f"g{i}"] = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
        inits[f"be{i}"] = (rng.standard_normal(hidden) * 0.1).astype(np.float32)

    def ln(i: int, x: str, y: str) -> onnx.NodeProto:
        return helper.make_node("LayerNormalization", [x, f"g{i}", f"be{i}"], [y], name=f"ln{i}", axis=-1,
                                epsilon=1e-5)
    nodes = [ln(0, "x", "h0")]
    for n in "qkv":
        nodes += [helper.make_node("MatMul", ["h0", f"w{n}"], [f"{n}0"], name=f"mm_{n}"),
                  helper.make_node("Add", [f"{n}0", f"b{n}"], [n], name=f"add_{n}")]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q", "kt"], ["s0"], name="scores"),
              helper.make_node("Mul", ["s0", "scale"], ["s"], name="scaled"),
              helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["c"], name="context"),
              helper.make_node("MatMul", ["c", "wo"], ["o0"], name="mm_o"),
              helper.make_node("Add", ["o0", "bo"], ["o"], name="add_o"),
              helper.make_node("Add", ["o", "h0"], ["a"], name="residual1"), ln(1, "a", "h1"),
              helper.make_node("MatMul", ["h1", "w1"], ["f0"], name="ffn1"),
              helper.make_node("Add", ["f0", "b1"], ["f1"], name="add_f1"),
              helper.make_node("Relu", ["f1"], ["f"], name="relu"),
              helper.make_node("MatMul", ["f", "w2"], ["e0"], name="ffn2"),
              helper.make_node("Add", ["e0", "b2"], ["e"], name="add_f2"),
              helper.make_node("Add", ["e", "h1"], ["a2"], name="residual2"), ln(2, "a2", "y")]
    shape = ["N", "S", hidden]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)


def _ptq_block(x: np.ndarray):
    """Kiln's --int8 (max calibrator, no smoothing) of the post-LN block of x's hidden size, every QuantizeLinear's
    codes marked as an output."""
    from kiln.builder.quant import quantize
    calib = np.random.default_rng(62).standard_normal((8, *x.shape[1:])).astype(np.float32)
    qnet = quantize(kiln.onnx.parse(_post_ln_block(x.shape[-1], 2 * x.shape[-1])), kiln.BuildConfig(
        device="cpu", quantize="int8", calibration=[{"x": calib}], calibrator="max", profiles={"x": x.shape},
        smoothing=False))
    codes = [layer.outputs[0].name for layer in qnet.layers if layer.kind == "QuantizeLinear"]
    for c in codes:
        qnet.mark_output(qnet.tensors[c])
    return qnet, codes


def _fold_engine(monkeypatch, precision: str = "fp32"):
    """(engine with the fold forced on, the same network built without it, input, code tensor names)."""
    x = np.random.default_rng(63).standard_normal((4, 8, 16)).astype(np.float32)
    qnet, codes = _ptq_block(x)
    config = kiln.BuildConfig(device="cpu", precision=precision, profiles={"x": x.shape})
    monkeypatch.setattr(build_module, "folds_quantization", lambda device, config: False)
    ref = kiln.build(qnet, config)
    monkeypatch.setattr(build_module, "folds_quantization", lambda device, config: True)
    return kiln.build(qnet, config), ref, x, codes


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_post_ln_block_norms_write_the_codes(monkeypatch, precision):
    """In the quantized post-LN block, no QuantizeLinear reads a Normalization any more: the embedding LayerNorm
    and the fused add+LayerNorm write the codes the Q/K/V and FFN1 GEMMs read, beside the float output the next
    residual add reads. The codes and the output match the network run dequantized (a CPU build without the fold):
    codes within one step, nearly all equal; y within 2% of its range (int32 bias codes; in FP16 the rounding of
    the activations)."""
    engine, ref, x, codes = _fold_engine(monkeypatch, precision)
    made = {o: layer for layer in engine.layers for o in layer["outputs"]}
    norms = [layer for layer in engine.layers if layer["kind"] == "Normalization"]
    assert [layer["name"] for layer in norms if "codes_scale" in layer["attrs"]] == ["ln0", "ln1/add"]
    for layer in engine.layers:
        if layer["kind"] == "QuantizeLinear":
            assert made[layer["inputs"][0]]["kind"] != "Normalization", layer["name"]
    for norm in norms[:2]:
        a = norm["attrs"]
        assert norm["outputs"][-1] in codes and len(norm["outputs"]) == 2 and a["codes_to"] == "int8"
        readers = [layer for layer in engine.layers if norm["outputs"][-1] in layer["inputs"]]
        assert readers and {layer["kind"] for layer in readers} == {"QFullyConnected"}
        floats = [layer for layer in engine.layers if norm["outputs"][0] in layer["inputs"]]
        assert floats and all(layer["kind"] != "QuantizeLinear" for layer in floats)     # the residual add's
    assert {n["precision"] for n in norms} == {"fp32" if precision == "fp32" else "fp16 (fp32 accum)"}
    ours, want = engine.context().run({"x": x}), ref.context().run({"x": x})
    for c in codes:     # (FP16: the 8-bit GEMMs' FP16 outputs round apart from the float GEMMs' on dequantized values)
        _assert_codes_close(torch.from_numpy(ours[c]), torch.from_numpy(want[c]), c,
                            0.98 if precision == "fp32" else 0.95)
    if precision == "fp32":     # the embedding LayerNorm reads x itself: the same y, the same codes
        np.testing.assert_array_equal(ours[norms[0]["outputs"][-1]], want[norms[0]["outputs"][-1]])
    np.testing.assert_allclose(ours["y"], want["y"], rtol=0, atol=0.02 * np.abs(want["y"]).max())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The folded block's engine, saved: (engine, path, input)."""
    with pytest.MonkeyPatch.context() as mp:
        engine, _, x, codes = _fold_engine(mp)
    path = tmp_path_factory.mktemp("norm_codes") / "block.kiln"
    engine.save(path)
    return engine, path, x


def test_engine_with_norm_codes_round_trips(saved):
    """Saved and loaded, the Normalization layers keep their codes attributes and outputs and run the same."""
    engine, path, x = saved
    again = kiln.load(path)
    norms = [(layer["attrs"], layer["outputs"]) for layer in engine.layers if layer["kind"] == "Normalization"]
    assert [(layer["attrs"], layer["outputs"]) for layer in again.layers if layer["kind"] == "Normalization"] == norms
    ours, back = engine.context().run({"x": x}), again.context().run({"x": x})
    assert ours.keys() == back.keys()
    for k in ours:
        np.testing.assert_array_equal(back[k], ours[k])


def _norm(h: dict, name: str) -> dict:
    return next(layer for layer in h["plan"]["layers"] if layer["name"] == name)


FORGED = {
    "zero scale": (lambda h: _norm(h, "ln0")["attrs"].update(codes_scale=0.0), "codes_scale"),
    "negative scale": (lambda h: _norm(h, "ln0")["attrs"].update(codes_scale=-0.5), "codes_scale"),
    "infinite scale": (lambda h: _norm(h, "ln0")["attrs"].update(codes_scale=float("inf")), "codes_scale"),
    "nan scale": (lambda h: _norm(h, "ln0")["attrs"].update(codes_scale=float("nan")), "codes_scale"),
    "subnormal scale": (lambda h: _norm(h, "ln0")["attrs"].update(codes_scale=1e-40), "codes_scale"),
    "int32 codes": (lambda h: _norm(h, "ln0")["attrs"].update(codes_to="int32"), "codes_to"),
    "float16 codes": (lambda h: _norm(h, "ln1/add")["attrs"].update(codes_to="float16"), "codes_to"),
    "unknown type": (lambda h: _norm(h, "ln0")["attrs"].update(codes_to="int4x"), "codes_to"),
    "zero point": (lambda h: _norm(h, "ln0")["attrs"].update(codes_zero_point=300), "codes_zero_point"),
    "scale without type": (lambda h: _norm(h, "ln0")["attrs"].pop("codes_to"), "only one of"),
    "codes attrs, no codes output": (lambda h: _norm(h, "ln2/add")["attrs"].update(
        codes_scale=0.1, codes_to="int8"), "1 outputs where its attributes give 2"),
    "codes output, no codes attrs": (lambda h: [_norm(h, "ln0")["attrs"].pop(k) for k in ("codes_scale", "codes_to")],
                                     "2 outputs where its attributes give 1"),
    "one output too many": (lambda h: _norm(h, "ln1/add")["outputs"].append("extra"), "3 outputs"),
    # the 8-bit layers' codes output has the same declaration and the same count check
    "8-bit layer codes attrs, no codes output": (lambda h: _norm(h, "ffn2/fc")["attrs"].update(
        codes_scale=0.1, codes_to="int8"), "1 outputs where its attributes give 2"),
    "8-bit layer infinite scale": (lambda h: _norm(h, "ffn2/fc")["attrs"].update(
        codes_scale=float("inf"), codes_to="int8"), "codes_scale"),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_forged_norm_codes_are_refused_in_one_line(saved, tmp_path, case):
    """An engine whose Normalization codes attributes are out of their schema (a scale that is not a positive
    normal float32, a type other than int8/uint8/FP8 E4M3, a zero point outside 8 bits) or disagree with its
    outputs is refused at load as damaged, in one line naming the attribute, through load and read_header."""
    edit, named = FORGED[case]
    _, path, _ = saved
    header, weights = read_engine(str(path))
    h = copy.deepcopy({k: v for k, v in header.items() if k != "weights"})
    edit(h)
    forged = tmp_path / "forged.kiln"
    write_engine(str(forged), h, weights)
    for read in (kiln.load, kiln.engine.read_header):
        with pytest.raises(EngineFormatError) as info:
            read(forged)
        msg = str(info.value)
        assert "\n" not in msg and "damaged" in msg and named in msg, msg


def test_shape_inference_gives_every_tensor_after_the_fold(monkeypatch):
    """Shape inference (strict) of the folded block gives each tensor its shape and type, the norms' codes
    outputs (int8, shaped like y) and the 8-bit GEMMs that read them included."""
    from kiln.builder.shapes import UNKNOWN, evaluate
    x = np.zeros((4, 8, 16), np.float32)
    qnet, _ = _ptq_block(x)
    monkeypatch.setattr(build_module, "folds_quantization", lambda device, config: True)
    net = build_module.prepare(qnet, kiln.BuildConfig(device="cpu", profiles={"x": x.shape})).net
    vals = evaluate(net, {"x": x.shape}, strict=True)
    for layer in net.layers:
        for o in layer.outputs:
            assert vals.get(o.name, UNKNOWN) is not UNKNOWN, (layer.name, o.name)
    norms = [layer for layer in net.layers if layer.kind == "Normalization" and "codes_scale" in layer.attrs]
    assert len(norms) == 2
    for norm in norms:
        codes = vals[norm.outputs[-1].name]
        assert codes.dtype == torch.int8 and tuple(codes.shape) == x.shape


def test_tactic_choice_accepts_codes_a_step_apart_in_an_fp32_layer():
    """The builder's agreement check between a candidate tactic and the reference judges a codes output of a float
    layer (an FP32 norm's) as 8-bit layers' codes are judged: a few codes one step apart (the Triton kernel's y and
    torch's differ by float rounding) pass; codes off by one everywhere, or a float output off by 1e-4, do not."""
    from kiln.builder.tactics import _agree
    g = torch.Generator().manual_seed(9)
    y = torch.randn(64, 768, generator=g)
    q = torch.clamp(torch.round(y / 0.03), -128, 127)
    near = q.clone()
    near.view(-1)[::997] += 1                          # 50 of 49152 codes one step up
    assert _agree([y, near], [y, q], "fp32", [False, True])
    assert not _agree([y, q + 1], [y, q], "fp32", [False, True])
    assert not _agree([y * (1 + 1e-4), near], [y, q], "fp32", [False, True])
    assert not _agree([y, near], [y, q], "fp32")       # unmarked, they are floats at FP32's tolerance


def _qdq_ln_block(codes_to: str) -> onnx.ModelProto:
    """x[N, 32] -> LayerNorm = h -> QuantizeLinear/DequantizeLinear (per tensor, ``codes_to``) -> MatMul with a
    weight quantized per output channel (int8, or FP8 for FP8 codes) -> + b -> + h -> y: explicit quantization of a
    GEMM after a LayerNorm whose float output also feeds a residual add (opset 21)."""
    import ml_dtypes
    rng = np.random.default_rng(71)
    w = rng.standard_normal((32, 24)).astype(np.float32) / 6
    fp8 = codes_to == "float8_e4m3fn"
    ws = (np.abs(w).max(0) / (448 if fp8 else 127)).astype(np.float32)
    xs, (elem, zp) = np.float32(0.02 if not fp8 else 0.006), {
        "int8": (TensorProto.INT8, np.int8(0)), "uint8": (TensorProto.UINT8, np.uint8(128)),
        "float8_e4m3fn": (TensorProto.FLOAT8E4M3FN, 0.0)}[codes_to]

    def codes(name: str, v: np.ndarray, t: int) -> onnx.TensorProto:
        raw = np.asarray(v).astype(ml_dtypes.float8_e4m3fn).view(np.uint8) if t == TensorProto.FLOAT8E4M3FN else \
            np.asarray(v).astype({TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}[t])
        return helper.make_tensor(name, t, raw.shape, raw.tobytes(), raw=True)
    wt = TensorProto.FLOAT8E4M3FN if fp8 else TensorProto.INT8
    wq = w / ws if fp8 else np.clip(np.rint(w / ws), -127, 127)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, 32).astype(np.float32), "g"),
             numpy_helper.from_array((rng.standard_normal(32) * 0.1).astype(np.float32), "be"),
             numpy_helper.from_array(np.asarray(xs, np.float32), "xs"), codes("xz", np.asarray(zp), elem),
             codes("wq", wq, wt), numpy_helper.from_array(ws, "ws"), codes("wz", np.zeros(24), wt),
             numpy_helper.from_array((rng.standard_normal(24) * 0.1).astype(np.float32), "b")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "be"], ["h"], name="ln", axis=-1, epsilon=1e-5),
             helper.make_node("QuantizeLinear", ["h", "xs", "xz"], ["hq"], name="qh"),
             helper.make_node("DequantizeLinear", ["hq", "xs", "xz"], ["hd"], name="dqh"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dqw", axis=1),
             helper.make_node("MatMul", ["hd", "wd"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["mb"], name="bias"),
             helper.make_node("Slice", ["h", "zero", "n24", "one"], ["h24"], name="first24"),
             helper.make_node("Add", ["mb", "h24"], ["y"], name="residual")]
    inits += [numpy_helper.from_array(np.asarray([v], np.int64), k) for k, v in (("zero", 0), ("n24", 24),
                                                                                  ("one", 1))]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 24]),
                           helper.make_tensor_value_info("hq", elem, ["N", 32])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("codes_to", list(CODE_TYPES))
def test_explicit_qdq_after_layer_norm_matches_onnxruntime(monkeypatch, codes_to):
    """A QDQ model's LayerNorm whose output is quantized (int8, uint8 with zero point 128, FP8 E4M3) and also read as
    a float: with the fold forced on, the LayerNorm writes the codes the 8-bit GEMM reads; the codes are ONNX
    Runtime's (within one code step, nearly all equal), and y is ONNX Runtime's within the bias's rounding to int32
    codes and float rounding where a row's codes are all equal."""
    import ml_dtypes
    ort = pytest.importorskip("onnxruntime")
    model = _qdq_ln_block(codes_to)
    x = (np.random.default_rng(72).standard_normal((64, 32)) * 3).astype(np.float32)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    want_y, want_q = sess.run(None, {"x": x})
    if codes_to == "float8_e4m3fn":
        want_q = want_q.view(ml_dtypes.float8_e4m3fn)
    monkeypatch.setattr(build_module, "folds_quantization", lambda device, config: True)
    engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu", profiles={"x": x.shape}))
    kinds = [layer["kind"] for layer in engine.layers]
    assert kinds[:2] == ["Normalization", "QFullyConnected"] and "QuantizeLinear" not in kinds
    ln = engine.layers[0]
    assert ln["outputs"][1] == "hq" and ln["attrs"]["codes_to"] == codes_to
    got = engine.context().run({"x": x})
    ours = torch.from_numpy(got["hq"].view(np.uint8)).view(torch.float8_e4m3fn) if codes_to == "float8_e4m3fn" \
        else torch.from_numpy(got["hq"])
    ref = torch.from_numpy(want_q.view(np.uint8)).view(torch.float8_e4m3fn) if codes_to == "float8_e4m3fn" \
        else torch.from_numpy(want_q)
    _assert_codes_close(ours, ref, codes_to)
    same = (_ordinal(ours) == _ordinal(ref)).all(1)
    assert same.sum() >= len(x) // 2
    # the bias becomes int32 codes in units of x_scale * w_scale (half a unit of rounding), then float32 sums
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in ("xs", "ws")}
    bound = 0.5 * inits["xs"] * inits["ws"] + 1e-5 * np.abs(want_y).max()
    assert np.all(np.abs(got["y"][same] - want_y[same]) <= bound)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_build_times_the_fused_norm_with_codes(precision, tmp_path, monkeypatch):
    """On the GPU the build folds by itself; the Triton add+norm kernels writing codes agree with the torch tactic
    closely enough to be candidates (finite times in the timing cache, FP32 builds included: on a BERT-sized hidden
    dimension some codes are one step from the torch tactic's). Against the same GPU build without the fold: the
    norms' codes within one step, the codes of GEMMs reading them within two; the embedding LayerNorm's (it reads x itself) nearly all equal, the others mostly (the
    8-bit GEMMs' outputs round apart from the float GEMMs' on dequantized values)."""
    import json
    x = np.random.default_rng(64).standard_normal((16, 64, 256)).astype(np.float32)
    qnet, codes = _ptq_block(x)
    cache = tmp_path / "t.timing"
    engine = kiln.build(qnet, kiln.BuildConfig(device="cuda", precision=precision, profiles={"x": x.shape},
                                               timing_cache=str(cache)))
    norms = [layer for layer in engine.layers if layer["kind"] == "Normalization" and "codes_scale" in layer["attrs"]]
    assert len(norms) == 2
    timed = [times for key, times in json.loads(cache.read_text())["entries"].items()
             if "|Normalization|" in key and "codes_scale" in key]
    assert timed and all(np.isfinite(times[t]) for times in timed for t in ("triton", "triton_row"))
    monkeypatch.setattr(build_module, "folds_quantization", lambda device, config: False)
    ref = kiln.build(qnet, kiln.BuildConfig(device="cuda", precision=precision, profiles={"x": x.shape}))
    made = {o: layer["kind"] for layer in ref.layers for o in layer["outputs"]}
    assert {made[c] for c in codes} == {"QuantizeLinear"}           # unfolded: separate QuantizeLinear layers
    ours, want = engine.context().run({"x": x}), ref.context().run({"x": x})
    first = norms[0]["outputs"][-1]
    from_norms = {n["outputs"][-1] for n in norms}
    for c in codes:         # a GEMM's codes downstream of norm codes one step apart may be two steps apart
        _assert_codes_close(torch.from_numpy(ours[c]), torch.from_numpy(want[c]), c, 0.99 if c == first else 0.9,
                            1 if c in from_norms else 2)


def test_rms_norm_writes_the_codes_too(monkeypatch):
    """The same block with RMS norms: the fold gives them the codes outputs; the codes are those of the network
    run dequantized (the first norm's all equal: it reads x itself)."""
    x = np.random.default_rng(65).standard_normal((4, 8, 16)).astype(np.float32)
    qnet, codes = _ptq_block(x)
    for layer in qnet.layers:
        if layer.kind == "Normalization":
            layer.attrs["type"] = "rms"
    config = kiln.BuildConfig(device="cpu", profiles={"x": x.shape})
    monkeypatch.setattr(build_module, "folds_quantization", lambda device, config: False)
    want = kiln.build(qnet, config).context().run({"x": x})
    monkeypatch.setattr(build_module, "folds_quantization", lambda device, config: True)
    engine = kiln.build(qnet, config)
    norms = [layer for layer in engine.layers if layer["kind"] == "Normalization"]
    assert [n["attrs"]["type"] for n in norms] == ["rms"] * 3
    assert [len(n["outputs"]) for n in norms] == [2, 2, 1]
    outs = {o for n in norms for o in n["outputs"]}
    assert not [q for q in engine.layers if q["kind"] == "QuantizeLinear" and q["inputs"][0] in outs]
    ours = engine.context().run({"x": x})
    np.testing.assert_array_equal(ours[norms[0]["outputs"][1]], want[norms[0]["outputs"][1]])
    for c in codes:
        _assert_codes_close(torch.from_numpy(ours[c]), torch.from_numpy(want[c]), c, 0.98)


def _pre_ln_block(hidden: int = 16) -> onnx.ModelProto:
    """x -> MatMul -> + x = s -> LayerNorm -> MatMul -> + s -> y: a pre-LN residual stream, whose sum s the fused
    add+norm writes as its second output (read again by the last add)."""
    rng = np.random.default_rng(81)
    inits = {"wa": (rng.standard_normal((hidden, hidden)) / 4).astype(np.float32),
             "wb": (rng.standard_normal((hidden, hidden)) / 4).astype(np.float32),
             "g": rng.uniform(0.5, 1.5, hidden).astype(np.float32),
             "be": (rng.standard_normal(hidden) * 0.1).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["t"], name="mm_a"),
             helper.make_node("Add", ["t", "x"], ["s"], name="stream"),
             helper.make_node("LayerNormalization", ["s", "g", "be"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "wb"], ["f"], name="mm_b"),
             helper.make_node("Add", ["f", "s"], ["y"], name="stream2")]
    shape = ["N", hidden]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)


def test_pre_ln_norm_writes_sum_then_codes(monkeypatch, tmp_path):
    """A fused add+norm that also writes the sum (pre-LN) gets the codes as its third output: y, sum, codes, each
    read where it should be; saved and loaded it runs the same; the codes and y match the network run dequantized."""
    from kiln.builder.quant import quantize
    rng = np.random.default_rng(82)
    x = rng.standard_normal((32, 16)).astype(np.float32)
    qnet = quantize(kiln.onnx.parse(_pre_ln_block()), kiln.BuildConfig(
        device="cpu", quantize="int8", calibration=[{"x": rng.standard_normal((64, 16)).astype(np.float32)}],
        calibrator="max", profiles={"x": x.shape}))
    h_codes = next(layer.outputs[0].name for layer in qnet.layers
                   if layer.kind == "QuantizeLinear" and layer.inputs[0].name == "h")
    qnet.mark_output(qnet.tensors[h_codes])
    config = kiln.BuildConfig(device="cpu", profiles={"x": x.shape})
    want = kiln.build(qnet, config).context().run({"x": x})
    monkeypatch.setattr(build_module, "folds_quantization", lambda device, config: True)
    engine = kiln.build(qnet, config)
    (norm,) = [layer for layer in engine.layers if layer["kind"] == "Normalization"]
    assert norm["attrs"]["sum_output"] and norm["outputs"][2] == h_codes
    y, s = norm["outputs"][:2]
    readers = {name: [layer["kind"] for layer in engine.layers if name in layer["inputs"]] for name in norm["outputs"]}
    assert readers[y] == [] and readers[h_codes] == ["QFullyConnected"]       # y is read as its codes only
    assert readers[s] == ["ElementWise"]                                     # the stream's next add
    path = tmp_path / "pre_ln.kiln"
    engine.save(path)
    ours, again = engine.context().run({"x": x}), kiln.load(path).context().run({"x": x})
    for k in ours:
        np.testing.assert_array_equal(again[k], ours[k])
    _assert_codes_close(torch.from_numpy(ours[h_codes]), torch.from_numpy(want[h_codes]), h_codes)
    np.testing.assert_allclose(ours["y"], want["y"], rtol=0, atol=0.02 * np.abs(want["y"]).max())
