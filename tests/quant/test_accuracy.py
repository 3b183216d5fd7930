"""--accuracy and kiln compare --int8 --per-layer on a 3-layer MLP whose middle layer is made sensitive: hidden unit 0
of the first layer is scaled up 1000x and the second layer's row for it down 1000x (the FP32 function is unchanged,
ReLU being positively homogeneous), so the second layer's per-tensor input scale is set by that one channel and
int8 rounds every other channel to about zero. The references are independent: ONNX Runtime running FP32 and Q/DQ
models whose scales this test computes with numpy (max calibration), and errors computed here."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx
from kiln.builder.quant.accuracy import parse_target
from kiln.errors import BuildError, KilnError

from _quant_cli import kiln_cli

ort = pytest.importorskip("onnxruntime")

K, H, C = 16, 32, 5
LAYERS = ("fc1", "fc2", "fc3")


def sensitive_mlp(seed: int = 0, outlier: float = 1000.0) -> onnx.ModelProto:
    """x[N,16] → Gemm fc1 → relu → Gemm fc2 → relu → Gemm fc3 → y[N,5]; fc2's input has one outlier channel."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.standard_normal((K, H)) / np.sqrt(K), rng.standard_normal(H) * 0.1
    w2, b2 = rng.standard_normal((H, H)) / np.sqrt(H), rng.standard_normal(H) * 0.1
    w3, b3 = rng.standard_normal((H, C)) / np.sqrt(H), rng.standard_normal(C) * 0.1
    w1[:, 0] *= outlier
    b1[0] *= outlier
    w2[0, :] /= outlier
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="fc3")]
    inits = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3}
    g = helper.make_graph(nodes, "sensitive", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C])],
                          [numpy_helper.from_array(v.astype(np.float32), n) for n, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def calib_data(n: int = 64) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, K)).astype(np.float32)


def _ort(model: onnx.ModelProto, x: np.ndarray, every: bool = False) -> dict[str, np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if every:
        for node in list(m.graph.node):
            if node.output[0] != "y":
                m.graph.output.append(onnx.ValueInfoProto(name=node.output[0]))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))


def qdq_model(model: onnx.ModelProto, quantized: set[str], calib: np.ndarray) -> onnx.ModelProto:
    """``model`` with ONNX Q/DQ on the input and the weight of each Gemm in ``quantized``: per-tensor activation
    scales max|a|/127 over ``calib`` (max calibration, from ONNX Runtime's FP32 values) and per-output-channel
    weight scales max|w|/127 (axis 1 of a [K, N] weight)."""
    values = _ort(model, calib, every=True) | {"x": calib}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    nodes = []
    for node in m.graph.node:
        if node.name in quantized:
            a, w = node.input[0], node.input[1]
            sa = np.float32(np.abs(values[a]).max() / 127.0)
            sw = (np.abs(inits[w]).max(axis=0) / 127.0).astype(np.float32)
            m.graph.initializer.extend([numpy_helper.from_array(np.asarray(sa), f"{a}_{node.name}_s"),
                                        numpy_helper.from_array(np.zeros((), np.int8), f"{a}_{node.name}_z"),
                                        numpy_helper.from_array(sw, f"{w}_s"),
                                        numpy_helper.from_array(np.zeros(sw.shape, np.int8), f"{w}_z")])
            nodes += [helper.make_node("QuantizeLinear", [a, f"{a}_{node.name}_s", f"{a}_{node.name}_z"], [f"{a}_q"]),
                      helper.make_node("DequantizeLinear", [f"{a}_q", f"{a}_{node.name}_s", f"{a}_{node.name}_z"],
                                       [f"{a}_dq"]),
                      helper.make_node("QuantizeLinear", [w, f"{w}_s", f"{w}_z"], [f"{w}_q"], axis=1),
                      helper.make_node("DequantizeLinear", [f"{w}_q", f"{w}_s", f"{w}_z"], [f"{w}_dq"], axis=1)]
            node.input[0], node.input[1] = f"{a}_dq", f"{w}_dq"
        nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m)
    return m


