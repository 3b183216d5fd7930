"""Plugins the way a user meets them: inside engine files, loaded in fresh processes.

Every built-in plugin (and the example's user plugin) is built into an engine from an ONNX node,
saved, loaded in a new Python process and run; outputs must match the building process. Loading
with the plugin unregistered must fail with an error naming it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.errors import PluginError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "custom_plugin"


def _model(nodes, inputs, outputs, opset=20, extra_opsets=()):
    g = helper.make_graph(nodes, "m", inputs, outputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _cases():
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)       # noqa: E731
    boxes = np.sort(rng.uniform(0, 14, (5, 4)).astype(np.float32).reshape(5, 2, 2), axis=1).reshape(5, 4)
    boxes = boxes[:, [0, 2, 1, 3]]
    yield "RoiAlign", _model(
        [helper.make_node("RoiAlign", ["x", "rois", "idx"], ["y"], output_height=3, output_width=3,
                          sampling_ratio=2, spatial_scale=1.0)],
        [_vi("x", TensorProto.FLOAT, [2, 4, 16, 16]), _vi("rois", TensorProto.FLOAT, [5, 4]),
         _vi("idx", TensorProto.INT64, [5])], [_vi("y", TensorProto.FLOAT, [5, 4, 3, 3])], opset=16), \
        {"x": f32(2, 4, 16, 16), "rois": boxes, "idx": np.array([0, 1, 0, 1, 1], np.int64)}
    yield "GridSample", _model(
        [helper.make_node("GridSample", ["x", "grid"], ["y"], mode="linear", padding_mode="border",
                          align_corners=0)],
        [_vi("x", TensorProto.FLOAT, [2, 3, 8, 8]), _vi("grid", TensorProto.FLOAT, [2, 5, 6, 2])],
        [_vi("y", TensorProto.FLOAT, [2, 3, 5, 6])]), \
        {"x": f32(2, 3, 8, 8), "grid": rng.uniform(-1.1, 1.1, (2, 5, 6, 2)).astype(np.float32)}
    yield "NonMaxSuppression", _model(
        [helper.make_node("NonMaxSuppression", ["b", "s", "m", "iou", "thr"], ["y"])],
        [_vi("b", TensorProto.FLOAT, [1, 6, 4]), _vi("s", TensorProto.FLOAT, [1, 2, 6]),
         _vi("m", TensorProto.INT64, [1]), _vi("iou", TensorProto.FLOAT, [1]), _vi("thr", TensorProto.FLOAT, [1])],
        [_vi("y", TensorProto.INT64, ["n", 3])], opset=11), \
        {"b": np.concatenate([boxes[None, :5], boxes[None, :1] + 0.1], 1), "s": rng.random((1, 2, 6)).astype(np.float32),
         "m": np.array([3], np.int64), "iou": np.array([0.5], np.float32), "thr": np.array([0.1], np.float32)}
    dets = np.concatenate([boxes, boxes + 0.5, boxes[::-1] * 0.9], 0)[None].repeat(2, 0).astype(np.float32)
    yield "EfficientNMS", _model(
        [helper.make_node("EfficientNMS", ["boxes", "scores"], ["num", "det_boxes", "det_scores", "det_classes"],
                          domain="kiln", plugin_namespace="kiln", plugin_version="1", score_threshold=0.2, iou_threshold=0.5,
                          max_output_boxes=6)],
        [_vi("boxes", TensorProto.FLOAT, [2, 15, 4]), _vi("scores", TensorProto.FLOAT, [2, 15, 3])],
        [_vi("num", TensorProto.INT32, [2, 1]), _vi("det_boxes", TensorProto.FLOAT, [2, 6, 4]),
         _vi("det_scores", TensorProto.FLOAT, [2, 6]), _vi("det_classes", TensorProto.INT32, [2, 6])], opset=17,
        extra_opsets=[helper.make_opsetid("kiln", 1)]), \
        {"boxes": dets, "scores": rng.random((2, 15, 3)).astype(np.float32)}
    yield "DeformConv", _model(
        [helper.make_node("DeformConv", ["x", "w", "off"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        [_vi("x", TensorProto.FLOAT, [1, 4, 6, 6]), _vi("w", TensorProto.FLOAT, [5, 4, 3, 3]),
         _vi("off", TensorProto.FLOAT, [1, 18, 6, 6])], [_vi("y", TensorProto.FLOAT, [1, 5, 6, 6])], opset=19), \
        {"x": f32(1, 4, 6, 6), "w": f32(5, 4, 3, 3), "off": f32(1, 18, 6, 6)}


CASES = list(_cases())


def _child(feeds: dict, steps: list[tuple]) -> list[dict]:
    """In one new interpreter with the built-in plugins loaded, take ``steps`` in order: ("run", engine, out.npz)
    loads and runs ``engine`` on ``feeds[engine]`` (outputs saved to out.npz), ("unregister", name, namespace,
    version) drops a plugin from the registry, ("import", module) imports a module of the example. One result
    per run: {"ran": True} or {"error": KilnError class name, "message": its text}."""
    steps = [tuple(str(v) if isinstance(v, Path) else v for v in step) for step in steps]
    inputs = {}
    for i, (engine, f) in enumerate(feeds.items()):
        inputs[str(engine)] = str(Path(engine).with_suffix(f".in{i}.npz"))
        np.savez(inputs[str(engine)], **f)
    code = textwrap.dedent(f"""
        import json, sys, numpy as np
        sys.path.insert(0, {str(EXAMPLE)!r})
        import kiln, kiln.plugins as P
        P.load_builtins()
        inputs = {inputs!r}
        for step, *args in {steps!r}:
            if step == "unregister":
                P.registry.unregister(*args)
            elif step == "import":
                __import__(args[0])
            else:
                engine, out = args
                try:
                    y = kiln.load(engine).context().run(dict(np.load(inputs[engine])))
                except kiln.KilnError as e:
                    print(json.dumps({{"error": type(e).__name__, "message": str(e)}}))
                    continue
                np.savez(out, **y)
                print(json.dumps({{"ran": True}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0, r.stdout + r.stderr
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == sum(step[0] == "run" for step in steps), r.stdout + r.stderr
    return results


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory) -> dict[str, tuple]:
    """Each case built here and run (``here``), saved, then in ONE new process (the cases use different plugins):
    loaded and run, its plugin unregistered, loaded again. op → (here, plugin record, folder, run results)."""
    built, feeds, steps = {}, {}, []
    for op, model, case_feeds in CASES:
        onnx.checker.check_model(model)
        net = kiln.onnx.parse(model)
        assert any(layer.kind == "Plugin" for layer in net.layers)
        engine = kiln.build(net, kiln.BuildConfig(device="cpu", profiles={n: v.shape for n, v in case_feeds.items()
                                                                          if op != "NonMaxSuppression"} or None))
        folder = tmp_path_factory.mktemp(op)
        engine.save(str(folder / "e.kiln"))
        rec = [p for p in engine.header["plugins"]][0]
        built[op] = (engine.context().run(case_feeds), rec, folder)
        feeds[folder / "e.kiln"] = case_feeds
        steps += [("run", folder / "e.kiln", folder / "out.npz"),
                  ("unregister", rec["name"], rec["namespace"], rec["version"]),
                  ("run", folder / "e.kiln", folder / "out2.npz")]
    results = iter(_child(feeds, steps))
    return {op: (*built[op], (next(results), next(results))) for op, _, _ in CASES}


@pytest.mark.parametrize("op", [c[0] for c in CASES])
def test_builtin_plugin_engine_round_trip(round_trips, op):
    here, rec, folder, (ran, unregistered) = round_trips[op]
    assert ran == {"ran": True}, ran
    there = dict(np.load(folder / "out.npz"))
    for k, v in here.items():
        np.testing.assert_array_equal(there[k], v)
    assert unregistered["error"] == "PluginError", unregistered
    assert f"{rec['namespace']}::{rec['name']} v{rec['version']}" in unregistered["message"]
    assert "register" in unregistered["message"]
    assert not (folder / "out2.npz").exists()


def test_user_plugin_example_runs(tmp_path):
    r = subprocess.run([sys.executable, str(EXAMPLE / "run_example.py"), "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "max abs error vs numpy" in r.stdout
    # without importing the plugin, the engine is refused with a message naming it; importing it, the engine runs
    engine = tmp_path / "swish.kiln"
    refused, ran = _child({engine: {"x": np.zeros((2, 3, 16, 16), np.float32)}},
                          [("run", engine, tmp_path / "o.npz"), ("import", "swish_plugin"),
                           ("run", engine, tmp_path / "o.npz")])
    assert refused["error"] == "PluginError" and "example::SwishBeta v1" in refused["message"], refused
    assert "register" in refused["message"]
    assert ran == {"ran": True}, ran


def test_user_plugin_triton_tactic_matches_torch(monkeypatch):
    import torch
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    sys.path.insert(0, str(EXAMPLE))
    import swish_plugin
    p = swish_plugin.SwishBeta(beta=0.7)
    x = torch.randn(3, 70, device="cuda" if torch.cuda.is_available() else "cpu")
    a, b = torch.empty_like(x), torch.empty_like(x)
    p.forward([x], [a], None, "triton")
    p.forward([x], [b], None, "torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_missing_field_and_wrong_type_are_named():
    sys.path.insert(0, str(EXAMPLE))
    import swish_plugin
    with pytest.raises(PluginError, match="'beta'"):
        swish_plugin.SwishBeta(beta="fast")
