"""The fused 1×1 chain (kernels/conv_chain.py, passes/fuse_conv_chain.py): kernel against torch through
Triton's interpreter (compiled on a GPU), the pass on ResNet-style blocks against ONNX Runtime."""
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
from kiln.kernels.registry import KernelContext, get_tactic  # noqa: E402

from _models import onnx_bytes  # noqa: E402

# CPU builds here make the GPU fusion (Pass.devices) too: its rule, its reference tactic, the engine file
pytestmark = pytest.mark.usefixtures("gpu_fusions")

CL = torch.channels_last


def _tensors(n, h, w, c4, c, cn, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c4, h, w, generator=g).to(DEV, torch.float16).contiguous(memory_format=CL)
    r = torch.randn(n, c, h, w, generator=g).to(DEV, torch.float16)
    w3 = (torch.randn(c, c4, 1, 1, generator=g) / c4 ** 0.5).to(DEV, torch.float16)
    w1 = (torch.randn(cn, c, 1, 1, generator=g) / c ** 0.5).to(DEV, torch.float16)
    b3 = torch.randn(c, generator=g).to(DEV, torch.float16)
    b1 = torch.randn(cn, generator=g).to(DEV, torch.float16)
    return x, w3, b3, r, w1, b1


def _ref(x, w3, b3, r, w1, b1, act2=True):
    y = F.relu(F.conv2d(x.float(), w3.float(), b3.float()) + r.float())
    z = F.conv2d(y.half().float(), w1.float(), b1.float())     # the second product reads y rounded
    return y, F.relu(z) if act2 else z


@pytest.mark.parametrize("config", [ChainConfig(16, 16, 4, 2), None], ids=["tiny_tiles", "default"])
@pytest.mark.parametrize("shape", [(2, 5, 6, 16, 64, 32), (1, 3, 7, 32, 128, 64)])
def test_kernel_matches_torch(shape, config):
    x, w3, b3, r, w1, b1 = _tensors(*shape)
    y, z = conv_chain(x, w3[:, :, 0, 0].t().contiguous(), b3, r, w1[:, :, 0, 0].t().contiguous(), b1, "relu",
                      "relu", config)
    yr, zr = _ref(x, w3, b3, r, w1, b1)
    assert y.is_contiguous(memory_format=CL) and z.is_contiguous(memory_format=CL)
    assert float((y.float() - yr).norm() / yr.norm()) < 2e-3
    assert float((z.float() - zr).norm() / zr.norm()) < 2e-3


@pytest.mark.parametrize("act2", ["relu", None])
@pytest.mark.parametrize("name", ["torch", "triton_chain", "split_igemm", "split_igemm_cudnn"])
def test_tactics_agree(name, act2):
    if DEV == "cpu" and name in ("torch", "split_igemm_cudnn"):
        pytest.skip("FP16 and cuDNN convolutions: the torch tactic is checked in FP32 on the CPU below")
    x, w3, b3, r, w1, b1 = _tensors(2, 4, 4, 16, 32, 16, seed=2)
    attrs = {"activation": "relu", "activation2": act2}
    if name == "split_igemm_cudnn" and act2 is None:
        with pytest.raises(BuildError, match="ReLU only"):
            get_tactic("Conv1x1Chain", name).make(attrs, KernelContext(device=DEV, precision="fp16"))(
                x, w3, b3, r, w1, b1)
        return
    y, z = get_tactic("Conv1x1Chain", name).make(attrs, KernelContext(device=DEV, precision="fp16"))(
        x, w3, b3, r, w1, b1)
    yr, zr = _ref(x, w3, b3, r, w1, b1, act2=act2 is not None)
    torch.testing.assert_close(y.float(), yr, rtol=3e-3, atol=3e-3)
    torch.testing.assert_close(z.float(), zr, rtol=3e-3, atol=3e-3)


def test_refuses_what_it_cannot_hold():
    x, w3, b3, r, w1, b1 = _tensors(1, 2, 2, 16, 32, 16)
    big = torch.zeros(32, 512, dtype=torch.float16, device=DEV)
    with pytest.raises(BuildError, match="at most 128"):
        conv_chain(x, w3[:, :, 0, 0].t().contiguous(), b3, r, big, torch.zeros(512, dtype=torch.float16, device=DEV))