def metrics(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """rel_l2, max_abs and top1_agree of ``got`` against ``ref``, in float64."""
    g, r = got.astype(np.float64), ref.astype(np.float64)
    return {"rel_l2": float(np.linalg.norm(g - r) / np.linalg.norm(r)), "max_abs": float(np.abs(g - r).max()),
            "top1_agree": float(np.mean(g.argmax(-1) == r.argmax(-1)))}


@pytest.fixture(scope="module")
def independent() -> dict[frozenset, dict[str, float]]:
    """The metrics, by the set of layers quantized, of ONNX Runtime's Q/DQ model against its FP32 model."""
    model, calib = sensitive_mlp(), calib_data()
    ref = _ort(model, calib)["y"]
    sets = [frozenset(LAYERS), frozenset({"fc1", "fc3"}), frozenset({"fc2", "fc3"}), frozenset({"fc1", "fc2"}),
            *[frozenset({n}) for n in LAYERS]]
    return {s: metrics(_ort(qdq_model(model, set(s), calib), calib)["y"], ref) for s in sets}


TARGETS = {"rel_l2": "rel_l2<=0.05", "max_abs": "max_abs<=0.1", "top1_agree": "top1_agree>=0.95"}


def _met(metric: str, value: float, target: str) -> bool:
    """Whether ``value`` of ``metric`` meets ``target``, decided here (not by the code under test)."""
    bound = float(target.split("=")[1])
    return value >= bound if metric == "top1_agree" else value <= bound


@pytest.mark.parametrize("metric", sorted(TARGETS))
def test_accuracy_keeps_exactly_the_sensitive_layer(metric, independent):
    """The search keeps fc2 alone; independently, every layer quantized misses the target, keeping only fc1 or only
    fc3 misses it too, and keeping fc2 meets it: {fc2} is the one smallest answer. The engine built meets the
    target on the calibration data, measured here against ONNX Runtime's FP32 outputs."""
    target = TARGETS[metric]
    full, best = independent[frozenset(LAYERS)][metric], independent[frozenset({"fc1", "fc3"})][metric]
    assert not _met(metric, full, target)
    assert not _met(metric, independent[frozenset({"fc2", "fc3"})][metric], target)
    assert not _met(metric, independent[frozenset({"fc1", "fc2"})][metric], target)
    assert _met(metric, best, target)
    model, calib = sensitive_mlp(), calib_data()
    engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(
        device="cpu", quantize="int8", calibration=[{"x": calib}], calibrator="max", accuracy=target,
        profiles={"x": calib.shape}, bias_correction=False, smoothing=False))
    rec = engine.header["build"]["quantization"]["accuracy"]
    assert rec["kept"] == ["fc2"] and rec["quantized"] == 2 and rec["samples"] == len(calib)
    assert rec["metric"] == metric and rec["target"] == target
    assert sorted(engine.header["build"]["quantization"]["layers"]) == ["fc1", "fc3"]
    # what Kiln measured is what ONNX Runtime gives for the same layers quantized (an 8-bit code may differ by a
    # step where a value lies within float rounding of a rounding boundary: far below these margins)
    assert math.isclose(rec["achieved"], best, rel_tol=0.05, abs_tol=0.02 if metric == "top1_agree" else 1e-4)
    assert math.isclose(rec["all_quantized"], full, rel_tol=0.05, abs_tol=0.02 if metric == "top1_agree" else 1e-4)
    y = engine.context().run({"x": calib})["y"]
    assert _met(metric, metrics(y, _ort(model, calib)["y"])[metric], target)
    assert sum(layer["kind"] == "QuantizeLinear" for layer in engine.layers) == 2


def test_accuracy_met_without_keeping_anything(independent):
    """A target the fully quantized network meets keeps no layer."""
    loose = independent[frozenset(LAYERS)]["rel_l2"] * 2
    calib = calib_data()
    engine = kiln.build(kiln.onnx.parse(sensitive_mlp()), kiln.BuildConfig(
        device="cpu", quantize="int8", calibration=[{"x": calib}], calibrator="max", accuracy=f"rel_l2<={loose}",
        profiles={"x": calib.shape}))
    rec = engine.header["build"]["quantization"]["accuracy"]
    assert rec["kept"] == [] and rec["quantized"] == 3
    assert sorted(engine.header["build"]["quantization"]["layers"]) == list(LAYERS)


@pytest.mark.parametrize("text, words", [
    ("rel_l2<0.05", ["rel_l2 takes <="]), ("top1_agree<=0.9", ["top1_agree takes >="]),
    ("rmse<=0.1", ["unknown metric 'rmse'"]), ("rel_l2<=abc", ["bound must be a finite number"]),
    ("rel_l2<=-1", ["bound must be"]), ("top1_agree>=1.5", ["between 0 and 1"]), ("rel_l2<=5%", ["bound must be"]),
    ("rel_l2<=nan", ["finite"]), ("", ["is not a target"]), ("rel_l2 <= 0.1 extra", ["is not a target"])])
def test_grammar_errors_are_one_line(text, words):
    with pytest.raises(BuildError) as e:
        kiln.BuildConfig(device="cpu", quantize="int8", accuracy=text)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--accuracy {text!r}"), msg
    for w in words:
        assert w in msg, (w, msg)


