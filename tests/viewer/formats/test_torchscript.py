"""TorchScript archives (torch.jit.trace / torch.jit.script) and zip checkpoints, read without unpickling."""
from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest

from kiln.errors import ViewerError
from kiln.viewer.formats import detect, open_model

from .conftest import check_damaged, check_detect, check_export, edges, input_weight

torch = pytest.importorskip("torch")


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10))
        with torch.no_grad():
            self.block.bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))

    def forward(self, x):
        return self.head(self.block(x)) * 2.0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ts")
    torch.manual_seed(0)
    net = Net().eval()
    torch.jit.trace(net, torch.randn(1, 3, 8, 8)).save(str(d / "traced.jit"))
    torch.jit.script(net).save(str(d / "scripted.pt"))
    torch.save({"w": torch.arange(6.0).reshape(2, 3).t(), "h": torch.ones(3, dtype=torch.float16),
                "layer": {"b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16)}}, str(d / "ckpt.pt"))
    return d, net


def _ops(g):
    return [n.op_type for n in g.nodes]


def test_traced_module(files):
    d, net = files
    model = open_model(d / "traced.jit")
    g = model.graph
    assert model.format == "TorchScript" and model.properties["content"] == "TorchScript module"
    assert _ops(g) == ["aten::_convolution", "aten::batch_norm", "aten::relu", "aten::flatten", "aten::linear",
                       "aten::mul"]
    names = [n.name for n in g.nodes]
    assert edges(g) == {(a, b) for a, b in zip(names, names[1:])}
    conv, bn, linear = g.nodes[0], g.nodes[1], g.nodes[4]
    assert conv.group == ("block", "conv") and linear.group == ("head", "1") and conv.category == "conv"
    sd = net.state_dict()
    np.testing.assert_array_equal(input_weight(g, conv, "weight").load(), sd["block.conv.weight"].numpy())
    assert input_weight(g, bn, "running_mean").load().tolist() == [0.5, -1.0, 2.0, 0.0]
    np.testing.assert_array_equal(g.weights["head.1.bias"].load(), sd["head.1.bias"].numpy())
    assert bn.attributes["input7"] == pytest.approx(1e-5)                                # eps, as data
    assert [t.name for t in g.inputs] == ["x"] and len(g.outputs) == 1
    assert g.weights["CONSTANTS.c0"].load().tolist() == 2.0


def test_scripted_module(files):
    d, net = files
    g = open_model(d / "scripted.pt").graph
    ops = _ops(g)
    for op in ("aten::conv2d", "batch_norm", "aten::relu", "aten::flatten", "aten::linear", "aten::mul"):
        assert op in ops
    assert ops.index("aten::conv2d") < ops.index("batch_norm") < ops.index("aten::linear")
    lin = next(n for n in g.nodes if n.op_type == "aten::linear")
    np.testing.assert_array_equal(input_weight(g, lin, "weight").load(), net.state_dict()["head.1.weight"].numpy())


def test_checkpoint_tensors(files):
    d, _ = files
    model = open_model(d / "ckpt.pt")
    w = model.graph.weights
    assert model.properties["content"] == "checkpoint (tensors only)"
    assert w["w"].shape == [3, 2] and w["w"].load().tolist() == [[0, 3], [1, 4], [2, 5]]      # strided view
    assert w["h"].dtype == "float16" and w["h"].load().tolist() == [1, 1, 1]
    assert w["layer.b"].load().tolist() == [1.5, -2.0]                                      # bfloat16 widened


def test_no_pickle_is_executed(tmp_path, monkeypatch):
    """A data.pkl that would call os.system is replayed as data: nothing imported, nothing run."""
    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))   # any callable: the reader must never call it

    def refuse(*a, **k):
        raise AssertionError("the reader unpickled")
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    payload = pickle.dumps({"x": Boom()}, protocol=2)
    p = tmp_path / "evil.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("evil/data.pkl", payload)
        z.writestr("evil/code/__torch__.py", "class X(Module):\n  def forward(self, x):\n    return x\n")
    with pytest.raises(ViewerError) as err:
        open_model(p)
    assert "\n" not in str(err.value) and "evil.pt" in str(err.value)
    inst = tmp_path / "inst.pt"                        # protocol 0 INST: refused, not executed
    with zipfile.ZipFile(inst, "w") as z:
        z.writestr("a/data.pkl", b"(S'ls'\nios\nsystem\n.")
    with pytest.raises(ViewerError, match="INST is not replayed as data"):
        open_model(inst)


def test_detect_damage_export(files, tmp_path):
    d, _ = files
    check_detect(d / "traced.jit", tmp_path, "TorchScript", ".onnx")
    assert detect(d / "ckpt.pt").name == "TorchScript"
    check_damaged(d / "traced.jit", tmp_path, magic_len=4)
    check_export(open_model(d / "traced.jit"), tmp_path)


def test_legacy_checkpoint(tmp_path):
    """torch.save before the zip format: pickles, then raw storages; read as data and equal to torch.load."""
    state = {"conv.weight": torch.arange(24.0).reshape(2, 3, 4).transpose(1, 2), "bn.num": torch.tensor(7),
             "h": torch.full((3,), 0.5, dtype=torch.float16)}
    p = tmp_path / "old.pth"
    torch.save(state, str(p), _use_new_zipfile_serialization=False)
    model = open_model(p)
    g = model.graph
    assert model.version == "legacy torch.save" and set(g.weights) == set(state)
    ref = torch.load(str(p), weights_only=True)
    for k, v in ref.items():
        np.testing.assert_array_equal(g.weights[k].load(), v.numpy())
    assert g.weights["conv.weight"].shape == [2, 4, 3]
    check_damaged(p, tmp_path, magic_len=14, cuts=(0.5, 8))


def test_reading_imports_no_torch(files):
    """Opening an archive and loading its weights needs neither torch nor pickle's unpickler."""
    import subprocess
    import sys
    import textwrap

    d, _ = files
    code = textwrap.dedent(f"""
        import pickle, sys
        def refuse(*a, **k):
            raise SystemExit("unpickled")
        pickle.Unpickler = pickle.loads = pickle.load = refuse
        from kiln.viewer.formats import open_model
        for name in ("traced.jit", "scripted.pt", "ckpt.pt"):
            g = open_model({str(d)!r} + "/" + name).graph
            [w.load() for w in g.weights.values() if w.load is not None]
        print("torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr or out.stdout
    assert out.stdout.strip() == "False"
