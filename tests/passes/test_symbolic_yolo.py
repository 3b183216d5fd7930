"""A YOLOv5 detector exported with dynamic image size (its Detect grids made from each feature map's shape, as
YOLOv5's ``export --dynamic`` writes them): one range engine over batch and image size runs at sizes across the
range and matches ONNX Runtime there. It has the static engine's layers: each head's grids, which depend on the
image size, are one ShapeConstant layer computed once per input shape, and the box arithmetic reading them is
fused into Pointwise layers as in the static engine."""
from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from test_symbolic_shapes import _build, _same_layers

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import zoo  # noqa: E402

RANGE = {"images": ((1, 3, 64, 64), (2, 3, 96, 96), (2, 3, 128, 128))}


@pytest.fixture(scope="module")
def yolo() -> bytes:
    torch.manual_seed(0)
    model = zoo.YOLOv5(depth=0.33, width=0.125, nc=3, image=96, dynamic=True).eval()
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 96, 96),), f, input_names=["images"], output_names=["det"],
                          opset_version=17, dynamo=False, dynamic_axes={"images": {0: "b", 2: "h", 3: "w"}})
    return f.getvalue()


@pytest.fixture(scope="module")
def engine(yolo):
    return _build(yolo, RANGE)


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 96, 96), (1, 3, 128, 96), (2, 3, 128, 128)])
def test_yolo_range_engine_matches_onnxruntime(yolo, engine, shape):
    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    ref = ort.InferenceSession(yolo, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    got = engine.context().run({"images": x})["det"]
    assert got.shape == ref.shape == (shape[0], 3 * sum((shape[2] // s) * (shape[3] // s) for s in (8, 16, 32)), 8)
    # boxes are in pixels (grid + offsets times the stride): compare against the output's own scale
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_yolo_range_engine_has_the_static_engines_layers(yolo, engine):
    _same_layers(engine, _build(yolo, {"images": (2, 3, 96, 96)}))


def test_yolo_grids_are_computed_once_per_image_size(engine):
    ctx = engine.context()
    steps = [s for s in ctx.program.steps if s.kind == "ShapeConstant"]
    assert len(steps) == 3                              # one per Detect head
    calls = []
    for step in steps:
        def counted(*xs, body=step.fn.fn, name=step.name):
            calls.append((name, tuple(xs[0].shape[2:])))
            return body(*xs)
        step.fn.fn = counted
    small, wide = np.zeros((1, 3, 64, 64), np.float32), np.zeros((2, 3, 96, 128), np.float32)
    for x in (small, small, wide, wide, small):
        ctx.run({"images": x})
    # each head's feature map at stride 8, 16, 32: computed at the first run of each size only
    assert sorted(calls) == sorted((s.name, (h // k, w // k)) for s, k in zip(steps, (8, 16, 32))
                                   for h, w in ((64, 64), (96, 128)))