def test_grammar_accepts():
    assert parse_target(" rel_l2 <= 2e-2 ").bound == 0.02
    assert parse_target("top1_agree>=99%").bound == pytest.approx(0.99)
    assert parse_target("max_abs<=0").met(0.0) and not parse_target("max_abs<=0").met(1e-12)
    assert parse_target("top1_agree>=0.9").met(0.9) and not parse_target("top1_agree>=0.9").met(math.nan)
    with pytest.raises(BuildError):
        kiln.BuildConfig(device="cpu", accuracy="rel_l2<=0.1")        # no --int8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("acc")
    onnx.save(sensitive_mlp(), d / "mlp.onnx")
    np.save(d / "calib.npy", calib_data())
    return d


def test_cli_build_accuracy_prints_kept_layers(files):
    r = kiln_cli("build", "mlp.onnx", "--int8", "--calib", "calib.npy", "--calibrator", "max", "--accuracy",
              "rel_l2<=0.05", "--no-smoothing", "--device", "cpu", "--shapes", "x:8x16", "-o", "mlp.kiln", "-q",
              cwd=files)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("--accuracy"))
    assert "kept 1 layer unquantized (fp32): fc2;" in line and "on 64 calibration samples" in line, line
    r = kiln_cli("inspect", "mlp.kiln", cwd=files)
    assert r.returncode == 0 and line in r.stdout.splitlines(), r.stdout[:2000]      # the engine records it


def test_cli_unreachable_and_bad_targets_exit_2(files):
    """Even the unquantized FP16 network misses max_abs<=1e-9 (FP16 rounding): one line naming what it reached;
    grammar errors and --accuracy without --int8: one line, exit 2; no engine written."""
    cases = [(["--int8", "--calib", "calib.npy", "--fp16", "--accuracy", "max_abs<=1e-9"],
              ["cannot be met", "no layer quantized (fp16)"]),
             (["--int8", "--calib", "calib.npy", "--accuracy", "rel_l2=0.1"], ["rel_l2 takes <="]),
             (["--accuracy", "rel_l2<=0.1"], ["--accuracy belongs to a quantized build"])]
    for flags, words in cases:
        r = kiln_cli("build", "mlp.onnx", *flags, "--device", "cpu", "--shapes", "x:8x16",
                  "-o", "bad.kiln", "-q", cwd=files)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (flags, r.stderr[-2000:])
        for w in words:
            assert w in lines[0], (w, lines[0])
        assert not (files / "bad.kiln").exists()


def test_cli_compare_per_layer_ranks_the_sensitive_layer_first(files, independent):
    """kiln compare --int8 --per-layer: fc2 first, each layer's 'alone' and 'others' errors as ONNX Runtime gives
    them for the same layers quantized."""
    r = kiln_cli("compare", "mlp.onnx", "--int8", "--calib", "calib.npy", "--calibrator", "max", "--per-layer",
              "--no-bias-correction", "--no-smoothing", "--device", "cpu", "--shapes", "x:4x16", "--no-histogram",
              "--save-errors", "e.json", cwd=files)
    assert r.returncode in (0, 1), r.stderr[-2000:]
    lines = r.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("per quantized layer (int8, rel_l2"))
    rows = [ln.split() for ln in lines[head + 1:head + 4]]
    assert [row[0] for row in rows] == ["fc2"] + [row[0] for row in rows[1:]] and {row[0] for row in rows} == \
        set(LAYERS), lines[head:head + 4]
    for name, _, alone, _, others in rows:
        want_alone = independent[frozenset({name})]["rel_l2"]
        want_others = independent[frozenset(LAYERS) - {name}]["rel_l2"]
        assert math.isclose(float(alone), want_alone, rel_tol=0.05), (name, alone, want_alone)
        assert math.isclose(float(others), want_others, rel_tol=0.05), (name, others, want_others)
    # the same numbers as a kiln view --errors report: the layers of the model coloured by their error alone
    from kiln.viewer import accuracy, documents
    assert "--errors e.sensitivity.json" in r.stdout
    report = accuracy.read_errors(files / "e.sensitivity.json")
    assert report["metric"] == "sensitivity" and report["sensitivity_of"] == "rel_l2"
    alone = {row[0]: float(row[2]) for row in rows}
    assert {rec["node"]: rec["sensitivity"] for rec in report["tensors"]} == pytest.approx(alone, rel=1e-3)
    doc = documents.build_document(str(files / "mlp.onnx"), errors=str(files / "e.sensitivity.json"))
    nodes = {n.get("name"): n for n in doc.panes[0].data["nodes"]}
    shown = {name: nodes[name]["err"]["value"] for name in LAYERS}
    assert shown == pytest.approx(alone, rel=1e-3)
    assert nodes["fc2"]["err"]["t"] == max(nodes[name]["err"]["t"] for name in LAYERS)


