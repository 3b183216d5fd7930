"""Fallback islands: nodes Kiln has no converter for run in ONNX Runtime inside the engine.

The reference is ONNX Runtime running the whole model on the CPU. The models put ops Kiln
lacks (ai.onnx MaxRoiPool; com.microsoft ExpandDims and Inverse) between ops Kiln runs.
Forged islands are written with the engine writer itself (so the file's checksums hold)
and must be refused by ``kiln.load`` before ONNX Runtime sees them.
"""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.cli import main
from kiln.engine.format import read_engine, write_engine
from kiln.errors import BuildError, EngineFormatError, UnsupportedOperatorError

ort = pytest.importorskip("onnxruntime")
RNG = np.random.default_rng(7)
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=OPSETS)
    m.ir_version = 8
    return m


def roi_model() -> onnx.ModelProto:
    """Conv → Relu → [MaxRoiPool → com.microsoft::ExpandDims] → Sigmoid: one island of two nodes."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4, 3, 3)).astype(np.float32), "w")
    axis = numpy_helper.from_array(np.array(1, np.int32), "axis")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxRoiPool", ["r", "rois"], ["p"], pooled_shape=[2, 2], spatial_scale=0.5,
                              name="roipool"),
             helper.make_node("ExpandDims", ["p", "axis"], ["e"], domain="com.microsoft", name="expand"),
             helper.make_node("Sigmoid", ["e"], ["y"], name="sig")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8]),
                          helper.make_tensor_value_info("rois", TensorProto.FLOAT, ["R", 5])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, axis])


def inverse_model() -> onnx.ModelProto:
    """a + 3·I → com.microsoft::Inverse → ·2, batch dynamic."""
    eye = numpy_helper.from_array(3 * np.eye(3, dtype=np.float32), "eye")
    two = numpy_helper.from_array(np.array(2, np.float32), "two")
    nodes = [helper.make_node("Add", ["a", "eye"], ["s"], name="add"),
             helper.make_node("Inverse", ["s"], ["inv_out"], domain="com.microsoft", name="inv"),
             helper.make_node("Mul", ["inv_out", "two"], ["y"], name="mul")]
    return _model(nodes, [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3, 3])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [eye, two])


def rois(n_images: int, n: int) -> np.ndarray:
    corners = np.sort(RNG.uniform(0, 15, (n, 2, 2)), axis=1)       # x1 <= x2, y1 <= y2
    return np.concatenate([RNG.integers(0, n_images, (n, 1)), corners[:, 0], corners[:, 1]], 1).astype(np.float32)


def reference(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def assert_fp32(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    err = float(np.abs(got.astype(np.float64) - ref).max())
    assert err <= 1e-5 + 1e-4 * float(np.abs(ref).max()), err


def build(model: onnx.ModelProto, profiles: dict, **kw):
    net = kiln.onnx.parse(model.SerializeToString(), fallback="onnxruntime")
    return kiln.build(net, kiln.BuildConfig(device="cpu", fallback="onnxruntime", profiles=profiles, **kw))


ROI_PROFILES = {"x": ((1, 4, 8, 8), (2, 4, 8, 8), (3, 4, 8, 8)), "rois": ((1, 5), (3, 5), (6, 5))}


@pytest.fixture(scope="module")
def roi_engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("fallback") / "roi.kiln"
    build(roi_model(), ROI_PROFILES).save(path)
    return path


def test_island_saved_loaded_and_run_matches_onnxruntime(roi_engine):
    engine = kiln.load(roi_engine)
    islands = [layer for layer in engine.layers if layer["kind"] == "OrtIsland"]
    assert len(islands) == 1            # the two unsupported nodes in a row make one island
    island = islands[0]
    assert island["tactic"] == "onnxruntime" and island["origin"] == ["roipool", "expand"]
    assert island["attrs"]["ops"] == ["MaxRoiPool", "com.microsoft::ExpandDims"] and island["attrs"]["opset"] == 17
    assert island["outputs"] == ["e"]    # the inner value p is read by nobody else: not handed out
    # the island's ONNX model lives in the weights section, as uint8 data
    data = kiln.engine.read_weight(roi_engine, island["inputs"][0])
    assert data.dtype == np.uint8 and data.ndim == 1
    sub = onnx.load_model_from_string(data.tobytes())
    assert [n.op_type for n in sub.graph.node] == ["MaxRoiPool", "ExpandDims"]
    assert [i.name for i in sub.graph.input] == ["r", "rois"] and [i.name for i in sub.graph.initializer] == ["axis"]
    ctx = engine.context()
    for n, r in ((2, 3), (1, 1), (3, 6)):
        feeds = {"x": RNG.standard_normal((n, 4, 8, 8)).astype(np.float32), "rois": rois(n, r)}
        assert_fp32(ctx.run(feeds)["y"], reference(roi_model(), feeds))


def test_dynamic_batch_within_the_profile(tmp_path):
    model = inverse_model()
    engine = build(model, {"a": ((1, 3, 3), (2, 3, 3), (5, 3, 3))})
    assert engine.plan["tensors"]["inv_out"]["shape"] == ["N", 3, 3]      # symbolic, from ONNX Runtime's inference
    engine.save(tmp_path / "inv.kiln")
    ctx = kiln.load(tmp_path / "inv.kiln").context()
    for n in (1, 2, 5):
        feeds = {"a": (0.3 * RNG.standard_normal((n, 3, 3))).astype(np.float32)}
        assert_fp32(ctx.run(feeds)["y"], reference(model, feeds))


def test_island_inside_an_if_branch(tmp_path):
    eye = numpy_helper.from_array(3 * np.eye(3, dtype=np.float32), "eye")
    then = helper.make_graph([helper.make_node("Inverse", ["s"], ["t"], domain="com.microsoft", name="inv")], "then",
                             [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["s"], ["n"], name="neg")], "else", [],
                              [helper.make_tensor_value_info("n", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Add", ["a", "eye"], ["s"], name="add"),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="if")]
    model = _model(nodes, [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3, 3]),
                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [eye])
    build(model, {"a": ((1, 3, 3), (2, 3, 3), (4, 3, 3))}).save(tmp_path / "if.kiln")
    ctx = kiln.load(tmp_path / "if.kiln").context()
    for cond in (True, False):
        feeds = {"a": (0.3 * RNG.standard_normal((2, 3, 3))).astype(np.float32), "c": np.array(cond)}
        assert_fp32(ctx.run(feeds)["y"], reference(model, feeds))


def test_fp16_build_hands_islands_fp32_and_takes_back_fp16():
    model = inverse_model()
    engine = build(model, {"a": (2, 3, 3)}, precision="fp16")
    island = next(layer for layer in engine.layers if layer["kind"] == "OrtIsland")
    assert engine.plan["tensors"][island["outputs"][0]]["dtype"] == "float16"
    feeds = {"a": (0.3 * RNG.standard_normal((2, 3, 3))).astype(np.float32)}
    ref = reference(model, feeds)
    got = engine.context().run(feeds)["y"]
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() <= 4e-3 * np.abs(ref).max()      # a few FP16 roundings of values near 1


def test_without_the_flag_the_error_is_one_line_and_names_the_flag():
    with pytest.raises(UnsupportedOperatorError) as e:
        kiln.onnx.parse(inverse_model())
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("'inv'", "Inverse", "com.microsoft", "opset 1", "--fallback onnxruntime"):
        assert part in msg, (part, msg)


def test_a_network_with_islands_needs_the_build_flag():
    net = kiln.onnx.parse(inverse_model(), fallback="onnxruntime")
    with pytest.raises(BuildError, match="fallback='onnxruntime'"):
        kiln.build(net, kiln.BuildConfig(device="cpu", profiles={"a": (2, 3, 3)}))


def test_a_custom_domain_node_cannot_fall_back():
    nodes = [helper.make_node("Foo", ["a"], ["y"], domain="com.example", name="foo")]
    model = _model(nodes, [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedOperatorError, match="cannot fall back to ONNX Runtime") as e:
        kiln.onnx.parse(model, fallback="onnxruntime")
    assert "\n" not in str(e.value) and "'foo'" in str(e.value)


def test_cli_check_build_inspect(tmp_path, capsys):
    path, out = tmp_path / "inv.onnx", tmp_path / "inv.kiln"
    onnx.save(inverse_model(), path)
    assert main(["check", str(path)]) == 1
    assert "--fallback onnxruntime" in capsys.readouterr().out
    assert main(["check", str(path), "--fallback", "onnxruntime"]) == 0
    text = capsys.readouterr().out
    assert "inv  op Inverse  domain com.microsoft  opset 1  (falls back to ONNX Runtime)" in text
    assert main(["build", str(path), "-o", str(out), "--device", "cpu", "--shapes", "a:2x3x3", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--fallback onnxruntime" in err and "Inverse" in err
    assert not out.exists()
    assert main(["build", str(path), "-o", str(out), "--device", "cpu", "--shapes", "a:2x3x3", "-q",
                 "--fallback", "onnxruntime"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "[OrtIsland]  fp32  tactic onnxruntime (com.microsoft::Inverse)" in capsys.readouterr().out


# ---- forged islands ----------------------------------------------------------------------------------

def _island(header: dict) -> dict:
    return next(layer for layer in header["plan"]["layers"] if layer["kind"] == "OrtIsland")


def _external(m: onnx.ModelProto) -> bytes:
    init = m.graph.initializer[0]
    init.ClearField("raw_data")
    init.ClearField("int32_data")
    init.data_location = TensorProto.EXTERNAL
    init.external_data.add(key="location", value="../../../etc/passwd")
    return m.SerializeToString()


def _custom_domain(m: onnx.ModelProto) -> bytes:
    m.graph.node[1].domain = "com.evil"
    m.opset_import.append(helper.make_opsetid("com.evil", 1))
    return m.SerializeToString()


def _other_opset(m: onnx.ModelProto) -> bytes:
    next(i for i in m.opset_import if i.domain in ("", "ai.onnx")).version = 16
    return m.SerializeToString()


FORGERIES = {
    "garbage": (lambda m: b"\x08\x07garbage, not a ModelProto\xff\xff", "is not a valid ONNX model"),
    "external data": (_external, "references external data"),
    "custom domain": (_custom_domain, "imports custom domain 'com.evil'"),
    "other opset": (_other_opset, "imports ai.onnx opset 16, but the layer declares opset 17"),
}


def _forge(src, dst, make, rehash: bool = True) -> None:
    header, weights = read_engine(str(src))
    island = _island(header)
    key = header["plan"]["weights"][island["inputs"][0]]
    data = make(onnx.load_model_from_string(weights[key].tobytes()))
    weights = {k: np.array(v) for k, v in weights.items()}
    weights[key] = np.frombuffer(data, np.uint8).copy()
    if rehash:          # the forger keeps the header consistent, so each check below has to catch it
        island["attrs"]["sha256"] = hashlib.sha256(data).hexdigest()
    write_engine(str(dst), {k: v for k, v in header.items() if k != "weights"}, weights)


@pytest.mark.parametrize("name", list(FORGERIES))
def test_forged_island_refused_at_load(roi_engine, tmp_path, monkeypatch, name):
    import kiln.kernels.ort_island as island_kernel

    def no_session(*a, **k):
        raise AssertionError("ONNX Runtime was handed a forged island")
    monkeypatch.setattr(island_kernel, "session", no_session)
    make, why = FORGERIES[name]
    _forge(roi_engine, tmp_path / "forged.kiln", make)
    with pytest.raises(EngineFormatError) as e:
        kiln.load(tmp_path / "forged.kiln")
    msg = str(e.value)
    assert "\n" not in msg and "island 'roipool'" in msg and why in msg, msg


def test_island_bytes_must_match_their_hash(roi_engine, tmp_path):
    _forge(roi_engine, tmp_path / "forged.kiln", lambda m: m.SerializeToString() + b"\x00", rehash=False)
    with pytest.raises(EngineFormatError, match="does not match its SHA-256"):
        kiln.load(tmp_path / "forged.kiln")


@pytest.mark.gpu
def test_gpu_engine_copies_island_data_through_the_host():
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = roi_model()
    net = kiln.onnx.parse(model.SerializeToString(), fallback="onnxruntime")
    engine = kiln.build(net, kiln.BuildConfig(device="cuda", fallback="onnxruntime", profiles=ROI_PROFILES))
    ctx = engine.context()
    assert ctx.graphs is None           # an island is not capturable: the engine runs eagerly
    feeds = {"x": RNG.standard_normal((2, 4, 8, 8)).astype(np.float32), "rois": rois(2, 3)}
    assert_fp32(ctx.run(feeds)["y"], reference(model, feeds))
    got = ctx.run({k: torch.from_numpy(v).cuda() for k, v in feeds.items()})["y"]
    assert got.device.type == "cuda"
    assert_fp32(got.cpu().numpy(), reference(model, feeds))
