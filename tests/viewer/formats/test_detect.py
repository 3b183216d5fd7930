"""Format detection across all readers, and lazy imports of heavy libraries."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kiln.errors import ViewerError
from kiln.viewer.formats import FORMATS, detect


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
    assert {"keras", "coreml", "tflite", "caffe", "caffe2", "mxnet", "tfjs", "tf", "pt2", "safetensors",
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
        for m in ("keras", "coreml", "tflite", "caffe", "caffe2", "mxnet", "tfjs", "tf", "pt2", "safetensors", "gguf"):
            importlib.import_module("kiln.viewer.formats." + m)
        heavy = [m for m in ("h5py", "keras", "coremltools", "tensorflow", "torch", "flatbuffers", "gguf",
                             "safetensors.numpy", "onnx", "mxnet", "caffe") if m in sys.modules]
        print(heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
