from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import ViewerError
from kiln.viewer.formats import detect, open_model

from .conftest import check_damaged, check_detect, check_export, input_weight, node

safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors is not installed")


@pytest.fixture
def st_file(tmp_path):
    tensors = {
        "encoder.layer.0.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "encoder.layer.0.bias": np.ones(3, dtype=np.float16),
        "head.weight": np.full((2, 3), 7, dtype=np.int64),
    }
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(tensors, str(path), metadata={"format": "np", "note": "tiny"})
    return path


def test_reads_weights_listing(st_file):
    model = open_model(st_file)
    g = model.graph
    assert model.format == "safetensors"
    assert model.properties["note"] == "tiny"
    assert len(g.weights) == 3 and len(g.nodes) == 2
    layer = node(g, "encoder.layer.0")
    assert layer.group == ("encoder", "layer")
    w = input_weight(g, layer, "weight")
    assert w.shape == [3, 4] and w.dtype == "f32"
    assert w.load()[2, 3] == 11.0
    assert input_weight(g, layer, "bias").load().dtype == np.float16
    assert g.weights["head.weight"].load()[1, 2] == 7


def test_detect_and_damage(st_file, tmp_path):
    check_detect(st_file, tmp_path, "safetensors", ".gguf")
    check_damaged(st_file, tmp_path, magic_len=8, strict_random=True)


def test_unknown_file_lists_formats(tmp_path):
    junk = tmp_path / "notes.bin"
    junk.write_bytes(b"hello, this is no model at all\n" * 10)
    with pytest.raises(ViewerError) as err:
        detect(junk)
    msg = str(err.value)
    assert "\n" not in msg
    for name in ("Keras", "Core ML", "TensorFlow Lite", "Caffe", "Caffe2", "MXNet", "TensorFlow.js",
                 "TensorFlow", "PyTorch export", "safetensors", "GGUF"):
        assert name in msg


def test_export(st_file, tmp_path):
    check_export(open_model(st_file), tmp_path)
