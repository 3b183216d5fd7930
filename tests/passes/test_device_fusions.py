"""Fusions made for GPU kernels (1×1 chains, projection sums, stem pooling) are left out of CPU builds, where the
merged layer would run its convolutions one by one without their fused epilogues; the CPU engine of a small ResNet
keeps one Convolution per ONNX Conv and matches ONNX Runtime."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnxruntime as ort

import kiln
import kiln.onnx
from kiln.passes import fusion_passes

from fingerprints import _resnet_like

GPU_ONLY = {"1x1 chain fusion", "projection shortcut fusion", "stem pooling"}


def test_gpu_fusions_run_for_cuda_builds_only() -> None:
    every = {p.name for p in fusion_passes()}
    assert GPU_ONLY <= every
    assert {p.name for p in fusion_passes("cuda")} == every
    assert {p.name for p in fusion_passes("cpu")} == every - GPU_ONLY


def test_cpu_resnet_keeps_its_convolutions_and_matches_onnxruntime(tmp_path) -> None:
    import onnx
    case = _resnet_like(tmp_path)
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(case.path)).graph.node)
    engine = kiln.build(kiln.onnx.parse(str(case.path)), kiln.BuildConfig(device="cpu", profiles={"x": (2, 3, 32, 32)}))
    kinds = Counter(layer["kind"] for layer in engine.layers)
    assert kinds["Conv1x1Chain"] == kinds["Conv1x1Sum"] == 0
    assert kinds["Convolution"] == convs and kinds["Pooling"] >= 1       # the stem's max pool stays a layer
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(case.path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = engine.context().run({"x": x})["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 + 1e-4 * float(np.abs(ref).max()))