class _Stage(torch.nn.Module):
    """Three ResNet bottlenecks (1×1 reduce, 3×3, 1×1 expand + shortcut, BN everywhere)."""

    def __init__(self, c=64, c4=16, blocks=3, last=None):
        super().__init__()

        def cbn(i, o, k):
            return torch.nn.Sequential(torch.nn.Conv2d(i, o, k, padding=k // 2, bias=False), torch.nn.BatchNorm2d(o))
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleList([cbn(c, c4, 1), cbn(c4, c4, 3), cbn(c4, c, 1)])
                                          for _ in range(blocks))
        self.last = torch.nn.Conv2d(c, last, 1) if last else None
        for m in self.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        for a, b, c in self.blocks:
            x = torch.relu(x + c(torch.relu(b(torch.relu(a(x))))))
        return self.last(x) if self.last is not None else x


class _Projection(torch.nn.Module):
    """ResNet's first block of a stage (3×3 stride 2, strided 1×1 projection shortcut, torchvision's
    order: the projection after the expansion), then one more block."""

    def __init__(self, c_in=32, c=64, c4=16):
        super().__init__()

        def cbn(i, o, k, s=1):
            return torch.nn.Sequential(torch.nn.Conv2d(i, o, k, s, padding=k // 2, bias=False),
                                       torch.nn.BatchNorm2d(o))
        self.a, self.b, self.c = cbn(c_in, c4, 1), cbn(c4, c4, 3, 2), cbn(c4, c, 1)
        self.proj = cbn(c_in, c, 1, 2)
        self.d, self.e, self.f = cbn(c, c4, 1), cbn(c4, c4, 3), cbn(c4, c, 1)

    def forward(self, x):
        out = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        y = torch.relu(out + self.proj(x))
        return torch.relu(y + self.f(torch.relu(self.e(torch.relu(self.d(y))))))


def _onnx(model, shape):
    x = torch.randn(*shape)
    return onnx_bytes(model, x), x.numpy()


def test_pass_fuses_resnet_blocks_and_matches_onnxruntime():
    torch.manual_seed(0)
    data, x = _onnx(_Stage(last=32), (2, 64, 9, 9))
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))
    chains = [layer for layer in engine.layers if layer["kind"] == "Conv1x1Chain"]
    # block1.expand→block2.reduce, block2.expand→block3.reduce, block3.expand→the plain 1×1 head
    assert len(chains) == 3
    assert [c["attrs"]["activation2"] for c in chains] == ["relu", "relu", None]
    assert len(engine.layers) == 1 + 3 + 3      # block 1's reduction, three 3×3s, three chains
    got = list(engine.context().run({"x": x}).values())[0]
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=3e-5, atol=3e-5)


def test_pass_leaves_wide_second_convs_apart():
    torch.manual_seed(1)
    def chains(model, shape):
        data, _ = _onnx(model, shape)
        engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))
        return [layer["kind"] for layer in engine.layers].count("Conv1x1Chain")

    assert chains(_Stage(c=512, c4=128, blocks=2), (1, 512, 3, 3)) == 1     # 128 reduce channels: fused
    assert chains(_Stage(c=1024, c4=256, blocks=2), (1, 1024, 2, 2)) == 0   # 256: the fused kernel loses
    # the head has 512 output channels: only block1→block2 fuses
    assert chains(_Stage(c=64, c4=16, blocks=2, last=512), (1, 64, 3, 3)) == 1
    assert chains(_Stage(c=64, c4=16, blocks=2, last=48), (1, 64, 3, 3)) == 1   # 48: not a power of two


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 56, 56, 64, 256, 64), (8, 28, 28, 128, 512, 128)], ids=["stage1", "stage2"])
def test_gpu_resnet_stages(shape):
    x, w3, b3, r, w1, b1 = _tensors(*shape)
    y, z = conv_chain(x, w3[:, :, 0, 0].t().contiguous(), b3, r, w1[:, :, 0, 0].t().contiguous(), b1)
    yr, zr = _ref(x, w3, b3, r, w1, b1)
    assert float((y.float() - yr).norm() / yr.norm()) < 2e-3
    assert float((z.float() - zr).norm() / zr.norm()) < 2e-3


def test_projection_block_chains_with_its_shortcut_inside():
    """The first block of a stage: expansion + strided projection become one Conv1x1Sum
    (passes/fuse_projection.py), which then leads a chain into the next block's reduction with the
    projection's input as the chain's second operand; no convolution writes the projection."""
    torch.manual_seed(3)
    data, x = _onnx(_Projection(), (2, 32, 10, 10))
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))
    kinds = [layer["kind"] for layer in engine.layers]
    assert kinds.count("Conv1x1Chain") == 1 and "Conv1x1Sum" not in kinds
    chain = next(layer for layer in engine.layers if layer["kind"] == "Conv1x1Chain")
    assert len(chain["inputs"]) == 8 and chain["inputs"][3] is None and chain["inputs"][6] == "x"
    assert chain["attrs"]["stride2"] == [2, 2]
    assert not any(layer["kind"] == "Convolution" and "proj" in layer["name"] for layer in engine.layers)
    got = list(engine.context().run({"x": x}).values())[0]
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=3e-5, atol=3e-5)


def test_engine_file_round_trip_and_inspect(tmp_path):
    """A pooled stem and chains survive save → load (the new layer kind and its attributes), and
    ``kiln inspect`` lists them."""
    import subprocess
    import sys

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 7, 2, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1))
            self.stage = _Stage(last=32)

        def forward(self, x):
            return self.stage(self.stem(x))

    torch.manual_seed(4)
    data, x = _onnx(Net(), (1, 3, 40, 40))
    engine = kiln.build(kiln.onnx.parse(data), kiln.BuildConfig(device="cpu"))
    path = tmp_path / "net.kiln"
    engine.save(path)
    loaded = kiln.load(path)
    kinds = [layer["kind"] for layer in loaded.layers]
    assert kinds.count("Conv1x1Chain") == 3 and any(layer["attrs"].get("pool") for layer in loaded.layers)
    got = list(loaded.context().run({"x": x}).values())[0]
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=3e-5, atol=3e-5)
    out = subprocess.run([sys.executable, "-c", "import sys, kiln.cli; sys.exit(kiln.cli.main(sys.argv[1:]))",
                          "inspect", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Conv1x1Chain" in out.stdout
