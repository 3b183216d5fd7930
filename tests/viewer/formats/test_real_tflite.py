"""Real TFLite files against Google's own TFLite interpreter (the ``ai-edge-litert`` package).

Every operator of the file is a node with the interpreter's op name, and every constant tensor Kiln shows has the
values the interpreter holds for it. A sparse tensor (MediaPipe's full-range face detector and pose detector
store convolution filters in CSR form) is compared with the output of the DENSIFY operator that expands it when
the interpreter runs.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from kiln.viewer.formats import open_model

from .test_real_files import real

FILES = [("basic-pitch", "nmp.tflite"), ("fer", "emotion_model_quantized.tflite"),
         ("openwakeword", "embedding_model.tflite"), ("mediapipe", "face_detection_full_range_sparse.tflite"),
         ("mediapipe", "pose_detection.tflite"), ("mediapipe", "face_detection_short_range.tflite")]


@pytest.mark.parametrize("source, name", FILES, ids=[n for _, n in FILES])
def test_tflite_against_the_interpreter(source, name):
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    path = real(source, name)
    it = litert.Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                            experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    ops = it._get_ops_details()
    g = open_model(path).graph
    assert Counter(n.op_type for n in g.nodes) == Counter(o["op_name"] for o in ops)
    densify = {int(o["inputs"][0]): int(o["outputs"][0]) for o in ops if o["op_name"] == "DENSIFY"}
    if densify:                                   # DENSIFY's outputs are filled when the interpreter runs
        for d in it.get_input_details():
            it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
        it.invoke()
    names, seen = {}, set()                       # Kiln's tensor names: duplicates get ":<index>"
    for t in sorted(it.get_tensor_details(), key=lambda t: t["index"]):
        n = t["name"] or f"tensor_{t['index']}"
        n = f"{n}:{t['index']}" if n in seen else n
        seen.add(n)
        names[n] = t["index"]
    compared = 0
    for n, w in g.weights.items():
        want = it.get_tensor(densify.get(names[n], names[n]))
        got = w.load()
        assert got.shape == want.shape and got.dtype == want.dtype, n
        np.testing.assert_array_equal(got, want, err_msg=n)
        compared += 1
    assert compared == len(g.weights) > 40
    if "sparse" in name or "pose" in name:
        assert len(densify) >= 38
