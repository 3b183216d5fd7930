"""Projection shortcuts (passes/fuse_projection.py, kernels/conv_sum.py, and the chain that a sum can
lead): the kernel against torch through Triton's interpreter (compiled on a GPU), the pass on
ResNet-style first blocks against ONNX Runtime."""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import kiln  # noqa: E402
from kiln.errors import BuildError  # noqa: E402
from kiln.kernels.conv_chain import ChainConfig, conv_chain  # noqa: E402
from kiln.kernels.conv_sum import arrange, conv_sum  # noqa: E402
from kiln.kernels.conv_triton import ConvConfig, default_config, wide_config  # noqa: E402
from kiln.kernels.registry import KernelContext, get_tactic  # noqa: E402

from _models import onnx_bytes  # noqa: E402

# CPU builds here make the GPU fusion (Pass.devices) too: its rule, its reference tactic, the engine file
pytestmark = pytest.mark.usefixtures("gpu_fusions")

CL = torch.channels_last
TINY = ConvConfig(16, 16, 16, 4, 2)


def _operands(n, size, c1, size2, c2, cout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, c1, size, size, generator=g).to(DEV, torch.float16).contiguous(memory_format=CL)
    x2 = torch.randn(n, c2, size2, size2, generator=g).to(DEV, torch.float16)
    w1 = (torch.randn(cout, c1, 1, 1, generator=g) / c1 ** 0.5).to(DEV, torch.float16)
    w2 = (torch.randn(cout, c2, 1, 1, generator=g) / c2 ** 0.5).to(DEV, torch.float16)
    b = torch.randn(cout, generator=g).to(DEV, torch.float16)
    return x1, w1, x2, w2, b


def _ref(x1, w1, x2, w2, b, s1, s2, act):
    y = F.conv2d(x1.float(), w1.float(), b.float(), s1) + F.conv2d(x2.float(), w2.float(), None, s2)
    return {"relu": F.relu, "silu": F.silu, "none": lambda t: t}[act](y)


def _rel(a, b) -> float:
    return float((a.float() - b).norm() / b.norm())


@pytest.mark.parametrize("act", ["relu", "silu", "none"])
@pytest.mark.parametrize("case", [
    (2, 5, 16, 9, 32, 48, 1, 2),      # projection strided, odd map (its last row and column unread)
    (1, 6, 32, 6, 16, 64, 1, 1),      # stage-1 style: both unstrided
    (2, 3, 48, 3, 16, 32, 2, 1),      # the strided operand first
])
def test_kernel_matches_torch(case, act):
    n, size, c1, size2, c2, cout, s1, s2 = case
    if s1 == 2:
        size = 2 * size - 1
    x1, w1, x2, w2, b = _operands(n, size, c1, size2, c2, cout)
    y = conv_sum(x1, arrange(w1), x2, arrange(w2), b, (s1, s1), (s2, s2), act, config=TINY)
    ref = _ref(x1, w1, x2, w2, b, s1, s2, act)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=CL)
    assert _rel(y, ref) < 2e-3


def test_kernel_writes_into_a_channel_slice():
    x1, w1, x2, w2, b = _operands(1, 4, 16, 8, 16, 32, seed=1)
    buf = torch.zeros(1, 4, 4, 48, dtype=torch.float16, device=DEV)
    view = buf[..., 8:40].permute(0, 3, 1, 2)
    y = conv_sum(x1, arrange(w1), x2, arrange(w2), b, (1, 1), (2, 2), "relu", config=TINY,
                 out=lambda shape, dtype, device: view)
    assert y.data_ptr() == view.data_ptr()
    assert _rel(buf[..., 8:40].permute(0, 3, 1, 2), _ref(x1, w1, x2, w2, b, 1, 2, "relu")) < 2e-3
    assert not buf[..., :8].any() and not buf[..., 40:].any()


