"""CPU convolution tactics in preference order: ``onednn_cached`` comes before ``torch``, so a tie within the CPU
tie margin keeps it, while ``torch`` still judges the other candidates' outputs in the build (a wrong fast kernel
first in preference order is refused, not taken as the reference). Skipped where no oneDNN library is installed."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
import torch.nn as nn

import kiln
import kiln.onnx
from kiln.builder.tactics import CPU_TIE_MARGIN, _fastest
from kiln.kernels import cpu_dnnl
from kiln.kernels.registry import TACTICS, KernelContext, tactics_for

pytestmark = pytest.mark.skipif(cpu_dnnl.library() is None,
                                reason="no oneDNN library (pip install onednn-cpu-gomp, or KILN_ONEDNN_LIBRARY)")

CPU = KernelContext(device="cpu", precision="fp32", layer_name="conv")
ATTRS = {"stride": [1, 1], "pads": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1, "activation": "relu"}


def test_a_tie_with_torch_keeps_onednn_cached():
    cands = tactics_for("Convolution", ATTRS, CPU)
    order = [t.name for t in cands]
    assert order[0] == "onednn_cached" and "torch" in order
    assert _fastest(cands, {"torch": 1.0, "onednn_cached": CPU_TIE_MARGIN - 0.01}, CPU_TIE_MARGIN) == "onednn_cached"
    assert _fastest(cands, {"torch": 1.0, "onednn_cached": CPU_TIE_MARGIN + 0.01}, CPU_TIE_MARGIN) == "torch"


def test_torch_judges_a_wrong_kernel_first_in_preference_order(monkeypatch):
    """onednn_cached made 1% wrong: the build must refuse it (torch's outputs judge it) and the engine must match
    ONNX Runtime; were the first candidate the judge, every other tactic would be refused instead."""
    import onnxruntime as ort
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    f = io.BytesIO()
    torch.onnx.export(model, (torch.randn(1, 3, 10, 10),), f, input_names=["x"], output_names=["y"], opset_version=17,
                      dynamo=False)
    data = f.getvalue()
    tactics_for("Convolution", ATTRS, CPU)          # every kernel module loaded before the table is patched
    good = next(t for t in TACTICS["Convolution"] if t.name == "onednn_cached")

    def wrong(attrs, ctx):
        run = good.make(attrs, ctx)
        return lambda *args, **kw: tuple(y * 1.01 for y in run(*args, **kw))
    monkeypatch.setitem(TACTICS, "Convolution", [dataclasses.replace(t, make=wrong) if t is good else t
                                                 for t in TACTICS["Convolution"]])
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))
    assert all(layer["tactic"] != "onednn_cached" for layer in engine.layers if layer["kind"] == "Convolution")
    x = np.random.default_rng(0).standard_normal((1, 3, 10, 10)).astype(np.float32)
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = engine.context().run({"x": x})["y"]
    assert np.abs(got - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()
