"""Format detection across all readers, and lazy imports of heavy libraries."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kiln.errors import ViewerError
from kiln.viewer.formats import FORMATS, detect, open_model


@pytest.mark.parametrize("content", [b"", b"hello, this is no model at all\n" * 10, b"{\"a\": 1}",
                                     bytes(range(256)) * 8])
def test_unknown_file_lists_formats(tmp_path, content):
    junk = tmp_path / "notes.pb"
    junk.write_bytes(content)
    with pytest.raises(ViewerError) as err:
        detect(junk)
    msg = str(err.value)
    assert "\n" not in msg
    for name in ("Keras", "Core ML", "TensorFlow Lite", "Caffe", "Caffe2", "MXNet", "TensorFlow.js",
                 "TensorFlow", "PyTorch export", "safetensors", "GGUF"):
        assert name in msg


def test_plain_directory_is_not_a_saved_model(tmp_path):
    (tmp_path / "variables").mkdir()
    with pytest.raises(ViewerError):
        detect(tmp_path)


def test_every_reader_is_in_the_table():
    modules = {f.module for f in FORMATS}
    assert {"keras", "coreml", "tflite", "caffe", "caffe2", "mxnet", "tfjs", "tf", "pt2", "torchscript", "safetensors",
            "gguf"} <= modules


def test_onnx_files_stay_onnx(tmp_path):
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    data = helper.make_model(graph, producer_name="kiln-test").SerializeToString()
    for name in ("model.pb", "model.bin", "model.mlmodel", "model.caffemodel"):
        p = tmp_path / name
        p.write_bytes(data)
        assert detect(p).name == "ONNX", name


def test_readers_import_no_heavy_libraries():
    """Importing every reader (and opening a GGUF-free safetensors file) pulls in no framework."""
    code = textwrap.dedent("""
        import importlib, sys
        for m in ("keras", "coreml", "tflite", "caffe", "caffe2", "mxnet", "tfjs", "tf", "pt2", "torchscript",
                  "safetensors", "gguf"):
            importlib.import_module("kiln.viewer.formats." + m)
        heavy = [m for m in ("h5py", "keras", "coremltools", "tensorflow", "torch", "flatbuffers", "gguf",
                             "safetensors.numpy", "onnx", "mxnet", "caffe") if m in sys.modules]
        print(heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name, fmt", [("model.onnx", "ONNX"), ("net.tflite", "TensorFlow Lite"),
                                       ("weights.caffemodel", "Caffe"), ("m.gguf", "GGUF")])
def test_random_bytes_under_a_format_name(tmp_path, name, fmt):
    """A name that claims one format gets that format's own refusal, not the list of every format."""
    p = tmp_path / name
    p.write_bytes(bytes(random.Random(7).randbytes(2048)))
    with pytest.raises(ViewerError) as err:
        detect(p)
    msg = str(err.value)
    assert f"this {p.suffix} file is not a valid {fmt} model" in msg and "\n" not in msg
    assert "supported formats" not in msg


def test_sniff_handle_is_passed_to_read(tmp_path, monkeypatch):
    """open_model hands read() the very handle its sniff returned (Netron's match/open), then closes it."""
    import kiln.viewer.formats.tfjs as tfjs

    p = tmp_path / "m-weights_manifest.json"
    (tmp_path / "s1").write_bytes(np.zeros(2, np.float32).tobytes())
    p.write_text(json.dumps([{"weights": [{"name": "a/w", "shape": [2], "dtype": "float32"}], "paths": ["s1"]}]))
    handles, parsed = [], []
    real_sniff, real_loads = tfjs.sniff, tfjs.json.loads
    monkeypatch.setattr(tfjs, "sniff", lambda path, head: handles.append(real_sniff(path, head)) or handles[-1])
    monkeypatch.setattr(tfjs.json, "loads", lambda *a, **k: parsed.append(1) or real_loads(*a, **k))
    seen = []
    real_read = tfjs.read
    monkeypatch.setattr(tfjs, "read", lambda path, handle=None: seen.append(handle) or real_read(path, handle))
    assert open_model(p).graph.weights["a/w"].shape == [2]
    assert len(handles) == 1 and seen == handles and len(parsed) == 1   # the JSON is parsed once


def test_viewer_extra_brings_every_optional_piece(tmp_path, monkeypatch):
    """`pip install kiln[viewer]` lists what the readers and PNG export import lazily; a missing one is named."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    viewer = " ".join(project["project"]["optional-dependencies"]["viewer"])
    for needed in ("h5py", "playwright"):
        assert needed in viewer
    p = tmp_path / "m.h5"
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    monkeypatch.setitem(sys.modules, "h5py", None)          # as if not installed
    with pytest.raises(ViewerError) as err:
        open_model(p)
    msg = str(err.value)
    assert "\n" not in msg and "h5py" in msg and "kiln[viewer]" in msg
