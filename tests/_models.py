"""Small models for the tests, exported from torch with random weights at test time.

Each builder returns a :class:`ModelCase`: the ONNX file, how to make inputs at a
given batch size, and an optimization profile covering the batch sizes the
tests use. Weights are random (fixed seeds) and BatchNorm running statistics are
randomised too, so folding BN is checked on non-trivial values.
"""
from __future__ import annotations

import io
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from zoo import ANCHORS, C2f, C3, SPPF, AnchorDetect, Conv  # noqa: E402  (the YOLO blocks live there)

OPSET = 17
TORCH_BN = {"eps": 1e-5, "momentum": 0.1}     # BatchNorm2d's defaults (zoo's blocks take YOLOv5's)
BATCHES = (1, 3)              # the two batch sizes every model is checked at
PROFILE_BATCH = (1, 2, 4)     # min, opt, max of the dynamic batch axis


@dataclass
class InputSpec:
    """One input: dtype, shape with symbols ("B" batch, "S" sequence) for dynamic axes, and how to fill it."""

    dtype: str
    shape: tuple[int | str, ...]
    fill: Callable[[np.random.Generator, tuple[int, ...]], np.ndarray] | None = None

    def resolve(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)

    def make(self, rng: np.random.Generator, sizes: dict[str, int]) -> np.ndarray:
        shape = self.resolve(sizes)
        if self.fill is not None:
            return self.fill(rng, shape).astype(self.dtype)
        return rng.standard_normal(shape).astype(self.dtype)


