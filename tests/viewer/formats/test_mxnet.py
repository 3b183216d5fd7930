"""MXNet -symbol.json + .params written in the documented JSON / NDArray-list layouts."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from kiln.viewer.formats import open_model

from .conftest import check_damaged, check_detect, check_export, edges, input_weight, node

SYMBOL = {
    "nodes": [
        {"op": "null", "name": "data", "inputs": []},
        {"op": "null", "name": "conv0_weight", "attrs": {"__shape__": "(2, 3, 3, 3)"}, "inputs": []},
        {"op": "null", "name": "conv0_bias", "inputs": []},
        {"op": "Convolution", "name": "conv0", "attrs": {"kernel": "(3, 3)", "num_filter": "2", "no_bias": "False"},
         "inputs": [[0, 0, 0], [1, 0, 0], [2, 0, 0]]},
        {"op": "Activation", "name": "relu0", "attrs": {"act_type": "relu"}, "inputs": [[3, 0, 0]]},
        {"op": "SliceChannel", "name": "split0", "attrs": {"num_outputs": "2"}, "inputs": [[4, 0, 0]]},
        {"op": "elemwise_add", "name": "add0", "inputs": [[5, 0, 0], [5, 1, 0]]},
    ],
    "arg_nodes": [0, 1, 2],
    "heads": [[6, 0, 0]],
    "attrs": {"mxnet_version": ["int", 10901]},
}


def ndarray_list(arrays: dict[str, np.ndarray]) -> bytes:
    out = [struct.pack("<QQQ", 0x112, 0, len(arrays))]
    for arr in arrays.values():
        out.append(struct.pack("<Ii", 0xF993FAC9, 0))
        out.append(struct.pack("<I", arr.ndim) + struct.pack(f"<{arr.ndim}q", *arr.shape))
        out.append(struct.pack("<iii", 1, 0, {np.float32: 0, np.int32: 4}[arr.dtype.type]))
        out.append(arr.tobytes())
    out.append(struct.pack("<Q", len(arrays)))
    for name in arrays:
        out.append(struct.pack("<Q", len(name.encode())) + name.encode())
    return b"".join(out)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "net-symbol.json").write_text(json.dumps(SYMBOL))
    (tmp_path / "net-0003.params").write_bytes(ndarray_list({
        "arg:conv0_weight": np.arange(54, dtype=np.float32).reshape(2, 3, 3, 3),
        "arg:conv0_bias": np.array([1, 2], dtype=np.float32)}))
    return tmp_path


def test_symbol_with_params(files):
    model = open_model(files / "net-symbol.json")
    g = model.graph
    assert model.format == "MXNet" and model.version == "MXNet 10901"
    assert [n.op_type for n in g.nodes] == ["Convolution", "Activation", "SliceChannel", "elemwise_add"]
    assert edges(g) == {("conv0", "relu0"), ("relu0", "split0"), ("split0", "add0")}
    assert node(g, "add0").inputs[1].values == ["split0:1"]
    conv = node(g, "conv0")
    assert conv.attributes["kernel"] == [3, 3] and conv.attributes["num_filter"] == 2
    w = input_weight(g, conv, "weight")
    assert w.shape == [2, 3, 3, 3] and w.load()[1, 2, 2, 2] == 53
    assert input_weight(g, conv, "bias").load().tolist() == [1, 2]
    assert [t.name for t in g.inputs] == ["data"] and [t.name for t in g.outputs] == ["add0"]
    # opening the params file shows the same graph
    assert len(open_model(files / "net-0003.params").graph.nodes) == 4


def test_params_alone(tmp_path, files):
    p = tmp_path / "alone-0001.params"
    p.write_bytes((files / "net-0003.params").read_bytes())
    g = open_model(p).graph
    assert g.weights["conv0_weight"].load()[0, 0, 0, 1] == 1


def test_detect_damage_export(files, tmp_path):
    check_detect(files / "net-symbol.json", tmp_path, "MXNet", ".txt")
    check_damaged(files / "net-0003.params", tmp_path, magic_len=16)
    bad = tmp_path / "bad-symbol.json"
    bad.write_text(json.dumps(SYMBOL)[:200])
    from .conftest import bounded_open
    from kiln.errors import ViewerError
    assert isinstance(bounded_open(bad), ViewerError)
    check_export(open_model(files / "net-symbol.json"), tmp_path)
