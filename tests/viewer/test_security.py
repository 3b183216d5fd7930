"""Paths named inside a model file are followed only inside the model's folder (issue 15, vulnerability 3).

Each reader that follows such a path gets the attack: an absolute path, a ``..`` escape, or a
link beside the model pointing out of its folder, all at one secret file whose values are
recognisable. A Python audit hook records every file the process opens, so "never read" is
checked directly, and the secret's values must appear nowhere: not in the weight loaders, not
in the exported HTML, not behind the server's /api/weight(.npy). The model itself still opens,
with a warning that says which file was refused and why.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from viewer_testing import get

from kiln.errors import KilnError, ViewerError
from kiln.paths import PathEscapeError, resolve_inside
from kiln.viewer import ViewerWarning, command, serve, view
from kiln.viewer.formats import open_model

SECRET = np.full(12, 31337.25, np.float32)          # 31337.25 is exact in float32, float16 reads of it differ
SECRET_TEXT = "31337"

_opened: list[str] = []
_recording = [False]


def _audit(event: str, args: tuple) -> None:
    if not _recording[0] or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    mode, flags = args[1], args[2]
    reads = ("r" in mode or "+" in mode) if isinstance(mode, str) else (flags & os.O_ACCMODE) != os.O_WRONLY
    if reads:                  # the tests themselves write the secret while recording
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)       # hooks cannot be removed; this one costs a flag test while not recording


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside every model folder the tests make; reading it in any way is the failure."""
    p = tmp_path / "outside" / "secret.bin"
    p.parent.mkdir()
    p.write_bytes(SECRET.tobytes())
    return p


@pytest.fixture
def watch(secret):
    """Record opened files; after the test, assert the secret was never opened (by any name or link)."""
    _opened.clear()
    _recording[0] = True
    yield
    _recording[0] = False
    real = os.path.realpath(secret)
    hits = [p for p in _opened if os.path.realpath(p) == real]
    assert not hits, f"the secret outside the model's folder was opened as {hits}"


def _model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models" / "m"
    d.mkdir(parents=True)
    return d


def _check_refused(path: Path, tmp_path: Path, weight: str | None, reason: str = "outside") -> None:
    """The model opens with a warning, the weight (if named) has no values, and nothing shows the secret."""
    model = open_model(path)
    assert model.warnings and all("\n" not in w for w in model.warnings)
    assert any(reason in w for w in model.warnings), model.warnings
    weights = {n: w for g in model.graphs for n, w in g.weights.items()}
    if weight is not None:
        with pytest.raises(ViewerError, match=reason) as err:
            weights[weight].load()
        assert "\n" not in str(err.value)
    out = tmp_path / "export.html"
    with pytest.warns(ViewerWarning, match=reason):
        view(path, export=out)
    html = out.read_text(encoding="utf-8")
    assert SECRET_TEXT not in html and reason in html
    with pytest.warns(ViewerWarning, match=reason):
        server = serve(path, open_browser=False)
    try:
        status, _, body = get(server, "/api/model")
        page = json.loads(body)
        assert status == 200 and any(reason in w for w in page["panes"][0]["model"]["warnings"])
        names = [w["name"] for w in page["panes"][0]["weights"]]
        for i, name in enumerate(names):
            status, _, npy = get(server, f"/api/weight.npy?pane=0&index={i}")
            assert SECRET.tobytes()[:16] not in npy
            status_s, _, stats = get(server, f"/api/weight?pane=0&index={i}")
            assert SECRET_TEXT not in stats.decode()
            if name == weight:
                assert status == 422 and reason in json.loads(npy)["error"]
                assert reason in json.loads(stats)["error"]
    finally:
        server.stop()


# ---- the shared helper -------------------------------------------------------------------------------------


def test_resolve_inside_accepts_names_inside(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"x")
    os.symlink("sub/w.bin", tmp_path / "link.bin")                 # a link that stays inside is followed
    assert resolve_inside(tmp_path, "sub/w.bin", "shard") == (tmp_path / "sub" / "w.bin").resolve()
    assert resolve_inside(tmp_path, "sub/../sub/w.bin", "shard") == (tmp_path / "sub" / "w.bin").resolve()
    assert resolve_inside(tmp_path, "link.bin", "shard") == (tmp_path / "sub" / "w.bin").resolve()
    assert resolve_inside(tmp_path, "missing.bin", "shard") == tmp_path.resolve() / "missing.bin"


