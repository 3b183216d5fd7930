"""Full-size models for the GPU accuracy run, with random weights, exported to ONNX.

The models the core issue names: torchvision ResNet-50 and MobileNetV3-Large,
ViT-B/16 (torchvision and timm), BERT-base (transformers; TorchScript exports at
opsets 14 and 17, the dynamo exporter at opset 18), YOLOv5l (v6 architecture with
its anchor-head decode, defined here), a YOLOv8-like detector (defined here), a
2-layer bidirectional LSTM and a UNet. Nothing is downloaded: weights are random and
BatchNorm statistics are calibrated on random data, then scaled and shifted (folding them is no no-op).

    python benchmarks/zoo.py --list
    python benchmarks/zoo.py --export /tmp/zoo resnet50 yolov5l

``tests/test_zoo.py`` builds each with Kiln on CUDA and compares with ONNX Runtime.
Sizes are parameters, so the same code runs small on a CPU (``small=True``).
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- inputs ---------------------------------------------------------------------------------

@dataclass
class Input:
    """dtype, shape with symbols ("B", "S") for dynamic axes, and how to fill it."""

    dtype: str
    shape: tuple[int | str, ...]
    fill: str = "normal"        # normal | uniform | ids:<vocab> | mask | types

    def resolve(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)

    def make(self, rng: np.random.Generator, sizes: dict[str, int]) -> np.ndarray:
        shape = self.resolve(sizes)
        if self.fill == "uniform":
            return rng.random(shape).astype(self.dtype)
        if self.fill.startswith("ids:"):
            return rng.integers(0, int(self.fill[4:]), shape).astype(self.dtype)
        if self.fill == "mask":                     # trailing padding, at least half the sequence kept
            m = np.ones(shape, self.dtype)
            for i in range(shape[0]):
                m[i, shape[1] - int(rng.integers(0, shape[1] // 2 + 1)):] = 0
            return m
        if self.fill == "types":                    # segment A then segment B
            t = np.zeros(shape, self.dtype)
            t[:, shape[1] // 2:] = 1
            return t
        return rng.standard_normal(shape).astype(self.dtype)


@dataclass
class ZooModel:
    """One model of the zoo: how to make and export it, its inputs, the sizes to test and the profile."""

    name: str
    make: Callable[[], nn.Module]
    inputs: dict[str, Input]
    outputs: list[str]
    opset: int = 17
    dynamo: bool = False
    sizes: dict[str, int] = field(default_factory=lambda: {"B": 2})         # the sizes tests run at
    ranges: dict[str, tuple[int, int, int]] = field(default_factory=lambda: {"B": (1, 2, 8)})
    note: str = ""
    module: nn.Module | None = field(default=None, repr=False)     # set by export()

    def feeds(self, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        s = sizes or self.sizes
        return {n: spec.make(rng, s) for n, spec in self.inputs.items()}

    def profiles(self) -> dict[str, tuple]:
        lo, opt, hi = ({k: v[i] for k, v in self.ranges.items()} for i in range(3))
        return {n: (s.resolve(lo), s.resolve(opt), s.resolve(hi)) for n, s in self.inputs.items()}

    def run_torch(self, feeds: dict[str, np.ndarray], dtype: torch.dtype = torch.float64,
                  device: str = "cpu") -> dict[str, np.ndarray]:
        """The exported module itself in ``dtype`` on ``device`` (after export()): a reference or a peer."""
        import copy
        model = copy.deepcopy(self.module).to(device=device, dtype=dtype)
        args = [torch.from_numpy(a).to(device=device, dtype=dtype if a.dtype.kind == "f" else None)
                for a in feeds.values()]
        with torch.no_grad():
            out = model(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.detach().to("cpu", torch.float64).numpy() for n, o in zip(self.outputs, outs)}

    def export(self, out_dir: Path, dtype: torch.dtype | None = None) -> Path:
        """Write ``out_dir/<name>.onnx`` (external data beside it if the exporter wants that).

        With ``dtype`` (after a first export), the same module is written again with its floating-point
        weights, inputs and arithmetic in that type, as ``<name>.<dtype>.onnx``: an FP64 copy of the model
        checks Kiln's semantics without FP32 rounding in the way."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if dtype is None:
            path = out_dir / f"{self.name}.onnx"
            torch.manual_seed(0)
            model = self.make()
            calibrate(model, [torch.from_numpy(a) for a in self.feeds(seed=7, sizes={**self.sizes, "B": 4}).values()])
            model.eval()
            self.module = model               # the exported module, for torch references (FP64 truth, FP16 peer)
        else:
            import copy
            path = out_dir / f"{self.name}.{str(dtype).replace('torch.', '')}.onnx"
            model = copy.deepcopy(self.module).to(dtype)
        example = tuple(torch.from_numpy(a.astype(np.float64) if dtype == torch.float64 and a.dtype.kind == "f" else a)
                        for a in self.feeds(seed=123).values())
        names = list(self.inputs)
        symbols = {"B": "batch", "S": "sequence"}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.dynamo:
                dyn = {n: {i: torch.export.Dim.DYNAMIC for i, d in enumerate(s.shape) if isinstance(d, str)}
                       for n, s in self.inputs.items()}
                torch.onnx.export(model, example, str(path), input_names=names, output_names=self.outputs,
                                  opset_version=self.opset, dynamo=True, dynamic_shapes=dyn, external_data=False)
            else:
                axes = {n: {i: symbols[d] for i, d in enumerate(s.shape) if isinstance(d, str)}
                        for n, s in self.inputs.items()}
                axes.update({o: {0: "batch"} for o in self.outputs})
                torch.onnx.export(model, example, str(path), input_names=names, output_names=self.outputs,
                                  opset_version=self.opset, dynamo=False, dynamic_axes=axes)
        return path


