"""PyTorch .pt2 archives written by torch.export.save."""
from __future__ import annotations

import pytest

from kiln.viewer.formats import open_model

from .conftest import check_damaged, check_detect, check_export, edges, input_weight

torch = pytest.importorskip("torch")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3)
        self.fc = torch.nn.Linear(2, 4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(54, dtype=torch.float32).reshape(2, 3, 3, 3))

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.mean((2, 3)))


@pytest.fixture(scope="module")
def pt2(tmp_path_factory):
    p = tmp_path_factory.mktemp("pt2") / "net.pt2"
    torch.export.save(torch.export.export(Net().eval(), (torch.randn(1, 3, 8, 8),)), str(p))
    return p


def test_exported_program(pt2):
    model = open_model(pt2)
    g = model.graph
    assert model.format == "PyTorch export"
    assert [n.op_type for n in g.nodes] == ["aten::conv2d", "aten::relu", "aten::mean", "aten::linear"]
    names = [n.name for n in g.nodes]
    assert edges(g) == {(names[0], names[1]), (names[1], names[2]), (names[2], names[3])}
    conv = g.nodes[0]
    assert conv.group == ("conv",) and conv.category == "conv"
    w = input_weight(g, conv, "weight")
    assert w.name == "conv.weight" and w.shape == [2, 3, 3, 3] and w.dtype == "float32"
    assert w.load()[1, 2, 2, 2] == 53
    assert g.nodes[2].attributes["dim"] == [2, 3]
    assert [t.name for t in g.inputs] == ["x"] and g.inputs[0].shape == [1, 3, 8, 8]
    assert g.nodes[3].category == "matmul"


def test_detect_damage_export(pt2, tmp_path):
    check_detect(pt2, tmp_path, "PyTorch export", ".keras")
    check_damaged(pt2, tmp_path, magic_len=4)
    check_export(open_model(pt2), tmp_path)


def test_archive_is_opened_once(pt2, monkeypatch):
    """The zip that sniff opened is the one read() uses: the central directory is parsed once."""
    import zipfile

    opened = []
    real = zipfile.ZipFile.__init__

    def counting(self, *a, **k):
        opened.append(a[0] if a else k.get("file"))
        real(self, *a, **k)
    monkeypatch.setattr(zipfile.ZipFile, "__init__", counting)
    model = open_model(pt2)
    assert len(opened) == 1 and [n.op_type for n in model.graph.nodes][0] == "aten::conv2d"
