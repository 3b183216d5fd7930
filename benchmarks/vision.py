"""ResNet-50, MobileNetV3-Large and ViT-B/16 as torchvision defines them, for machines where torchvision does not load.

The zoo takes torchvision's models when torchvision imports; where it cannot (its compiled ops are built for another
torch), these definitions stand in. They follow the published architectures with torchvision's layer names, so a
torchvision state dict loads into them unchanged (``load_state_dict(strict=True)``) and their ONNX exports have the
same layers: ResNet-50 v1.5 (stride on the 3×3 convolution), MobileNetV3-Large (the paper's table, BatchNorm eps
0.001, squeeze-excitation to a multiple of 8 channels, hard-sigmoid gate), ViT-B/16 (16×16 patches, class token,
12 pre-norm encoder blocks with ``nn.MultiheadAttention``, LayerNorm eps 1e-6).
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Callable

import torch
import torch.nn as nn


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: Callable[[], nn.Module] | None = None,
             eps: float = 1e-5) -> nn.Sequential:
    """Conv (no bias, same padding) → BatchNorm → activation: torchvision's Conv2dNormActivation layout."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout, eps=eps, momentum=0.01 if eps != 1e-5 else 0.1)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# ---- ResNet-50 -------------------------------------------------------------------------------

class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            layer = []
            for b in range(blocks):
                layer.append(_Bottleneck(cin, width, stride if b == 0 else 1))
                cin = width * 4
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---- MobileNetV3-Large -----------------------------------------------------------------------

def _divisible(v: float, d: int = 8) -> int:
    """The channel rounding of MobileNet's reference code: nearest multiple of d, never more than 10% below v."""
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


class _SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, k: int, expanded: int, cout: int, se: bool, act: str, stride: int) -> None:
        super().__init__()
        activation = nn.Hardswish if act == "HS" else nn.ReLU
        conv = partial(_conv_bn, eps=0.001)
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(conv(cin, expanded, 1, act=activation))
        layers.append(conv(expanded, expanded, k, stride, groups=expanded, act=activation))
        if se:
            layers.append(_SqueezeExcitation(expanded, _divisible(expanded // 4)))
        layers.append(conv(expanded, cout, 1))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res_connect else y


# (input channels, kernel, expanded channels, output channels, squeeze-excitation, activation, stride)
_MOBILENET_V3_LARGE = [
    (16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1), (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1), (160, 5, 960, 160, True, "HS", 1),
]


class MobileNetV3Large(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 16, 3, 2, act=nn.Hardswish, eps=0.001)]
        layers += [_InvertedResidual(*row) for row in _MOBILENET_V3_LARGE]
        layers.append(_conv_bn(160, 960, 1, act=nn.Hardswish, eps=0.001))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(960, 1280), nn.Hardswish(inplace=True), nn.Dropout(0.2, inplace=True),
                                        nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---- ViT-B/16 --------------------------------------------------------------------------------

class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + self.dropout(y)
        return x + self.mlp(self.ln_2(x))


class _Encoder(nn.Module):
    def __init__(self, tokens: int, dim: int, depth: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, tokens, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(OrderedDict((f"encoder_layer_{i}", _EncoderBlock(dim, heads, mlp))
                                                for i in range(depth)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class ViTB16(nn.Module):
    def __init__(self, image: int = 224, num_classes: int = 1000, dim: int = 768, depth: int = 12, heads: int = 12,
                 mlp: int = 3072) -> None:
        super().__init__()
        self.patch, self.dim = 16, dim
        self.conv_proj = nn.Conv2d(3, dim, 16, 16)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = _Encoder((image // 16) ** 2 + 1, dim, depth, heads, mlp)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, num_classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


MODELS: dict[str, Callable[[], nn.Module]] = {"resnet50": ResNet50, "mobilenet_v3_large": MobileNetV3Large,
                                              "vit_b_16": ViTB16}


def torchvision_or_own(name: str) -> tuple[nn.Module, str]:
    """torchvision's model when torchvision loads, else the definition here; and which one it is."""
    try:
        import torchvision
    except (ImportError, RuntimeError, OSError):
        return MODELS[name](), "benchmarks/vision.py"
    return getattr(torchvision.models, name)(weights=None), "torchvision"