def calibrate(model: nn.Module, inputs: list[torch.Tensor], steps: int = 2) -> None:
    """Give random weights realistic BatchNorm statistics, as training would: a few train-mode passes on
    random data. Without it activations drift in scale through dozens of layers (no trained network's do),
    and FP16 comparisons measure underflow instead of Kiln. On the GPU when there is one (it is faster)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                      # cumulative average over the passes
    model.to(dev).train()
    with torch.no_grad():
        for _ in range(steps):
            model(*[t.to(dev) for t in inputs])
    model.cpu()
    randomize_affine(model)


def randomize_affine(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm scale and shift (fresh layers have 1 and 0), so folding them changes weights."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            with torch.no_grad():
                m.weight.mul_(0.75 + 0.5 * torch.rand(m.num_features, generator=g))
                m.bias.add_(0.1 * torch.randn(m.num_features, generator=g))


# ---- YOLO blocks (also the test models' in tests/_models.py) ----------------------------------
# ``bn`` is a block's BatchNorm settings, passed down to every Conv in it: YOLOv5's by default.

YOLO_BN = {"eps": 1e-3, "momentum": 0.03}


class Conv(nn.Module):
    """Conv2d + BatchNorm + activation (SiLU unless given), 'same' padding unless given."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 act: nn.Module | None = None, bn: dict[str, float] = YOLO_BN):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2, **bn)
        self.act = act if act is not None else nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 0.5, k: tuple[int, int] = (1, 3),
                 bn: dict[str, float] = YOLO_BN):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1, self.cv2 = Conv(c1, c_, k[0], bn=bn), Conv(c_, c2, k[1], bn=bn)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """YOLOv5's CSP block: two 1x1 paths, bottlenecks on one, Concat, 1x1."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, bn: dict[str, float] = YOLO_BN):
        super().__init__()
        c_ = c2 // 2
        self.cv1, self.cv2, self.cv3 = Conv(c1, c_, bn=bn), Conv(c1, c_, bn=bn), Conv(2 * c_, c2, bn=bn)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, e=1.0, bn=bn) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C2f(nn.Module):
    """YOLOv8's block: 1x1, chunk in two (Split), bottlenecks appended, Concat, 1x1."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, k: tuple[int, int] = (3, 3),
                 bn: dict[str, float] = YOLO_BN):
        super().__init__()
        self.c = c2 // 2
        self.cv1, self.cv2 = Conv(c1, 2 * self.c, bn=bn), Conv((2 + n) * self.c, c2, bn=bn)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, e=1.0, k=k, bn=bn) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5, bn: dict[str, float] = YOLO_BN):
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2 = Conv(c1, c_, bn=bn), Conv(c_ * 4, c2, bn=bn)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