@pytest.mark.parametrize("bad, words", [
    ("/etc/passwd", "absolute path"), ("../secret.bin", "points outside"), ("a/../../secret.bin", "points outside"),
    ("C:\\Windows\\win.ini", "absolute path"), ("\\\\server\\share\\x", "absolute path"), ("", "not a file name"),
    ("a\0b", "not a file name"), (7, "not a file name"), (None, "not a file name"), (["x"], "not a file name"),
])
def test_resolve_inside_refuses_escapes(tmp_path, bad, words):
    base = tmp_path / "model"
    base.mkdir()
    with pytest.raises(PathEscapeError, match=words) as err:
        resolve_inside(base, bad, "weight shard")
    assert isinstance(err.value, KilnError) and "\n" not in str(err.value) and "weight shard" in str(err.value)


def test_resolve_inside_refuses_links_out(tmp_path, secret):
    base = tmp_path / "model"
    base.mkdir()
    os.symlink(secret, base / "w.bin")
    os.symlink(secret.parent, base / "dir")
    for name in ("w.bin", "dir/secret.bin"):
        with pytest.raises(PathEscapeError, match="points outside"):
            resolve_inside(base, name, "weight shard")


# ---- TensorFlow.js ---------------------------------------------------------------------------------------------


def _tfjs(d: Path, paths: list[str]) -> Path:
    topology = {"node": [
        {"name": "x", "op": "Placeholder", "attr": {"dtype": {"type": "DT_FLOAT"}}},
        {"name": "w", "op": "Const", "attr": {"dtype": {"type": "DT_FLOAT"}, "value": {"tensor": {
            "dtype": "DT_FLOAT", "tensorShape": {"dim": [{"size": "12"}]}}}}},
        {"name": "add", "op": "AddV2", "input": ["x", "w"]}]}
    manifest = [{"paths": paths, "weights": [{"name": "w", "shape": [12], "dtype": "float32"}]}]
    p = d / "model.json"
    p.write_text(json.dumps({"format": "graph-model", "modelTopology": topology, "weightsManifest": manifest}))
    return p


@pytest.mark.parametrize("how", ["absolute", "dotdot", "link", "etc-passwd"])
def test_tfjs_weight_paths(tmp_path, secret, watch, how):
    d = tmp_path / "models" / "a" / "b"
    d.mkdir(parents=True)
    if how == "link":
        os.symlink(secret, d / "group1-shard1of1.bin")
    shard = {"absolute": str(secret), "dotdot": "../../../outside/secret.bin", "link": "group1-shard1of1.bin",
             "etc-passwd": "/etc/passwd"}[how]
    reason = "absolute path" if how in ("absolute", "etc-passwd") else "points outside"
    path = _tfjs(d, [shard])
    _check_refused(path, tmp_path, "w", reason)
    assert not any(os.path.realpath(p) == "/etc/passwd" for p in _opened)