def test_kernel_refuses_what_it_cannot_run():
    x1, w1, x2, w2, b = _operands(1, 4, 16, 8, 16, 32)
    with pytest.raises(BuildError, match="shapes disagree"):       # stride 1 on an 8×8 map is no 4×4 output
        conv_sum(x1, arrange(w1), x2, arrange(w2), b, (1, 1), (1, 1))
    x3 = torch.zeros(1, 24, 4, 4, dtype=torch.float16, device=DEV)
    w3 = torch.zeros(32, 24, 1, 1, dtype=torch.float16, device=DEV)
    with pytest.raises(BuildError, match="multiples of 16"):
        conv_sum(x1, arrange(w1), x3, arrange(w3), b)


@pytest.mark.parametrize("name", ["torch", "triton_sum", "triton_sum_wide"])
def test_tactics_agree(name):
    if DEV == "cpu" and name == "torch":
        x1, w1, x2, w2, b = (t.float() for t in _operands(2, 4, 16, 7, 32, 32, seed=2))
    else:
        x1, w1, x2, w2, b = _operands(2, 4, 16, 7, 32, 32, seed=2)
    attrs = {"stride1": [1, 1], "stride2": [2, 2], "activation": "relu"}
    prec = "fp32" if x1.dtype == torch.float32 else "fp16"
    (y,) = get_tactic("Conv1x1Sum", name).make(attrs, KernelContext(device=DEV, precision=prec))(x1, w1, x2, w2, b)
    torch.testing.assert_close(y.float(), _ref(x1, w1, x2, w2, b, 1, 2, "relu"), rtol=3e-3, atol=3e-3)


def test_chain_with_a_projection_operand_matches_torch():
    x1, w3, x2, w2, b3 = _operands(2, 4, 16, 8, 32, 64, seed=3)
    g = torch.Generator().manual_seed(4)
    w1 = (torch.randn(16, 64, 1, 1, generator=g) / 8).to(DEV, torch.float16)
    b1 = torch.randn(16, generator=g).to(DEV, torch.float16)
    for cfg in (ChainConfig(16, 16, 4, 2), None):
        y, z = conv_chain(x1, arrange(w3), b3, None, arrange(w1), b1, "relu", "relu", cfg, x2=x2, w2t=arrange(w2),
                          stride2=(2, 2))
        yr = _ref(x1, w3, x2, w2, b3, 1, 2, "relu")
        zr = F.relu(F.conv2d(yr.half().float(), w1.float(), b1.float()))
        assert _rel(y, yr) < 2e-3 and _rel(z, zr) < 2e-3


class _FirstBlock(torch.nn.Module):
    """A ResNet stage's first bottleneck and one more: 1×1 reduce, 3×3 (stride s), 1×1 expand, plus a
    1×1 projection shortcut of the block input (stride s), BN everywhere; ``proj_first`` adds the
    shortcut first (the other operand order of the exported Add)."""

    def __init__(self, c_in=32, c=64, c4=16, s=2, proj_first=False, proj_act=False, tap=False, clip=False):
        super().__init__()

        def cbn(i, o, k, st=1):
            return torch.nn.Sequential(torch.nn.Conv2d(i, o, k, st, padding=k // 2, bias=False),
                                       torch.nn.BatchNorm2d(o))
        self.a, self.b, self.c = cbn(c_in, c4, 1), cbn(c4, c4, 3, s), cbn(c4, c, 1)
        self.proj = cbn(c_in, c, 1, s)
        self.d, self.e, self.f = cbn(c, c4, 1), cbn(c4, c4, 3), cbn(c4, c, 1)
        self.proj_first, self.proj_act, self.tap, self.clip = proj_first, proj_act, tap, clip
        for m in self.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.1)

    def forward(self, x):
        out = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        p = self.proj(x)
        if self.proj_act:
            p = torch.relu(p)
        y = p + out if self.proj_first else out + p
        y = torch.clamp(y, -0.25, 0.5) if self.clip else torch.relu(y)
        z = torch.relu(y + self.f(torch.relu(self.e(torch.relu(self.d(y))))))
        return (z, p) if self.tap else z


def _build(model, shape, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(*shape)
    data = onnx_bytes(model, x)
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))
    return engine, data, x.numpy()