# ---- YOLOv5 (v6.x architecture) -------------------------------------------------------------

ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))


class AnchorDetect(nn.Module):
    """YOLOv5 v6 Detect in export mode: sigmoid, split, xy=(2s+grid-0.5)·stride, wh=(2s)²·anchor, → [B, N, 5+nc].
    The grids are buffers for ``image`` (valid at that size only), or with ``dynamic`` made from each feature
    map's shape in forward, as YOLOv5's ``export --dynamic`` does (the ONNX holds Range ops over Shape)."""

    def __init__(self, nc: int, ch: tuple[int, ...], strides: tuple[int, ...], image: int,
                 anchors: tuple[tuple[int, ...], ...] = ANCHORS, dynamic: bool = False):
        super().__init__()
        self.nc, self.no, self.na = nc, nc + 5, len(anchors[0]) // 2
        self.dynamic = dynamic
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(len(anchors), self.na, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self.stride = strides
        for i, s in enumerate(strides):
            ny = nx = image // s
            yv, xv = torch.meshgrid(torch.arange(ny, dtype=torch.float32), torch.arange(nx, dtype=torch.float32),
                                    indexing="ij")
            grid = torch.stack((xv, yv), 2).expand(1, self.na, ny, nx, 2) - 0.5
            anchor = torch.tensor(anchors[i], dtype=torch.float32).view(1, self.na, 1, 1, 2).expand(
                1, self.na, ny, nx, 2)
            self.register_buffer(f"grid{i}", grid.contiguous())
            self.register_buffer(f"anchor_grid{i}", anchor.contiguous())

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        z = []
        for i, x in enumerate(xs):
            x = self.m[i](x)
            bs, _, ny, nx = x.shape
            x = x.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            xy, wh, conf = x.sigmoid().split((2, 2, self.nc + 1), 4)
            grid, anchor_grid = self._grid(i, ny, nx) if self.dynamic else (getattr(self, f"grid{i}"),
                                                                             getattr(self, f"anchor_grid{i}"))
            xy = (xy * 2 + grid) * self.stride[i]
            wh = (wh * 2) ** 2 * anchor_grid
            z.append(torch.cat((xy, wh, conf), 4).view(bs, self.na * nx * ny, self.no))
        return torch.cat(z, 1)

    def _grid(self, i: int, ny, nx) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.anchors.device          # the model's device (a grid made on the CPU breaks a CUDA run)
        yv, xv = torch.meshgrid(torch.arange(ny, dtype=torch.float32, device=dev),
                                torch.arange(nx, dtype=torch.float32, device=dev), indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(1, self.na, ny, nx, 2) - 0.5
        return grid, self.anchors[i].view(1, self.na, 1, 1, 2).expand(1, self.na, ny, nx, 2)


class YOLOv5(nn.Module):
    """yolov5{n,s,m,l,x}.yaml of v6.0+: depth/width multiples scale the same graph."""

    def __init__(self, depth: float = 1.0, width: float = 1.0, nc: int = 80, image: int = 640, dynamic: bool = False):
        super().__init__()
        ch = lambda c: max(8, int(math.ceil(c * width / 8) * 8))     # noqa: E731
        n = lambda k: max(round(k * depth), 1)                        # noqa: E731
        self.b0 = Conv(3, ch(64), 6, 2, 2)
        self.b1 = Conv(ch(64), ch(128), 3, 2)
        self.b2 = C3(ch(128), ch(128), n(3))
        self.b3 = Conv(ch(128), ch(256), 3, 2)
        self.b4 = C3(ch(256), ch(256), n(6))
        self.b5 = Conv(ch(256), ch(512), 3, 2)
        self.b6 = C3(ch(512), ch(512), n(9))
        self.b7 = Conv(ch(512), ch(1024), 3, 2)
        self.b8 = C3(ch(1024), ch(1024), n(3))
        self.b9 = SPPF(ch(1024), ch(1024), 5)
        self.h10 = Conv(ch(1024), ch(512), 1, 1)
        self.up = nn.Upsample(None, 2, "nearest")
        self.h13 = C3(ch(1024), ch(512), n(3), False)
        self.h14 = Conv(ch(512), ch(256), 1, 1)
        self.h17 = C3(ch(512), ch(256), n(3), False)
        self.h18 = Conv(ch(256), ch(256), 3, 2)
        self.h20 = C3(ch(512), ch(512), n(3), False)
        self.h21 = Conv(ch(512), ch(512), 3, 2)
        self.h23 = C3(ch(1024), ch(1024), n(3), False)
        self.detect = AnchorDetect(nc, (ch(256), ch(512), ch(1024)), (8, 16, 32), image, dynamic=dynamic)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        h10 = self.h10(p5)
        h14 = self.h14(self.h13(torch.cat((self.up(h10), p4), 1)))
        h17 = self.h17(torch.cat((self.up(h14), p3), 1))
        h20 = self.h20(torch.cat((self.h18(h17), h14), 1))
        h23 = self.h23(torch.cat((self.h21(h20), h10), 1))
        return self.detect([h17, h20, h23])


# ---- YOLOv8-like (anchor-free, DFL) ---------------------------------------------------------

class DFLDetect(nn.Module):
    """YOLOv8 Detect in export mode: box distributions → DFL (softmax · arange) → xywh · stride; sigmoid classes."""

    def __init__(self, nc: int, ch: tuple[int, ...], strides: tuple[int, ...], image: int, reg_max: int = 16):
        super().__init__()
        self.nc, self.reg_max = nc, reg_max
        c2, c3 = max(16, ch[0] // 4, reg_max * 4), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1))
                                 for c in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for c in ch)
        self.dfl = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1)
        points, strides_t = [], []
        for s in strides:
            n = image // s
            sy, sx = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
            points.append(torch.stack((sx, sy), -1).view(-1, 2))
            strides_t.append(torch.full((n * n, 1), float(s)))
        self.register_buffer("anchors", torch.cat(points).t().unsqueeze(0))     # [1, 2, N]
        self.register_buffer("strides", torch.cat(strides_t).t().unsqueeze(0))  # [1, 1, N]

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        b = xs[0].shape[0]
        x = torch.cat([torch.cat((self.cv2[i](x), self.cv3[i](x)), 1).view(b, 4 * self.reg_max + self.nc, -1)
                       for i, x in enumerate(xs)], 2)
        box, cls = x.split((4 * self.reg_max, self.nc), 1)
        a = box.shape[-1]
        dist = self.dfl(box.view(b, 4, self.reg_max, a).transpose(2, 1).softmax(1)).view(b, 4, a)
        lt, rb = dist.chunk(2, 1)
        x1y1, x2y2 = self.anchors - lt, self.anchors + rb
        dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.strides
        return torch.cat((dbox, cls.sigmoid()), 1)


class YOLOv8(nn.Module):
    """yolov8.yaml at a scale (depth, width, max_channels); 'l' is (1.0, 1.0, 512)."""

    def __init__(self, depth: float = 1.0, width: float = 1.0, max_ch: int = 512, nc: int = 80, image: int = 640):
        super().__init__()
        ch = lambda c: int(math.ceil(min(c, max_ch) * width / 8) * 8)     # noqa: E731
        n = lambda k: max(round(k * depth), 1)                             # noqa: E731
        self.b0, self.b1 = Conv(3, ch(64), 3, 2), Conv(ch(64), ch(128), 3, 2)
        self.b2 = C2f(ch(128), ch(128), n(3), True)
        self.b3, self.b4 = Conv(ch(128), ch(256), 3, 2), C2f(ch(256), ch(256), n(6), True)
        self.b5, self.b6 = Conv(ch(256), ch(512), 3, 2), C2f(ch(512), ch(512), n(6), True)
        self.b7, self.b8 = Conv(ch(512), ch(1024), 3, 2), C2f(ch(1024), ch(1024), n(3), True)
        self.b9 = SPPF(ch(1024), ch(1024), 5)
        self.up = nn.Upsample(None, 2, "nearest")
        self.h12 = C2f(ch(1024) + ch(512), ch(512), n(3))
        self.h15 = C2f(ch(512) + ch(256), ch(256), n(3))
        self.h16 = Conv(ch(256), ch(256), 3, 2)
        self.h18 = C2f(ch(256) + ch(512), ch(512), n(3))
        self.h19 = Conv(ch(512), ch(512), 3, 2)
        self.h21 = C2f(ch(512) + ch(1024), ch(1024), n(3))
        self.detect = DFLDetect(nc, (ch(256), ch(512), ch(1024)), (8, 16, 32), image)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        h12 = self.h12(torch.cat((self.up(p5), p4), 1))
        h15 = self.h15(torch.cat((self.up(h12), p3), 1))
        h18 = self.h18(torch.cat((self.h16(h15), h12), 1))
        h21 = self.h21(torch.cat((self.h19(h18), p5), 1))
        return self.detect([h15, h18, h21])


# ---- LSTM and UNet --------------------------------------------------------------------------

class BiLSTM(nn.Module):
    """2-layer bidirectional LSTM encoder with a linear head (a speech/text tagger's shape)."""

    def __init__(self, feat: int = 256, hidden: int = 512, classes: int = 64):
        super().__init__()
        self.lstm = nn.LSTM(feat, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """The classic UNet (Ronneberger et al.) with padded convs: MaxPool down, ConvTranspose up, Concat skips."""

    def __init__(self, cin: int = 3, classes: int = 2, base: int = 64, depth: int = 4):
        super().__init__()
        chs = [base * 2 ** i for i in range(depth + 1)]
        self.inc = _DoubleConv(cin, chs[0])
        self.downs = nn.ModuleList(_DoubleConv(chs[i], chs[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(nn.ConvTranspose2d(chs[i + 1], chs[i], 2, 2) for i in reversed(range(depth)))
        self.decs = nn.ModuleList(_DoubleConv(chs[i + 1], chs[i]) for i in reversed(range(depth)))
        self.out = nn.Conv2d(chs[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        x = skips.pop()
        for up, dec in zip(self.ups, self.decs):
            x = dec(torch.cat([skips.pop(), up(x)], 1))
        return self.out(x)


# ---- models from libraries ------------------------------------------------------------------

def _torchvision(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from vision import torchvision_or_own              # benchmarks/vision.py where torchvision cannot load
        torch.backends.mha.set_fastpath_enabled(False)      # ViT's fused MHA fast path has no ONNX export
        model, _ = torchvision_or_own(name)
        if name.startswith("vit"):
            nn.init.normal_(model.heads.head.weight, std=0.02)     # torchvision zero-initializes the head
        return model
    return make


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm
        return timm.create_model(name, pretrained=False, **kw)
    return make


class _BertOutputs(nn.Module):
    """BertModel returning a plain tuple (last_hidden_state, pooler_output) for the exporters."""

    def __init__(self, small: bool):
        super().__init__()
        from transformers import BertConfig, BertModel
        cfg = BertConfig() if not small else BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                        intermediate_size=128, vocab_size=1000)
        self.bert = BertModel(cfg, add_pooling_layer=True)

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        return_dict=True)
        return out.last_hidden_state, out.pooler_output


def _bert(opset: int, dynamo: bool, small: bool = False) -> ZooModel:
    vocab = 1000 if small else 30522
    return ZooModel(
        f"bert_base_opset{opset}{'_dynamo' if dynamo else ''}", lambda: _BertOutputs(small),
        {"input_ids": Input("int64", ("B", "S"), f"ids:{vocab}"), "attention_mask": Input("int64", ("B", "S"), "mask"),
         "token_type_ids": Input("int64", ("B", "S"), "types")},
        ["last_hidden_state", "pooler_output"], opset=opset, dynamo=dynamo,
        sizes={"B": 2, "S": 128 if not small else 16},
        ranges={"B": (1, 2, 8), "S": (8, 128, 256) if not small else (4, 16, 32)},
        note="transformers BertModel(BertConfig()), random weights")


def zoo(small: bool = False) -> dict[str, ZooModel]:
    """Every zoo model by name; ``small`` shrinks the self-defined ones (and BERT) for CPU smoke runs."""
    img = 64 if small else 224
    det = 64 if small else 640
    image = lambda n: {"input": Input("float32", ("B", 3, n, n))}      # noqa: E731
    models = [
        ZooModel("resnet50", _torchvision("resnet50"), image(img), ["logits"]),
        ZooModel("mobilenet_v3_large", _torchvision("mobilenet_v3_large"), image(img), ["logits"]),
        ZooModel("vit_b_16_torchvision", _torchvision("vit_b_16"), image(224), ["logits"]),
        ZooModel("vit_base_patch16_224_timm", _timm("vit_base_patch16_224"), image(224), ["logits"]),
        _bert(14, False, small), _bert(17, False, small), _bert(18, True, small),
        ZooModel("yolov5l", lambda: YOLOv5(0.33 if small else 1.0, 0.25 if small else 1.0, image=det),
                 {"images": Input("float32", ("B", 3, det, det), "uniform")}, ["output0"], opset=12,
                 note="YOLOv5 v6 architecture, anchor decode in the graph (ultralytics export at opset 12)"),
        ZooModel("yolov8l_like", lambda: YOLOv8(0.33 if small else 1.0, 0.25 if small else 1.0, image=det),
                 {"images": Input("float32", ("B", 3, det, det), "uniform")}, ["output0"], opset=17,
                 note="YOLOv8 architecture at scale l, DFL box decode in the graph"),
        ZooModel("lstm_2x_bidirectional", lambda: BiLSTM(32, 48, 8) if small else BiLSTM(),
                 {"features": Input("float32", ("B", 16 if small else 100, 32 if small else 256))}, ["logits"],
                 sizes={"B": 4}),
        ZooModel("unet", lambda: UNet(base=8 if small else 64),
                 {"image": Input("float32", ("B", 3, 64 if small else 256, 64 if small else 256))}, ["mask"]),
    ]
    return {m.name: m for m in models}


LIBRARY_MODELS = {"resnet50": "torchvision", "mobilenet_v3_large": "torchvision", "vit_b_16_torchvision": "torchvision",
                  "vit_base_patch16_224_timm": "timm", "bert_base_opset14": "transformers",
                  "bert_base_opset17": "transformers", "bert_base_opset18_dynamo": "transformers"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="models to export (default: all)")
    ap.add_argument("--list", action="store_true", help="list the models and exit")
    ap.add_argument("--export", metavar="DIR", help="export the models to DIR")
    ap.add_argument("--small", action="store_true", help="small sizes of the self-defined models (CPU smoke runs)")
    args = ap.parse_args()
    models = zoo(args.small)
    if args.list or not args.export:
        for m in models.values():
            print(f"{m.name:28s} opset {m.opset:2d} {'dynamo' if m.dynamo else 'torchscript':11s} {m.note}")
        return
    for name in args.names or list(models):
        t0 = time.perf_counter()
        path = models[name].export(Path(args.export))
        print(f"{name}: {path} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
