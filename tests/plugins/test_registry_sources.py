"""Where plugins come from: decorators, files given to --plugins, installed packages' entry points;
and a plugin that takes over a built-in ONNX op when it says so."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
from _kiln_cli import run_cli
from onnx import TensorProto, helper

import kiln
from kiln.plugins import Plugin, PluginRegistry, TensorDesc, registry

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "custom_plugin"


def _relu_model() -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "m",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _make_relu_plugin(override: bool):
    class LeakyAsRelu(Plugin):
        name = "Relu"
        namespace = ""
        version = "1"
        overrides_builtin = override
        tactics = {"cpu": ("torch",), "cuda": ("torch",)}

        def output_descs(self, inputs):
            return [TensorDesc(inputs[0].shape, inputs[0].dtype)]

        def forward(self, inputs, outputs, workspace, tactic):
            outputs[0].copy_(inputs[0].clamp(min=0) + 0.5)      # observable: not the built-in ReLU
    return LeakyAsRelu


def test_plugin_overrides_builtin_only_when_flagged():
    x = np.array([[-1, 0, 2], [3, -4, 5]], np.float32)
    for override, expect_plugin in ((False, False), (True, True)):
        cls = registry.register(_make_relu_plugin(override))
        try:
            net = kiln.onnx.parse(_relu_model())
            kinds = [layer.kind for layer in net.layers]
            assert ("Plugin" in kinds) == expect_plugin
            y = kiln.build(net, kiln.BuildConfig(device="cpu")).context().run({"x": x})["y"]
            np.testing.assert_array_equal(y, np.maximum(x, 0) + (0.5 if expect_plugin else 0.0))
        finally:
            registry.unregister(cls.name, cls.namespace, cls.version)


def test_entry_point_plugins_register_with_their_origin(tmp_path, monkeypatch):
    pkg = tmp_path / "kiln_ext_demo.py"
    pkg.write_text(textwrap.dedent("""
        from kiln.plugins import Plugin, TensorDesc
        class Doubler(Plugin):
            name = "Doubler"
            namespace = "ext"
            def output_descs(self, inputs):
                return [inputs[0]]
            def forward(self, inputs, outputs, workspace, tactic):
                outputs[0].copy_(inputs[0] * 2)
    """))
    dist = tmp_path / "kiln_ext_demo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kiln-ext-demo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[kiln.plugins]\ndoubler = kiln_ext_demo:Doubler\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = PluginRegistry()
    cls = reg.find("Doubler", "ext")
    assert cls is not None and cls.__name__ == "Doubler"
    assert any("entry point doubler" in src for c, src in reg.list() if c is cls)


def _kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_plugins_lists_fields_and_origin():
    r = _kiln("plugins", "--plugins", str(EXAMPLE / "swish_plugin.py"))
    assert r.returncode == 0, r.stderr
    assert "example::SwishBeta v1" in r.stdout and "swish_plugin.py" in r.stdout
    assert "beta: float (default 1.0)" in r.stdout
    assert "kiln::RoiAlign v1" in r.stdout          # built-ins are listed too


def test_cli_build_with_plugin_file_and_missing_file(tmp_path):
    sys.path.insert(0, str(EXAMPLE))
    import make_model
    model = make_model.make(str(tmp_path / "m.onnx"))
    r = _kiln("build", model, "-o", str(tmp_path / "m.kiln"), "--device", "cpu", "--shapes", "x:2x3x16x16",
              "--plugins", str(EXAMPLE / "swish_plugin.py"), "-q")
    assert r.returncode == 0, r.stderr
    r = _kiln("build", model, "-o", str(tmp_path / "m2.kiln"), "--device", "cpu", "--shapes", "x:2x3x16x16")
    assert r.returncode == 2 and "SwishBeta" in r.stderr and "plugin" in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("kiln: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    r = run_cli("plugins", "--plugins", tmp_path / "nope.py")        # refused before anything registers
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
