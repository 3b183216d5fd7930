"""benchmarks/vision.py, the stand-ins for torchvision's ResNet-50, MobileNetV3-Large and ViT-B/16: their parameter
counts are torchvision's published ones, a torchvision state dict loads into them where torchvision loads, and
MobileNetV3 (depthwise convolutions, squeeze-excitation, hard-swish) builds on the Kiln CPU path and matches ONNX
Runtime."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import kiln
import kiln.onnx
from _models import ort_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import vision  # noqa: E402

# torchvision's model cards (num_params of the ImageNet-1k weights)
PARAMS = {"resnet50": 25_557_032, "mobilenet_v3_large": 5_483_032, "vit_b_16": 86_567_656}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_are_torchvisions(name: str) -> None:
    model = vision.MODELS[name]()
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_torchvision_state_dict_loads_and_gives_the_same_outputs(name: str) -> None:
    try:
        import torchvision
    except (ImportError, RuntimeError, OSError) as exc:
        pytest.skip(f"torchvision does not load here: {type(exc).__name__}")
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(weights=None).eval()
    ours = vision.MODELS[name]().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_mobilenet_v3_builds_on_the_cpu_and_matches_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = vision.MobileNetV3Large(num_classes=10).eval()
    with torch.no_grad():            # BatchNorm statistics a trained net would have, so activations keep their scale
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.normal_(0, 0.1)
    path = tmp_path / "mnv3.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(path), input_names=["input"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"input": {0: "b"}})
    engine = kiln.build(kiln.onnx.parse(str(path)), kiln.BuildConfig(device="cpu",
                                                                     profiles={"input": (2, 3, 64, 64)}))
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    ref = ort_run(path, {"input": x})["logits"]
    got = engine.context().run({"input": x})["logits"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 + 1e-4 * float(np.abs(ref).max()))
