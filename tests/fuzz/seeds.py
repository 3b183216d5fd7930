"""Small valid seed files that the mutators start from: ONNX models, CPU engines and one file per viewer format.

Everything is written once per run into ``<run>/seeds``. The viewer seeds reuse the
writers of ``tests/viewer/formats`` where those are importable, so each format has
one writer in the repository; a format whose writer or library is missing has no
seed and shows as uncovered in the report.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

TESTS = Path(__file__).resolve().parents[1]
ONNX_SEEDS = ("convnet", "mlp", "control")


# ---- ONNX --------------------------------------------------------------------------------
def onnx_models() -> dict[str, object]:
    """Three small valid models: a conv net, a matmul/softmax with a pointwise chain, and If/Loop control flow."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)

    def init(name: str, arr: np.ndarray):
        return numpy_helper.from_array(np.asarray(arr), name)

    def model(nodes, name, inputs, outputs, inits):
        m = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)], producer_name="kiln-fuzz")
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        return m

    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)      # noqa: E731
    conv = model([
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["bn"], name="/bn/BN"),
        helper.make_node("Relu", ["bn"], ["r"], name="/relu/Relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="/pool/MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="/head/Flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="/head/Gemm", transB=1),
        helper.make_node("Softmax", ["logits"], ["y"], name="/head/Softmax", axis=-1),
    ], "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [init("w", f32(4, 3, 3, 3)), init("b", f32(4)), init("g", np.ones(4, np.float32)),
         init("beta", f32(4)), init("mean", f32(4)), init("var", np.ones(4, np.float32)),
         init("fc_w", f32(5, 64)), init("fc_b", f32(5))])
    mlp = model([
        helper.make_node("MatMul", ["x", "w"], ["m"], name="/fc/MatMul"),
        helper.make_node("Add", ["m", "b"], ["a"], name="/fc/Add"),
        helper.make_node("Mul", ["a", "k"], ["s"], name="/act/Mul"),
        helper.make_node("Exp", ["s"], ["e"], name="/act/Exp"),
        helper.make_node("Neg", ["e"], ["n"], name="/act/Neg"),
        helper.make_node("Sigmoid", ["n"], ["sg"], name="/act/Sigmoid"),
        helper.make_node("Reshape", ["sg", "shape"], ["rs"], name="/reshape/Reshape"),
        helper.make_node("Transpose", ["rs"], ["t"], name="/reshape/Transpose", perm=[0, 2, 1]),
        helper.make_node("Softmax", ["t"], ["y"], name="/head/Softmax", axis=-1),
    ], "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 2])],
        [init("w", f32(8, 8)), init("b", f32(8)), init("k", np.float32(0.5)),
         init("shape", np.array([-1, 2, 4], np.int64))])
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t_out"], name="then/Relu")], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e_out"], name="else/Neg")], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [4])])
    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", "one"], ["v_out"], name="body/Add"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body/Identity")], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [4])])
    control = model([
        helper.make_node("If", ["c"], ["y0"], name="/if/If", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trip", "keep", "y0"], ["y"], name="/loop/Loop", body=body),
    ], "control", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
                   helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [init("trip", np.array(3, np.int64)), init("keep", np.array(True)), init("one", np.ones(4, np.float32))])
    return {"convnet": conv, "mlp": mlp, "control": control}


def write_onnx(seed_dir: Path) -> dict[str, Path]:
    import onnx
    out = {}
    for name, m in onnx_models().items():
        out[name] = seed_dir / "onnx" / f"{name}.onnx"
        out[name].parent.mkdir(parents=True, exist_ok=True)
        onnx.save(m, str(out[name]))
    return out


def write_engines(seed_dir: Path, models: dict[str, Path]) -> dict[str, Path]:
    """CPU engines of the ONNX seeds (the MLP one holds a fused Pointwise layer), built through the CLI at
    optimization level 1 (fusions, no timing), with the build time and source path taken out of the
    header so every run writes the same bytes."""
    from fuzz import engine_cases, mutate
    from kiln.cli import main
    out = {}
    for name, path in models.items():
        eng = seed_dir / "engines" / f"{name}.kiln"
        eng.parent.mkdir(parents=True, exist_ok=True)
        argv = ["build", str(path), "-o", str(eng), "--device", "cpu", "-q", "--opt-level", "1"]
        if name == "mlp":
            argv += ["--shapes", "x:2x8"]
        if main(argv) == 0:
            fields, header, weights = engine_cases.split(eng.read_bytes())
            header.get("build", {}).update(seconds=0.0, source=path.name)
            eng.write_bytes(engine_cases.forge(fields, mutate.dumps(header).encode(), weights))
            out[name] = eng
    return out


# ---- viewer formats ---------------------------------------------------------------------
def _test_module(name: str):
    """A module of tests/viewer/formats (its file writers), or None when it cannot be imported here."""
    if str(TESTS / "viewer") not in sys.path:
        sys.path.insert(0, str(TESTS / "viewer"))
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        return importlib.import_module(f"formats.{name}")
    except BaseException as exc:           # pytest.skip at import raises a BaseException subclass
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return None


def _caffe(d: Path) -> Path:
    t = _test_module("test_caffe")
    (d / "deploy.prototxt").write_text(t.PROTOTXT)
    (d / "net.caffemodel").write_bytes(t.caffemodel_v2())
    return d / "net.caffemodel"


def _caffe2(d: Path) -> Path:
    t = _test_module("test_caffe2")
    (d / "init_net.pb").write_bytes(t.init_net())
    (d / "predict_net.pb").write_bytes(t.predict_net())
    return d / "predict_net.pb"


def _coreml(d: Path) -> list[Path]:
    """A NeuralNetwork classifier .mlmodel, and an .mlpackage (coremltools' own package and blob writers)
    whose ML Program reads its weight from ``@model_path/weights/weight.bin``."""
    t = _test_module("test_coreml")
    (d / "model.mlmodel").write_bytes(t.classifier_spec().SerializeToString(deterministic=True))
    from coremltools import libmilstoragepython as storage
    from coremltools import libmodelpackage as package
    parts = d / "parts"
    (parts / "weights").mkdir(parents=True)
    writer = storage._BlobStorageWriter(str(parts / "weights" / "weight.bin"))
    offset = writer.write_float_data(np.linspace(-2, 2, 4, dtype=np.float32))
    del writer                                                  # flushes the blob file
    spec = t.program_spec()
    val = spec.mlProgram.functions["main"].block_specializations["CoreML7"].operations[0].attributes["val"]
    val.ClearField("immediateValue")
    val.blobFileValue.fileName, val.blobFileValue.offset = "@model_path/weights/weight.bin", offset
    (parts / "model.mlmodel").write_bytes(spec.SerializeToString(deterministic=True))
    pkg = package.ModelPackage(str(d / "net.mlpackage"))
    pkg.setRootModel(str(parts / "model.mlmodel"), "model.mlmodel", "com.apple.CoreML", "CoreML Model Specification")
    pkg.addItem(str(parts / "weights"), "weights", "com.apple.CoreML", "CoreML Model Weights")
    del pkg
    shutil.rmtree(parts)
    manifest = d / "net.mlpackage" / "Manifest.json"          # fixed item ids instead of random UUIDs
    doc = json.loads(manifest.read_text())
    entries = doc["itemInfoEntries"]
    by_path = sorted(entries, key=lambda k: entries[k]["path"])
    ids = {old: f"00000000-0000-4000-8000-{i:012d}" for i, old in enumerate(by_path)}
    doc["itemInfoEntries"] = {ids[k]: entries[k] for k in sorted(entries, key=ids.get)}
    doc["rootModelIdentifier"] = ids[doc["rootModelIdentifier"]]
    manifest.write_text(json.dumps(doc, indent=4))
    return [d / "model.mlmodel", d / "net.mlpackage"]


def _gguf(d: Path) -> Path:
    import gguf
    w = gguf.GGUFWriter(str(d / "tiny.gguf"), "llama")
    w.add_block_count(1)
    w.add_name("tiny")
    w.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(8, 4))
    w.add_tensor("blk.0.attn_q.weight", np.ones((4, 4), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return d / "tiny.gguf"


def _steady(name: str, body: bytes) -> bytes:
    """A zip member without what changes from run to run: save dates, object ids, random serialization ids."""
    if name.endswith("serialization_id"):
        return b"0" * len(body)
    if name == "metadata.json":
        return re.sub(rb'"date_saved": "[^"]*"', b'"date_saved": "2000-01-01@00:00:00"', body)
    if name == "config.json":
        ids: dict[bytes, bytes] = {}
        return re.sub(rb'"shared_object_id": (\d+)',
                      lambda m: b'"shared_object_id": ' + ids.setdefault(m.group(1), str(len(ids)).encode()), body)
    return body


def _fixed_zip(path: Path) -> Path:
    """Rewrite a zip archive with fixed member times and steady members, so every run writes the same bytes."""
    with zipfile.ZipFile(path) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for name, body in members:
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), _steady(name, body))
    return path