@pytest.mark.parametrize("metric", ["rel_l2", "top1_agree"])
def test_sensitivity_ranks_the_layer_whose_removal_helps_most_first(metric, independent):
    """Leave-one-out from the fully quantized network: fc2 first for an error (lower is better) and for the
    agreement (higher is better); each number is ONNX Runtime's for the same layers quantized."""
    from kiln.builder.quant import evaluator, plan
    from kiln.builder.quant.accuracy import sensitivity
    calib = calib_data()
    config = kiln.BuildConfig(device="cpu", quantize="int8", calibration=[{"x": calib}], calibrator="max",
                              bias_correction=False, smoothing=False)
    net = kiln.onnx.parse(sensitive_mlp())
    planned = plan(net, config, need_batches=True)
    assert planned.layers == list(LAYERS)
    ranked = sensitivity(evaluator(net, planned, config), planned.layers, metric, alone=True)
    assert ranked[0].layer == "fc2"
    for s in ranked:
        assert math.isclose(s.without, independent[frozenset(LAYERS) - {s.layer}][metric], rel_tol=0.05, abs_tol=0.02)
        assert math.isclose(s.alone, independent[frozenset({s.layer})][metric], rel_tol=0.05, abs_tol=0.02)


def test_top1_needs_classes():
    """top1_agree on an output without a class axis of at least 2: one line naming the fix."""
    from kiln.builder.quant.accuracy import measure
    with pytest.raises(KilnError) as e:
        measure("top1_agree", [[np.zeros((4, 1), np.float32)]], [[np.zeros((4, 1), np.float32)]])
    assert "\n" not in str(e.value) and "Use rel_l2 or max_abs" in str(e.value)
    # a non-finite value where FP32 is finite: an infinite error, a disagreeing row
    got, ref = [[np.array([[np.nan, 1.0], [0.0, 1.0]])]], [[np.array([[2.0, 1.0], [0.0, 1.0]])]]
    assert measure("rel_l2", got, ref) == math.inf and measure("top1_agree", got, ref) == 0.5


def test_reference_recomputed_beyond_its_budget():
    """Batches whose FP32 outputs are not kept (over the memory budget) measure the same as kept ones."""
    from kiln.builder.quant import evaluator, plan
    calib = calib_data()
    config = kiln.BuildConfig(device="cpu", quantize="int8", calibration=[{"x": calib[:32]}, {"x": calib[32:]}],
                              calibrator="max")
    net = kiln.onnx.parse(sensitive_mlp())
    planned = plan(net, config, need_batches=True)
    kept, recomputed = evaluator(net, planned, config), evaluator(net, planned, config)
    recomputed.REFERENCE_BYTES = 0
    for layers in (LAYERS, ("fc1", "fc3")):
        a, b = kept("rel_l2", layers), recomputed("rel_l2", layers)
        assert a == b and a > 0
    assert len(kept._ref) == 2 and not recomputed._ref


def test_accuracy_needs_calibration_data_with_a_cache(tmp_path):
    """Ranges from a cache, but --accuracy measures on the data: without --calib, one line saying so."""
    calib = calib_data()
    base = {"device": "cpu", "quantize": "int8", "calibrator": "max", "profiles": {"x": calib.shape},
            "calib_cache": str(tmp_path / "c.json")}
    kiln.build(kiln.onnx.parse(sensitive_mlp()), kiln.BuildConfig(calibration=[{"x": calib}], **base))
    with pytest.raises(BuildError) as e:
        kiln.build(kiln.onnx.parse(sensitive_mlp()), kiln.BuildConfig(accuracy="rel_l2<=0.05", **base))
    assert "\n" not in str(e.value) and "calibration data to measure the error on" in str(e.value)


def test_cli_compare_checks_the_engine_the_search_builds(files):
    """kiln compare --int8 --accuracy compares the searched engine (fc2 kept) and says what was kept; the same
    comparison of the fully quantized engine fails at these tolerances."""
    args = ["compare", "mlp.onnx", "--int8", "--calib", "calib.npy", "--calibrator", "max", "--no-smoothing",
            "--device", "cpu",
            "--shapes", "x:4x16", "--no-histogram", "--atol", "0.05", "--rtol", "0"]
    r = kiln_cli(*args, "--accuracy", "rel_l2<=0.05", cwd=files)
    assert r.returncode == 0 and "PASSED" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert "--accuracy rel_l2<=0.05: kept 1 layer unquantized (fp32): fc2;" in r.stdout
    r = kiln_cli(*args, cwd=files)
    assert r.returncode == 1 and "FAILED" in r.stdout, r.stdout[-2000:]
