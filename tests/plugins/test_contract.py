"""The plugin contract as the built-ins use it: registry keys, typed fields, records, imports."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kiln.errors import PluginError
from kiln.plugins import Plugin, PluginRegistry, TensorDesc, field, registry
from kiln.plugins.builtin.deform_conv import ModulatedDeformConv2d
from kiln.plugins.builtin.grid_sample import AffineGrid, GridSample
from kiln.plugins.builtin.nms import EfficientNMS, NonMaxSuppression
from kiln.plugins.builtin.roi_align import RoiAlign

BUILTINS = [RoiAlign, GridSample, AffineGrid, EfficientNMS, NonMaxSuppression, ModulatedDeformConv2d]


class _Scale(Plugin):
    name, namespace, version = "Scale", "test", "1"
    factor = field(float, doc="required: no default")
    axis = field(int, 1)

    def output_descs(self, inputs):
        return [inputs[0]]


def test_duplicate_registration_is_an_error():
    reg = PluginRegistry()
    reg.register(_Scale)
    reg.register(_Scale)                            # the same class again is harmless

    class Other(_Scale):
        pass
    with pytest.raises(PluginError, match=r"test::Scale v1 is already registered"):
        reg.register(Other)

    class Newer(_Scale):
        version = "2"
    reg.register(Newer)
    assert reg.find("Scale", "test") is Newer and reg.get("Scale", "test", "1") is _Scale


def test_lookup_by_name_namespace_version():
    assert registry.get("RoiAlign", "kiln", "1") is RoiAlign
    assert registry.find("RoiAlign", "kiln") is RoiAlign
    assert registry.find("RoiAlign", "other") is None
    assert registry.find("RoiAlign", "kiln", "2") is None
    with pytest.raises(PluginError, match=r"kiln::RoiAlign v9 is not registered"):
        registry.get("RoiAlign", "kiln", "9")
    listed = {cls for cls, _ in registry.list()}
    assert set(BUILTINS) <= listed


def test_field_errors_name_the_field():
    with pytest.raises(PluginError, match="'output_height' must be int"):
        RoiAlign(output_height="7")
    with pytest.raises(PluginError, match="'mode' must be one of"):
        RoiAlign(mode="mean")
    with pytest.raises(PluginError, match="has no field 'sampling'"):
        RoiAlign(sampling=2)
    with pytest.raises(PluginError, match="'iou_threshold' must be float"):
        EfficientNMS(iou_threshold="0.5")
    with pytest.raises(PluginError, match="needs field 'factor'"):
        _Scale()
    assert EfficientNMS(iou_threshold=1).iou_threshold == 1.0      # ints widen to float fields


@pytest.mark.parametrize("cls", BUILTINS, ids=lambda c: c.name)
def test_builtin_records_round_trip(cls):
    fields = cls.onnx_fields({}, 20)
    plugin = cls(**fields)
    rec = json.loads(json.dumps(plugin.record()))
    again = registry.create(rec)
    assert type(again) is cls and again.field_values() == plugin.field_values()
    assert cls.namespace == "kiln" and "triton" in cls.tactics["cuda"] and cls.tactics["cpu"][0] == "torch"


def test_onnx_fields_feed_the_constructor_for_every_opset():
    for opset in (10, 11, 16, 19, 20):
        for cls in BUILTINS:
            cls(**cls.onnx_fields({}, opset))


def test_output_descs_keep_symbolic_dims():
    f = TensorDesc
    assert RoiAlign(output_height=2, output_width=2).output_descs(
        [f(("N", 8, "H", "W"), "float32"), f(("R", 4), "float32"), f(("R",), "int64")])[0].shape == ("R", 8, 2, 2)
    assert GridSample().output_descs([f(("N", 8, "H", "W"), "float32"),
                                      f(("N", "h", "w", 2), "float32")])[0].shape == ("N", 8, "h", "w")
    assert EfficientNMS(max_output_boxes=9).output_descs(
        [f(("B", "N", 4), "float32"), f(("B", "N", "C"), "float32")])[2].shape == ("B", 9)
    assert NonMaxSuppression().output_descs([f(("B", "N", 4), "float32"),
                                             f(("B", "C", "N"), "float32")])[0].shape == (None, 3)


def test_kiln_imports_and_torch_tactics_work_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kiln, kiln.plugins\n"
        "kiln.plugins.load_builtins()\n"
        "from kiln.plugins.builtin.roi_align import RoiAlign\n"
        "from kiln.errors import PluginError\n"
        "p = RoiAlign(output_height=2, output_width=2)\n"
        "x, r, b = torch.randn(1, 3, 8, 8), torch.tensor([[0., 0., 4., 4.]]), torch.zeros(1, dtype=torch.long)\n"
        "out = torch.empty(1, 3, 2, 2); p.forward([x, r, b], [out], None, 'torch')\n"
        "try:\n    p.forward([x, r, b], [out], None, 'triton')\nexcept PluginError as e:\n    print('OK', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout and "needs the triton package" in proc.stdout


@pytest.mark.gpu
def test_fixed_shape_plugins_replay_in_a_cuda_graph():
    """No allocation or host sync on the GPU path: capture each plugin and replay it."""
    dev = "cuda"
    cases = [
        (RoiAlign(output_height=7, output_width=7, sampling_ratio=2),
         [torch.randn(1, 32, 40, 40, device=dev), torch.rand(50, 4, device=dev) * 30,
          torch.zeros(50, dtype=torch.int64, device=dev)]),
        (GridSample(mode="bilinear"), [torch.randn(2, 8, 16, 16, device=dev), torch.rand(2, 9, 9, 2, device=dev) * 2 - 1]),
        (AffineGrid(size=[2, 8, 9, 9]), [torch.randn(2, 2, 3, device=dev)]),
        (EfficientNMS(score_threshold=0.3, max_output_boxes=20),
         [torch.rand(2, 500, 4, device=dev) * 100, torch.rand(2, 500, 6, device=dev)]),
        (ModulatedDeformConv2d(pads=[1, 1, 1, 1]),
         [torch.randn(1, 16, 12, 12, device=dev), torch.randn(16, 16, 3, 3, device=dev),
          torch.randn(1, 18, 12, 12, device=dev), None, torch.rand(1, 9, 12, 12, device=dev)]),
    ]
    for plugin, ins in cases:
        descs = [None if t is None else TensorDesc(tuple(t.shape), str(t.dtype)[6:]) for t in ins]
        outs = [torch.empty(d.shape, dtype=getattr(torch, d.dtype), device=dev) for d in plugin.output_descs(descs)]
        n = plugin.workspace_size(descs)
        ws = torch.empty(n, dtype=torch.uint8, device=dev) if n else None
        plugin.forward(ins, outs, ws, "triton")                     # warm up (compile)
        want = [o.clone() for o in outs]
        for o in outs:
            o.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            plugin.forward(ins, outs, ws, "triton")
        graph.replay()
        torch.cuda.synchronize()
        for o, w in zip(outs, want):
            torch.testing.assert_close(o, w, msg=f"{plugin.name} differs after CUDA-graph replay")