def _keras(d: Path) -> Path:
    import keras
    keras.utils.set_random_seed(0)
    _test_module("test_keras")._functional().save(d / "model.keras")
    return _fixed_zip(d / "model.keras")


def _mxnet(d: Path) -> Path:
    t = _test_module("test_mxnet")
    (d / "net-symbol.json").write_text(json.dumps(t.SYMBOL))
    (d / "net-0003.params").write_bytes(t.ndarray_list({
        "arg:conv0_weight": np.arange(54, dtype=np.float32).reshape(2, 3, 3, 3),
        "arg:conv0_bias": np.array([1, 2], dtype=np.float32)}))
    return d / "net-symbol.json"


def _pt2(d: Path) -> Path:
    import torch
    torch.manual_seed(0)
    net = _test_module("test_pt2").Net().eval()
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 8, 8),)), str(d / "net.pt2"))
    return _fixed_zip(d / "net.pt2")


def _torchscript(d: Path) -> list[Path]:
    """A traced TorchScript module and a torch.save zip checkpoint (the reader replays their pickles as data)."""
    import torch
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 5))
    torch.jit.trace(net.eval(), torch.randn(1, 3, 8, 8)).save(str(d / "traced.jit"))
    torch.save({"w": torch.arange(6.0).reshape(2, 3).t(), "h": torch.ones(3, dtype=torch.float16)}, str(d / "ckpt.pt"))
    return [_fixed_zip(d / "traced.jit"), _fixed_zip(d / "ckpt.pt")]


