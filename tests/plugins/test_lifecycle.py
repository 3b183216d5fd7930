"""The plugin lifecycle TensorRT users expect: configure() sees resolved shapes before the layer runs
them, initialize() runs once per plugin instance before its first run (each execution context has
its own instances); and a plugin file imported twice is one plugin, not a duplicate of itself."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import textwrap

import numpy as np
import onnx
import pytest
from _kiln_cli import run_cli
from onnx import TensorProto, helper

import kiln
from kiln.errors import PluginError
from kiln.plugins import Plugin, TensorDesc, registry

KEY = ("AddTable", "test.lifecycle", "1")

PLUGIN_SOURCE = textwrap.dedent('''
    """A plugin whose run needs a constant that only initialize() makes."""
    import torch
    from kiln.plugins import Plugin, TensorDesc, field, register

    EVENTS = []


    @register
    class AddTable(Plugin):
        name, namespace, version = "AddTable", "test.lifecycle", "1"
        tactics = {"cpu": ("torch",), "cuda": ("torch",)}
        step = field(float, 0.5)

        def output_descs(self, inputs):
            return [TensorDesc(inputs[0].shape, inputs[0].dtype)]

        def configure(self, inputs, outputs):
            EVENTS.append(("configure", id(self), tuple(inputs[0].shape), tuple(outputs[0].shape)))

        def initialize(self):
            EVENTS.append(("initialize", id(self)))
            self.table = torch.arange(4, dtype=torch.float32) * self.step

        def forward(self, inputs, outputs, workspace, tactic):
            torch.add(inputs[0], self.table.to(inputs[0].device), out=outputs[0])
''')


@pytest.fixture
def plugin_file(tmp_path, monkeypatch):
    """plug_lifecycle.py in a folder on sys.path; every registration and import of it is undone after."""
    path = tmp_path / "plug_lifecycle.py"
    path.write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.unregister(*KEY)
    yield path
    registry.unregister(*KEY)
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def _model(step: float = 0.25) -> onnx.ModelProto:
    node = helper.make_node("AddTable", ["x"], ["y"], name="add_table", domain="test.lifecycle", step=step)
    g = helper.make_graph([node], "lifecycle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("test.lifecycle", 1)])


def test_initialize_and_configure_are_called(plugin_file):
    module = importlib.import_module("plug_lifecycle")
    config = kiln.BuildConfig(device="cpu", profiles={"x": ((1, 4), (2, 4), (3, 4))})
    engine = kiln.build(kiln.onnx.parse(_model(step=0.25)), config)
    module.EVENTS.clear()
    ctx = engine.context()
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    want = x + np.arange(4, dtype=np.float32) * 0.25         # initialize()'s table, scaled by the node's step
    for rows in (3, 3, 1):
        np.testing.assert_array_equal(ctx.run({"x": x[:rows]})["y"], want[:rows])
    events = [(e[0], *e[2:]) for e in module.EVENTS]
    assert events == [("initialize",), ("configure", (3, 4), (3, 4)), ("configure", (1, 4), (1, 4))]
    assert len({e[1] for e in module.EVENTS}) == 1           # all on the context's own instance
    module.EVENTS.clear()
    other = engine.context()                                 # a second context: its own instance, initialized
    np.testing.assert_array_equal(other.run({"x": x[:2]})["y"], want[:2])
    assert [(e[0], *e[2:]) for e in module.EVENTS] == [("initialize",), ("configure", (2, 4), (2, 4))]


def test_saved_engine_initializes_its_plugin(plugin_file, tmp_path):
    importlib.import_module("plug_lifecycle")
    path = tmp_path / "lifecycle.kiln"
    kiln.build(kiln.onnx.parse(_model(step=2.0)), kiln.BuildConfig(device="cpu", profiles={"x": (2, 4)})).save(
        str(path))
    y = kiln.load(str(path)).context().run({"x": np.ones((2, 4), np.float32)})["y"]
    np.testing.assert_array_equal(y, 1 + np.tile(np.arange(4, dtype=np.float32) * 2.0, (2, 1)))


def test_import_then_load_is_one_plugin(plugin_file):
    module = importlib.import_module("plug_lifecycle")
    assert registry.find(*KEY) is module.AddTable
    assert kiln.plugins.load(str(plugin_file)) == []          # `import plug` then `--plugins plug.py`
    assert kiln.plugins.load(str(plugin_file)) == []          # and the same file twice
    assert registry.find(*KEY) is module.AddTable


def test_same_file_under_two_module_names_is_one_plugin(plugin_file):
    classes = []
    for mod_name in ("lifecycle_copy_a", "lifecycle_copy_b"):   # e.g. a package imported by two paths
        spec = importlib.util.spec_from_file_location(mod_name, plugin_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
        classes.append(module.AddTable)
    assert classes[0] is not classes[1] and registry.find(*KEY) is classes[0]


def test_different_classes_with_one_key_are_still_refused(plugin_file):
    importlib.import_module("plug_lifecycle")

    class AddTable(Plugin):                                   # same name, namespace and version; other code
        name, namespace, version = KEY

        def output_descs(self, inputs):
            return [TensorDesc(inputs[0].shape, inputs[0].dtype)]
    with pytest.raises(PluginError, match=r"test.lifecycle::AddTable v1 is already registered"):
        registry.register(AddTable)
    edited = plugin_file.with_name("plug_edited.py")          # the same class statement, edited
    edited.write_text(PLUGIN_SOURCE.replace("* self.step", "* self.step * 2"))
    with pytest.raises(PluginError, match="already registered"):
        kiln.plugins.load(str(edited))


def test_cli_loads_a_plugin_file_twice(plugin_file, tmp_path):
    r = run_cli("plugins", "--plugins", plugin_file, "--plugins", plugin_file, cwd=tmp_path)   # plugin_file undoes it
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("test.lifecycle::AddTable v1") == 1