@dataclass
class ModelCase:
    name: str
    path: Path
    inputs: dict[str, InputSpec]
    outputs: list[str] = field(default_factory=list)
    # min/opt/max of each symbol; "B" defaults to PROFILE_BATCH
    ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    defaults: dict[str, int] = field(default_factory=dict)     # sizes of non-batch symbols when not given

    def sizes(self, batch: int, **dims: int) -> dict[str, int]:
        return {**self.defaults, **dims, "B": batch}

    def feeds(self, batch: int, seed: int = 0, **dims: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        sizes = self.sizes(batch, **dims)
        return {n: s.make(rng, sizes) for n, s in self.inputs.items()}

    def profiles(self) -> dict[str, tuple]:
        """One optimization profile covering every symbol's range."""
        ranges = {"B": PROFILE_BATCH, **self.ranges}
        lo, opt, hi = ({k: v[i] for k, v in ranges.items()} for i in range(3))
        return {n: (s.resolve(lo), s.resolve(opt), s.resolve(hi)) for n, s in self.inputs.items()}


# ---- building blocks ------------------------------------------------------------------------

def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics (eval-mode BN is then non-trivial)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return module


def export(model: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
           dynamic_axes: dict[str, dict[int, str]], opset: int = OPSET, keep_bn: bool = True) -> Path:
    """TorchScript-based export (dynamo=False) at a fixed opset with the given dynamic axes.

    ``keep_bn`` exports eval-mode BatchNorm as BatchNormalization nodes (TrainingMode.PRESERVE);
    the default exporter folds BN into the convolutions, leaving Kiln's BN folding nothing to do.
    """
    model.eval()
    training = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")         # tracer chatter about Python-side shape checks
        torch.onnx.export(model, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True,
                          training=training)
    return path


def onnx_bytes(model: nn.Module, x: torch.Tensor, opset: int = 17) -> bytes:
    """One-input model (input "x") exported in memory with the exporter's defaults (eval-mode
    BatchNorm folded), for pass tests that build straight from bytes."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), f, input_names=["x"], opset_version=opset, dynamo=False)
    return f.getvalue()


def _batch_axes(names: list[str]) -> dict[str, dict[int, str]]:
    return {n: {0: "batch"} for n in names}


class ConvBNAct(Conv):
    """Conv2d + BatchNorm (torch's defaults) + activation (SiLU unless given): benchmarks/zoo.py's Conv."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, groups: int = 1, act: nn.Module | None = None):
        super().__init__(cin, cout, k, s, g=groups, act=act, bn=TORCH_BN)


# ---- (a) conv net with BatchNorm ------------------------------------------------------------

class ConvBNNet(nn.Module):
    """Conv+BN+ReLU, grouped conv + BN + ReLU6 (Clip), max/avg pooling, BN after a biased conv, FC head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.c1 = ConvBNAct(3, 16, 3, 2, act=nn.ReLU())
        self.c2 = ConvBNAct(16, 16, 3, 1, groups=4, act=nn.ReLU6())
        self.pool = nn.MaxPool2d(2)
        self.c3 = nn.Conv2d(16, 32, 3, padding=1, bias=True)
        self.bn3 = nn.BatchNorm2d(32)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(32 * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.c2(self.c1(x)))
        y = self.avg(F.relu(self.bn3(self.c3(y))))
        return self.fc(torch.flatten(y, 1))


def conv_bn(tmp: Path) -> ModelCase:
    torch.manual_seed(0)
    m = randomize_bn(ConvBNNet(), 1).eval()
    path = export(m, (torch.randn(2, 3, 16, 16),), tmp / "conv_bn.onnx", ["input"], ["logits"],
                  _batch_axes(["input", "logits"]))
    return ModelCase("conv_bn", path, {"input": InputSpec("float32", ("B", 3, 16, 16))}, ["logits"])


# ---- (b) mini-YOLO-style detector -----------------------------------------------------------

class MiniYOLO(nn.Module):
    """Backbone (Conv/C3/C2f/SPPF) → FPN (Upsample nearest, Concat) → anchor head with decode."""

    def __init__(self, size: int = 64, nc: int = 80, w: int = 8):
        super().__init__()
        self.b0 = ConvBNAct(3, w, 3, 2)                       # /2
        self.b1 = ConvBNAct(w, 2 * w, 3, 2)                   # /4
        self.b2 = C3(2 * w, 2 * w, 1, bn=TORCH_BN)
        self.b3 = ConvBNAct(2 * w, 4 * w, 3, 2)               # /8
        self.b4 = C2f(4 * w, 4 * w, 1, shortcut=True, k=(1, 3), bn=TORCH_BN)
        self.b5 = ConvBNAct(4 * w, 8 * w, 3, 2)               # /16
        self.sppf = SPPF(8 * w, 8 * w, bn=TORCH_BN)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.lat = ConvBNAct(8 * w, 4 * w)
        self.f1 = C3(8 * w, 4 * w, 1, shortcut=False, bn=TORCH_BN)         # /8
        self.down = ConvBNAct(4 * w, 4 * w, 3, 2)
        self.f2 = C3(8 * w, 8 * w, 1, shortcut=False, bn=TORCH_BN)         # /16
        self.detect = AnchorDetect(nc, (4 * w, 8 * w), (8, 16), size, ANCHORS[:2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.sppf(self.b5(p3))
        l4 = self.lat(p4)
        n3 = self.f1(torch.cat([self.up(l4), p3], 1))
        n4 = self.f2(torch.cat([self.down(n3), l4], 1))
        return self.detect([n3, n4])


def mini_yolo(tmp: Path, size: int = 64) -> ModelCase:
    torch.manual_seed(0)
    m = randomize_bn(MiniYOLO(size), 2).eval()
    path = export(m, (torch.rand(2, 3, size, size),), tmp / "mini_yolo.onnx", ["images"], ["output"],
                  _batch_axes(["images", "output"]))
    return ModelCase("mini_yolo", path, {"images": InputSpec("float32", ("B", 3, size, size),
                                                             lambda r, s: r.random(s))}, ["output"])


# ---- (c) mini-BERT --------------------------------------------------------------------------

class BertLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, where_mask: bool):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.act = nn.GELU()                     # approximate="none": exported as Erf
        self.where_mask = where_mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.h, self.dh).permute(0, 2, 1, 3)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dh)
        if self.where_mask:                      # masked_fill → Where
            scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(torch.float32).min)
        else:                                    # additive mask → Sub/Mul/Add
            scores = scores + (1.0 - mask[:, None, None, :].to(scores.dtype)) * -10000.0
        ctx = torch.matmul(torch.softmax(scores, -1), v).permute(0, 2, 1, 3).reshape(b, s, d)
        x = self.ln1(x + self.o(ctx))
        return self.ln2(x + self.ff2(self.act(self.ff1(x))))


class MiniBert(nn.Module):
    def __init__(self, vocab: int = 100, d: int = 32, heads: int = 4, ff: int = 64, layers: int = 2,
                 max_pos: int = 64):
        super().__init__()
        self.word, self.pos, self.tok_type = nn.Embedding(vocab, d), nn.Embedding(max_pos, d), nn.Embedding(2, d)
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(d, heads, ff, where_mask=(i % 2 == 0)) for i in range(layers))
        self.pool = nn.Linear(d, d)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = input_ids.shape[1]
        pos = torch.arange(s, device=input_ids.device).unsqueeze(0)         # Range over the dynamic length
        x = self.word(input_ids) + self.pos(pos) + self.tok_type(torch.zeros_like(input_ids))
        x = self.ln(x)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x, torch.tanh(self.pool(x[:, 0]))


SEQ = 12


def _ids(r: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return r.integers(0, 100, shape)


def _mask(r: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    m = np.ones(shape, np.int64)
    for i in range(shape[0]):
        m[i, shape[1] - int(r.integers(0, shape[1] // 2)):] = 0        # trailing padding, at least half kept
    return m


def mini_bert(tmp: Path) -> ModelCase:
    torch.manual_seed(0)
    m = MiniBert().eval()
    ids = torch.randint(0, 100, (2, SEQ))
    mask = torch.ones(2, SEQ, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "last_hidden_state": {0: "batch", 1: "seq"}, "pooled": {0: "batch"}}
    path = export(m, (ids, mask), tmp / "mini_bert.onnx", ["input_ids", "attention_mask"],
                  ["last_hidden_state", "pooled"], axes)
    return ModelCase("mini_bert", path, {"input_ids": InputSpec("int64", ("B", "S"), _ids),
                                         "attention_mask": InputSpec("int64", ("B", "S"), _mask)},
                     ["last_hidden_state", "pooled"], ranges={"S": (4, SEQ, 16)}, defaults={"S": SEQ})


# ---- (d) LSTM and GRU -----------------------------------------------------------------------

class RNNNet(nn.Module):
    def __init__(self, cell: str = "lstm", feat: int = 8, hidden: int = 12):
        super().__init__()
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(feat, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y)


def rnn(tmp: Path, cell: str = "lstm", seq: int = 7) -> ModelCase:
    torch.manual_seed(0)
    m = RNNNet(cell).eval()
    path = export(m, (torch.randn(2, seq, 8),), tmp / f"{cell}.onnx", ["x"], ["y"], _batch_axes(["x", "y"]))
    return ModelCase(cell, path, {"x": InputSpec("float32", ("B", seq, 8))}, ["y"])


# ---- (e) UNet-style -------------------------------------------------------------------------

class DoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.a, self.b = ConvBNAct(cin, cout, 3, act=nn.ReLU()), ConvBNAct(cout, cout, 3, act=nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class UNet(nn.Module):
    """Encoder (DoubleConv, MaxPool), ConvTranspose upsampling, Concat skips, 1x1 head."""

    def __init__(self, cin: int = 3, classes: int = 2, w: int = 8, depth: int = 3):
        super().__init__()
        chs = [w * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList([DoubleConv(cin, chs[0])] + [DoubleConv(chs[i], chs[i + 1]) for i in range(depth)])
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(chs[i + 1], chs[i], 2, 2) for i in reversed(range(depth)))
        self.dec = nn.ModuleList(DoubleConv(2 * chs[i], chs[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(chs[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, blk in enumerate(self.down):
            x = blk(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, dec in zip(self.ups, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], 1))
        return self.head(x)


def unet(tmp: Path, size: int = 32) -> ModelCase:
    torch.manual_seed(0)
    m = randomize_bn(UNet(), 3).eval()
    path = export(m, (torch.randn(2, 3, size, size),), tmp / "unet.onnx", ["image"], ["mask"],
                  _batch_axes(["image", "mask"]))
    return ModelCase("unet", path, {"image": InputSpec("float32", ("B", 3, size, size))}, ["mask"])


# ---- ViT-tiny-like --------------------------------------------------------------------------

class ViTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.h = heads
        self.n1, self.n2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.n1(x)).reshape(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * (d // self.h) ** -0.5
        y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(y)
        return x + self.mlp(self.n2(x))


class ViTTiny(nn.Module):
    def __init__(self, size: int = 32, patch: int = 8, d: int = 32, depth: int = 2, heads: int = 4,
                 classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, patch)
        n = (size // patch) ** 2
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        self.blocks = nn.Sequential(*(ViTBlock(d, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(tmp: Path) -> ModelCase:
    torch.manual_seed(0)
    m = ViTTiny().eval()
    path = export(m, (torch.randn(2, 3, 32, 32),), tmp / "vit_tiny.onnx", ["pixels"], ["logits"],
                  _batch_axes(["pixels", "logits"]))
    return ModelCase("vit_tiny", path, {"pixels": InputSpec("float32", ("B", 3, 32, 32))}, ["logits"])


# ---- MobileNetV3-like -----------------------------------------------------------------------

class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, exp: int, cout: int, k: int, s: int, se: bool, hs: bool):
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        self.expand = ConvBNAct(cin, exp, 1, act=act()) if exp != cin else nn.Identity()
        self.dw = ConvBNAct(exp, exp, k, s, groups=exp, act=act())
        self.se = SqueezeExcite(exp) if se else nn.Identity()
        self.project = ConvBNAct(exp, cout, 1, act=nn.Identity())
        self.res = s == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.res else y


class MobileNetV3Small(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = ConvBNAct(3, 16, 3, 2, act=nn.Hardswish())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 16, 3, 2, True, False),
            InvertedResidual(16, 48, 24, 3, 2, False, False),
            InvertedResidual(24, 72, 24, 5, 1, True, True),
            InvertedResidual(24, 96, 40, 5, 2, True, True))
        self.last = ConvBNAct(40, 96, 1, act=nn.Hardswish())
        self.head = nn.Sequential(nn.Linear(96, 64), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.blocks(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def mobilenet_v3(tmp: Path) -> ModelCase:
    torch.manual_seed(0)
    m = randomize_bn(MobileNetV3Small(), 4).eval()
    path = export(m, (torch.randn(2, 3, 32, 32),), tmp / "mobilenet_v3.onnx", ["input"], ["logits"],
                  _batch_axes(["input", "logits"]))
    return ModelCase("mobilenet_v3", path, {"input": InputSpec("float32", ("B", 3, 32, 32))}, ["logits"])


BUILDERS: dict[str, Callable[[Path], ModelCase]] = {
    "conv_bn": conv_bn,
    "mini_yolo": mini_yolo,
    "mini_bert": mini_bert,
    "lstm": lambda tmp: rnn(tmp, "lstm"),
    "gru": lambda tmp: rnn(tmp, "gru"),
    "unet": unet,
    "vit_tiny": vit_tiny,
    "mobilenet_v3": mobilenet_v3,
}


# ---- references -----------------------------------------------------------------------------

def ort_run(path: Path | str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ONNX Runtime on CPU, with graph optimizations off so the reference is the plain graph."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))


def assert_close_fp32(got: np.ndarray, ref: np.ndarray, what: str = "", rtol: float = 1e-4,
                      atol: float = 1e-5) -> None:
    """float32 agreement: rtol elementwise, atol scaled by the output's magnitude (sums of many terms)."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != reference {ref.dtype}"
    assert np.isfinite(ref).all(), f"{what}: reference has non-finite values"
    scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol * scale, err_msg=what)


def corpus_model(model_id: str):
    """(tests/corpus's corpus_lib module, the manifest entry, the model file) of a real-model corpus model; skips
    the calling test where the model is not fetched or does not match its checksum."""
    import pytest
    sys.path.insert(0, str(Path(__file__).parent / "corpus"))
    try:
        import corpus_lib as cl
    finally:
        sys.path.pop(0)
    model = cl.load_manifest().model(model_id)
    path = cl.model_path(cl.corpus_dir(), model)
    if cl.model_problem(cl.corpus_dir(), model):
        pytest.skip(f"corpus model {path} not fetched (scripts/fetch_corpus.py)")
    return cl, model, path