def _safetensors(d: Path) -> Path:
    from safetensors.numpy import save_file
    save_file({"layer.0.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "head.bias": np.ones(3, np.float16)},
              str(d / "model.safetensors"), metadata={"note": "tiny"})
    return d / "model.safetensors"


def _tf(d: Path) -> list[Path]:
    """A SavedModel with a checkpoint, opened as its folder and as its saved_model.pb."""
    t = _test_module("test_tf")
    (d / "variables").mkdir()
    (d / "saved_model.pb").write_bytes(t.msg(t.f(1, 1), t.f(2, t.meta_graph(with_library=True))))
    t.write_bundle(d / "variables", {"block/conv/filter": np.arange(54, dtype=np.float32).reshape(3, 3, 3, 2)})
    return [d, d / "saved_model.pb"]


def _tfjs(d: Path) -> Path:
    return _test_module("test_tfjs").graph_model(d)


def _tflite(d: Path) -> Path:
    (d / "model.tflite").write_bytes(_test_module("test_tflite").build_tflite())
    return d / "model.tflite"


# format module in kiln.viewer.formats -> writer of small valid files (plus companions) into a folder,
# returning what to open (a path or a list of paths inside the folder, or the folder itself)
VIEWER_WRITERS: dict[str, Callable[[Path], Path | list[Path]]] = {
    "caffe": _caffe, "caffe2": _caffe2, "coreml": _coreml, "gguf": _gguf, "keras": _keras, "mxnet": _mxnet,
    "pt2": _pt2, "safetensors": _safetensors, "tf": _tf, "tfjs": _tfjs, "tflite": _tflite,
    "torchscript": _torchscript,
}
# formats fuzzed through their own targets ("onnx" models, "engine" files), not as viewer-only formats
OWN_TARGETS = {"onnx": "onnx", "kiln_engine": "engine"}


def viewer_formats() -> list[str]:
    """The reader modules of the viewer's format table that are viewer-only targets."""
    from kiln.viewer.formats import FORMATS
    return [f.module for f in FORMATS if f.module not in OWN_TARGETS]


def write_viewer(seed_dir: Path, formats: list[str]) -> dict[str, str | list[str]]:
    """Seed folders per format; the value lists what to open, relative to ``seed_dir/view/<format>``
    ("." for the folder), or is the reason there is no seed (a string starting with "!")."""
    out = {}
    for fmt in formats:
        d = seed_dir / "view" / fmt
        d.mkdir(parents=True, exist_ok=True)
        writer = VIEWER_WRITERS.get(fmt)
        if writer is None:
            out[fmt] = "!no seed writer in tests/fuzz/seeds.py"
            continue
        try:
            written = writer(d)
            out[fmt] = [str(p.relative_to(d)) for p in (written if isinstance(written, list) else [written])]
        except Exception as exc:
            out[fmt] = f"!seed writer failed: {type(exc).__name__}: {str(exc)[:120]}"
    return out


def prepare(seed_dir: Path) -> dict:
    """Write every seed; returns the manifest stored as ``seed_dir/manifest.json``."""
    seed_dir.mkdir(parents=True, exist_ok=True)
    models = write_onnx(seed_dir)
    engines = write_engines(seed_dir, models)
    manifest = {"onnx": {k: str(v) for k, v in models.items()},
                "engine": {k: str(v) for k, v in engines.items()},
                "view": write_viewer(seed_dir, viewer_formats())}
    (seed_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
