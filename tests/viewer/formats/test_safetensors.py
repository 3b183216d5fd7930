from __future__ import annotations

import numpy as np
import pytest

from kiln.viewer.formats import open_model

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


def test_big_file_opens_without_reading_weights(tmp_path):
    """A 1 GiB tensor (a sparse file) is listed without its bytes being read."""
    import json
    import struct


    n = 1 << 28
    header = json.dumps({"big": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    p = tmp_path / "big.safetensors"
    with open(p, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(8 + len(header) + 4 * n)
    model = open_model(p)
    assert model.graph.weights["big"].shape == [n] and model.graph.weights["big"].nbytes == 4 * n


def test_export(st_file, tmp_path):
    check_export(open_model(st_file), tmp_path)
