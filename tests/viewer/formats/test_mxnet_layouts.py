"""MXNet layouts beyond test_mxnet.py's: operators with more outputs than they declare, and NDArray lists with
empty arrays and V3 (numpy-shape) scalars, written as MXNet's NDArray::Save lays them out (src/ndarray/ndarray.cc:
magic, int32 storage type, int32 rank and int64 dims; for an empty array nothing more; else int32 device type
and id, int32 type flag, the data)."""
from __future__ import annotations

import json
import struct

import numpy as np

from kiln.errors import ViewerError
from kiln.viewer.formats import open_model
from kiln.viewer.formats.mxnet import read_params

from .conftest import bounded_open, edges, node

_V2, _V3 = 0xF993FAC9, 0xF993FACA


def _array(magic: int, arr: np.ndarray | None, ndim: int | None = None) -> bytes:
    """One NDArray record; ``arr`` None writes an empty array of rank ``ndim`` (-1: unknown)."""
    if arr is None:
        return struct.pack("<Iii", magic, 0, ndim)
    head = struct.pack("<Iii", magic, 0, arr.ndim) + struct.pack(f"<{arr.ndim}q", *arr.shape)
    return head + struct.pack("<iii", 1, 0, 0) + arr.astype("<f4").tobytes()


def _ndarray_list(records: list[bytes], names: list[str]) -> bytes:
    out = [struct.pack("<QQQ", 0x112, 0, len(records)), *records, struct.pack("<Q", len(names))]
    out += [struct.pack("<Q", len(n.encode())) + n.encode() for n in names]
    return b"".join(out)


def test_v3_scalars_and_empty_arrays(tmp_path):
    """A V3 rank-0 array is a scalar with its data; rank -1 (and rank 0 before V3) is an empty array with none."""
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    p = tmp_path / "np-0000.params"
    p.write_bytes(_ndarray_list(
        [_array(_V3, np.array(2.5, np.float32)), _array(_V3, None, -1), _array(_V3, w)],
        ["scale", "unset", "weight"]))
    params = read_params(p)
    assert set(params) == {"scale", "weight"}
    g = open_model(p).graph
    assert g.weights["scale"].shape == [] and g.weights["scale"].load().tolist() == 2.5
    np.testing.assert_array_equal(g.weights["weight"].load(), w)

    p2 = tmp_path / "legacy-0000.params"                  # V2, as MXNet 1.x saves an unset array: rank -1 or 0
    p2.write_bytes(_ndarray_list([_array(_V2, None, -1), _array(_V2, None, 0), _array(_V2, w)],
                                 ["arg:a", "arg:b", "arg:w"]))
    assert set(read_params(p2)) == {"w"}
    np.testing.assert_array_equal(open_model(p2).graph.weights["w"].load(), w)


SYMBOL = {"nodes": [{"op": "null", "name": "data", "inputs": []},
                    {"op": "topk", "name": "topk0", "attrs": {"k": "3", "ret_typ": "both"}, "inputs": [[0, 0, 0]]},
                    {"op": "elemwise_add", "name": "add0", "inputs": [[1, 0, 0], [1, 1, 0]]}],
          "arg_nodes": [0], "heads": [[2, 0, 0], [1, 1, 0]], "attrs": {"mxnet_version": ["int", 10901]}}


def test_outputs_beyond_num_outputs(tmp_path):
    """topk with ret_typ "both" has two outputs and no num_outputs attribute: the second one is drawn as its."""
    path = tmp_path / "topk-symbol.json"
    path.write_text(json.dumps(SYMBOL))
    g = open_model(path).graph
    topk = node(g, "topk0")
    assert [a.values for a in topk.outputs] == [["topk0"], ["topk0:1"]]
    assert node(g, "add0").inputs[1].values == ["topk0:1"] and edges(g) == {("topk0", "add0")}
    assert [t.name for t in g.inputs] == ["data"] and [t.name for t in g.outputs] == ["add0", "topk0:1"]


def test_output_counts_are_bounded(tmp_path):
    """A declared or referenced output count past any operator's is refused in one line, not allocated."""
    for where in ("attr", "head"):
        sym = json.loads(json.dumps(SYMBOL))
        if where == "attr":
            sym["nodes"][1]["attrs"]["num_outputs"] = "4000000000"
        else:
            sym["heads"].append([1, 4000000000, 0])
        path = tmp_path / f"{where}-symbol.json"
        path.write_text(json.dumps(sym))
        err = bounded_open(path)
        assert isinstance(err, ViewerError) and "topk0" in str(err) and "\n" not in str(err)