def test_tfjs_cli_warns_in_one_line(tmp_path, secret, watch, capsys):
    d = _model_dir(tmp_path)
    path = _tfjs(d, ["../../outside/secret.bin"])
    assert command.main(["view", str(path), "--export", str(tmp_path / "out.html")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kiln: warning: ") and "points outside" in err[0]


def test_tfjs_weights_inside_still_read(tmp_path):
    d = _model_dir(tmp_path)
    (d / "shards").mkdir()
    values = np.arange(12, dtype=np.float32)
    (d / "shards" / "w.bin").write_bytes(values.tobytes())
    model = open_model(_tfjs(d, ["shards/w.bin"]))
    assert model.warnings == []
    np.testing.assert_array_equal(model.graph.weights["w"].load(), values)


# ---- ONNX external data (the viewer's own reader) --------------------------------------------------------------


def _onnx_external(d: Path, location: str) -> Path:
    w = numpy_helper.from_array(np.zeros(12, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(SECRET.nbytes))):
        entry = w.external_data.add()
        entry.key, entry.value = k, v
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"], name="add")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [12])], [w])
    p = d / "model.onnx"
    p.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return p


@pytest.mark.parametrize("how", ["absolute", "dotdot", "link"])
def test_onnx_external_data(tmp_path, secret, watch, how):
    d = _model_dir(tmp_path)
    if how == "link":
        os.symlink(secret, d / "weights.bin")
    location = {"absolute": str(secret), "dotdot": "../../outside/secret.bin", "link": "weights.bin"}[how]
    _check_refused(_onnx_external(d, location), tmp_path, "w", "absolute path" if how == "absolute" else "outside")


def test_onnx_external_data_inside_still_read(tmp_path):
    d = _model_dir(tmp_path)
    values = np.arange(12, dtype=np.float32)
    (d / "weights.bin").write_bytes(values.tobytes())
    model = open_model(_onnx_external(d, "weights.bin"))
    assert model.warnings == []
    np.testing.assert_array_equal(model.graph.weights["w"].load(), values)


# ---- Core ML packages ------------------------------------------------------------------------------------------


def _mlpackage(d: Path, blob_file: str, root_path: str = "com.apple.CoreML/model.mlmodel") -> Path:
    """A package by hand (Manifest.json, Data/…/model.mlmodel) whose ML Program constant is a BlobFileValue."""
    from formats.test_coreml import MIL_pb2, program_spec
    spec = program_spec()
    const = spec.mlProgram.functions["main"].block_specializations["CoreML7"].operations[0]
    const.outputs[0].type.tensorType.dimensions[0].constant.size = 12
    val = const.attributes["val"]
    val.ClearField("immediateValue")
    val.type.tensorType.dataType = MIL_pb2.FLOAT32
    val.blobFileValue.fileName = blob_file
    val.blobFileValue.offset = 64
    pkg = d / "model.mlpackage"
    (pkg / "Data" / "com.apple.CoreML").mkdir(parents=True)
    (pkg / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(spec.SerializeToString())
    (pkg / "Manifest.json").write_text(json.dumps({
        "fileFormatVersion": "1.0.0", "rootModelIdentifier": "A",
        "itemInfoEntries": {"A": {"author": "com.apple.CoreML", "name": "model.mlmodel", "path": root_path}}}))
    return pkg


def _blob_file(values: np.ndarray) -> bytes:
    """A MIL blob storage file holding one float32 blob at offset 64 (StorageFormat.hpp layout)."""
    import struct
    header = struct.pack("<II", 1, 2).ljust(64, b"\0")
    meta = struct.pack("<IIQQ", 0xDEADBEEF, 2, values.nbytes, 128).ljust(64, b"\0")
    return header + meta + values.tobytes()


@pytest.mark.parametrize("how", ["dotdot", "absolute", "link"])
def test_coreml_blob_file(tmp_path, secret, watch, how):
    pytest.importorskip("coremltools.proto.MIL_pb2")
    d = _model_dir(tmp_path)
    secret.write_bytes(_blob_file(SECRET))          # a valid blob file outside the package: followed, it would show
    blob = {"dotdot": "@model_path/../../../../../outside/secret.bin", "absolute": str(secret),
            "link": "@model_path/weights/weight.bin"}[how]
    pkg = _mlpackage(d, blob)
    if how == "link":
        (pkg / "Data" / "com.apple.CoreML" / "weights").mkdir()
        os.symlink(secret, pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin")
    _check_refused(pkg, tmp_path, "w", "absolute path" if how == "absolute" else "outside")


def test_coreml_manifest_root_outside(tmp_path, secret, watch):
    pytest.importorskip("coremltools.proto.MIL_pb2")
    d = _model_dir(tmp_path)
    pkg = _mlpackage(d, "@model_path/weights/weight.bin", root_path="../../../../outside/secret.bin")
    with pytest.raises(ViewerError, match="root model .* points outside") as err:
        open_model(pkg)
    assert "\n" not in str(err.value)


def test_coreml_manifest_link(tmp_path, secret, watch):
    pytest.importorskip("coremltools.proto.MIL_pb2")
    pkg = _mlpackage(_model_dir(tmp_path), "@model_path/weights/weight.bin")
    (pkg / "Manifest.json").replace(secret)               # the real manifest, moved out and linked back
    os.symlink(secret, pkg / "Manifest.json")
    with pytest.raises(ViewerError, match="manifest .* points outside") as err:
        open_model(pkg)
    assert "\n" not in str(err.value)


def test_coreml_package_blob_inside_is_read(tmp_path):
    pytest.importorskip("coremltools.proto.MIL_pb2")
    d = _model_dir(tmp_path)
    pkg = _mlpackage(d, "@model_path/weights/weight.bin")
    (pkg / "Data" / "com.apple.CoreML" / "weights").mkdir()
    values = np.linspace(-1, 1, 12, dtype=np.float32)
    (pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").write_bytes(_blob_file(values))
    for opened in (pkg, pkg / "Manifest.json"):
        model = open_model(opened)
        assert model.format == "Core ML" and model.warnings == []
        assert [n.op_type for n in model.graph.nodes] == ["add", "relu"]
        np.testing.assert_array_equal(model.graph.weights["w"].load(), values)


# ---- companions found beside the model: TF SavedModel variables, Caffe, Caffe2, MXNet ----------------------------


def test_saved_model_variables_shard_link(tmp_path, secret, watch):
    from formats._pbwrite import f, msg
    from formats.test_tf import attr, nodedef, shape, write_bundle
    d = tmp_path / "models" / "saved"
    (d / "variables").mkdir(parents=True)
    nodes = [nodedef("x", "Placeholder", (), attr("dtype", f(6, 1))),
             nodedef("k", "VariableV2", (), attr("dtype", f(6, 1)), attr("shape", f(7, shape(12)))),
             nodedef("mm", "Mul", ("x", "k"))]
    meta = msg(f(1, msg(f(4, "serve"))), f(2, msg(*[f(1, n) for n in nodes])))
    (d / "saved_model.pb").write_bytes(msg(f(1, 1), f(2, meta)))
    write_bundle(d / "variables", {"k": SECRET})
    shard = d / "variables" / "variables.data-00000-of-00001"
    shard.unlink()
    os.symlink(secret, shard)
    _check_refused(d, tmp_path, "k/value", "outside")


def test_saved_model_graph_link(tmp_path, secret, watch):
    d = tmp_path / "models" / "saved"
    d.mkdir(parents=True)
    os.symlink(secret, d / "saved_model.pb")
    with pytest.raises(ViewerError, match="points outside") as err:
        open_model(d)
    assert "\n" not in str(err.value)


def test_caffe_weights_link(tmp_path, secret, watch):
    from formats.test_caffe import PROTOTXT, caffemodel_v2
    d = _model_dir(tmp_path)
    secret.write_bytes(caffemodel_v2())          # a real caffemodel outside: followed, its weights would show
    (d / "tiny.prototxt").write_text(PROTOTXT)
    os.symlink(secret, d / "tiny.caffemodel")
    _check_refused(d / "tiny.prototxt", tmp_path, None)
    assert open_model(d / "tiny.prototxt").graph.weights == {}


def test_caffe2_init_net_link(tmp_path, secret, watch):
    from formats.test_caffe2 import init_net, predict_net
    d = _model_dir(tmp_path)
    secret.write_bytes(init_net())
    (d / "predict_net.pb").write_bytes(predict_net())
    os.symlink(secret, d / "init_net.pb")
    _check_refused(d / "predict_net.pb", tmp_path, None)
    assert open_model(d / "predict_net.pb").properties.get("init_net") is None


@pytest.mark.parametrize("opened", ["symbol", "params"])
def test_mxnet_companion_link(tmp_path, secret, watch, opened):
    from formats.test_mxnet import SYMBOL, ndarray_list
    d = _model_dir(tmp_path)
    if opened == "symbol":
        secret.write_bytes(ndarray_list({"arg:conv0_weight": SECRET}))
        (d / "net-symbol.json").write_text(json.dumps(SYMBOL))
        os.symlink(secret, d / "net-0003.params")
        _check_refused(d / "net-symbol.json", tmp_path, None)
    else:
        secret.write_text(json.dumps(SYMBOL))
        (d / "net-0003.params").write_bytes(ndarray_list({"arg:conv0_weight": np.ones(3, np.float32)}))
        os.symlink(secret, d / "net-symbol.json")
        _check_refused(d / "net-0003.params", tmp_path, None)


def test_model_folder_may_be_reached_through_a_link(tmp_path):
    """Only where a named file lands counts: a model folder that is itself a link still reads its own files."""
    real = _model_dir(tmp_path)
    values = np.arange(12, dtype=np.float32)
    (real / "w.bin").write_bytes(values.tobytes())
    _tfjs(real, ["w.bin"])
    os.symlink(real, tmp_path / "alias")
    model = open_model(tmp_path / "alias" / "model.json")
    assert model.warnings == []
    np.testing.assert_array_equal(model.graph.weights["w"].load(), values)