def _matches_onnxruntime(engine, data, x):
    got = engine.context().run({"x": x})
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for g, r in zip(got.values(), ref):
        np.testing.assert_allclose(g, r, rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("proj_first", [False, True])
@pytest.mark.parametrize("s, c_in", [(2, 32), (1, 16)])
def test_pass_fuses_the_projection_and_matches_onnxruntime(s, c_in, proj_first):
    """Stride 2 with 16 + 32 input channels, and stride 1 (ResNet's stage 1): the expansion and the
    projection become a sum, which leads a chain into the next block's reduction (48 or 32 resident
    channels); no convolution is left for the projection."""
    torch.manual_seed(5)
    engine, data, x = _build(_FirstBlock(c_in=c_in, s=s, proj_first=proj_first), (2, c_in, 10, 10))
    kinds = [layer["kind"] for layer in engine.layers]
    assert kinds.count("Conv1x1Chain") == 1 and "Conv1x1Sum" not in kinds
    lead = next(layer for layer in engine.layers if layer["kind"] == "Conv1x1Chain")
    assert lead["inputs"][3] is None and "x" in (lead["inputs"][0], lead["inputs"][6])
    assert lead["attrs"]["stride2"] == [s, s] and (s == 1 or lead["inputs"][6] == "x")   # the strided one second
    assert kinds.count("Convolution") == 4      # a, b, e, f: the projection and d are in the chain
    _matches_onnxruntime(engine, data, x)


def test_activation_parameters_carry_over():
    """The holder's fused activation moves to the sum with its parameters (a Clip's bounds)."""
    torch.manual_seed(9)
    engine, data, x = _build(_FirstBlock(clip=True), (1, 32, 8, 8))
    (fused,) = [layer for layer in engine.layers if layer["kind"] == "Conv1x1Sum"]
    assert (fused["attrs"]["activation"], fused["attrs"]["alpha"], fused["attrs"]["beta"]) == ("clip", -0.25, 0.5)
    assert not any(layer["kind"] == "Activation" for layer in engine.layers)
    _matches_onnxruntime(engine, data, x)


def test_wide_projection_stays_a_sum_before_the_next_reduction():
    """ResNet-50's stage 2 has 128 + 256 input channels: the sum does not lead a chain (it ran slower)."""
    torch.manual_seed(6)
    engine, data, x = _build(_FirstBlock(c_in=256, c=128, c4=128), (1, 256, 6, 6))
    kinds = [layer["kind"] for layer in engine.layers]
    assert kinds.count("Conv1x1Sum") == 1
    _matches_onnxruntime(engine, data, x)


@pytest.mark.parametrize("variant", ["proj_act", "tap"])
def test_pass_leaves_projections_it_cannot_absorb(variant):
    """A projection with its own activation, or one whose output is also a network output, stays a
    convolution of its own."""
    torch.manual_seed(7)
    engine, data, x = _build(_FirstBlock(**{variant: True}), (1, 32, 8, 8))
    kinds = [layer["kind"] for layer in engine.layers]
    assert "Conv1x1Sum" not in kinds
    assert not any(layer["kind"] == "Conv1x1Chain" and len(layer["inputs"]) > 6 for layer in engine.layers)
    _matches_onnxruntime(engine, data, x)


def test_engine_file_round_trip(tmp_path):
    torch.manual_seed(8)
    engine, data, x = _build(_FirstBlock(c_in=256, c=128, c4=128), (1, 256, 6, 6))
    path = tmp_path / "block.kiln"
    engine.save(path)
    loaded = kiln.load(path)
    assert [layer["kind"] for layer in loaded.layers].count("Conv1x1Sum") == 1
    _matches_onnxruntime(loaded, data, x)


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [(56, 64, 56, 64, 1, 256), (28, 128, 56, 256, 2, 512), (7, 512, 14, 1024, 2, 2048)])
def test_gpu_resnet_stage_shapes(stage):
    size, c1, size2, c2, s, cout = stage
    x1, w1, x2, w2, b = _operands(4, size, c1, size2, c2, cout)
    for cfg in (default_config, wide_config):
        y = conv_sum(x1, arrange(w1), x2, arrange(w2), b, (1, 1), (s, s), "relu", config=cfg)
        assert _rel(y, _ref(x1, w1, x2, w2, b, 1, s, "relu")) < 2e-3
