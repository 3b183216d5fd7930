"""`kiln check` at the user's shapes: the shape flags `kiln build` takes, and build-stage findings worded
as what a build would refuse, not as unsupported nodes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.cli import main


def _save(nodes: list, inputs: list, inits: list, path: Path) -> Path:
    g = helper.make_graph(nodes, path.stem, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def same_upper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """x [N, 2, H, W] → Conv (SAME_UPPER) → Conv (SAME_UPPER, stride 2) → y: the second conv's padding depends
    on the parity of H and W, so a profile whose range leaves them open cannot build."""
    w = numpy_helper.from_array((np.random.default_rng(0).standard_normal((2, 2, 3, 3)) * 0.3).astype(np.float32),
                                "W")
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], name="conv1", auto_pad="SAME_UPPER"),
             helper.make_node("Conv", ["a", "W"], ["y"], name="conv2", auto_pad="SAME_UPPER", strides=[2, 2])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, "H", "W"])
    return _save(nodes, [x], [w], tmp_path_factory.mktemp("check") / "same.onnx")


_RANGE = ["--min-shapes", "x:1x2x8x8", "--opt-shapes", "x:1x2x9x9", "--max-shapes", "x:1x2x16x16"]


def test_check_at_static_shapes(same_upper, capsys):
    assert main(["check", str(same_upper), "--shapes", "x:1x2x11x10"]) == 0
    assert capsys.readouterr().out.strip() == f"{same_upper}: every node is supported."


def test_check_at_a_range_profile_words_the_build_refusal(same_upper, capsys):
    assert main(["check", str(same_upper), *_RANGE]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"{same_upper}: a build at the given shapes would fail:", lines
    assert lines[1].startswith("  conv2  op Conv  domain ai.onnx  opset 17: Layer 'conv2' (Convolution) uses "
                               "auto_pad=SAME_UPPER"), lines
    assert "fix 'x' dims 2, 3 to one size in the profile" in lines[1]
    assert len(lines) == 2, lines                       # no "unsupported", no plugin advice
    assert main(["check", str(same_upper), *_RANGE, "--json"]) == 1
    found = json.loads(capsys.readouterr().out)
    assert [(f["name"], f["op_type"], f["stage"]) for f in found] == [("conv2", "Conv", "build")]


def test_check_without_shapes_checks_what_it_can(same_upper, capsys):
    assert main(["check", str(same_upper)]) == 0        # dynamic dims and no flags: the op support only
    assert "every node is supported" in capsys.readouterr().out


def test_a_static_model_that_cannot_build_is_not_called_unsupported(tmp_path, capsys):
    reps = numpy_helper.from_array(np.array([1 << 20, 1 << 20], np.int64), "reps")
    model = _save([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                   helper.make_node("Tile", ["r", "reps"], ["y"], name="tile")],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])], [reps], tmp_path / "tile.onnx")
    assert main(["check", str(model)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{model}: a build at the model's input shapes would fail:\n  tile  op Tile  "), out
    assert "unsupported" not in out and "plugin" not in out


def test_unsupported_nodes_keep_their_wording(tmp_path, capsys):
    model = _save([helper.make_node("NoSuchOp", ["x"], ["y"], name="odd", domain="example.custom")],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])], [], tmp_path / "odd.onnx")
    m = onnx.load(str(model))
    m.opset_import.append(helper.make_opsetid("example.custom", 1))
    onnx.save(m, str(model))
    assert main(["check", str(model), "--shapes", "x:1x4"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"{model}: 1 unsupported node(s):", lines
    assert lines[1].startswith("  odd  op NoSuchOp  domain example.custom  opset 1"), lines
    assert lines[-1].startswith("Supply a plugin for each"), lines


@pytest.mark.parametrize("flags,words", [
    (["--shapes", "x:1x2x8x8", "--min-shapes", "x:1x2x8x8", "--max-shapes", "x:1x2x9x9"], ["'x'", "both --shapes"]),
    (["--min-shapes", "x:1x2x8x8"], ["'x'", "--max-shapes"]),
    (["--shapes", "x:1x2x-1x8"], ["--shapes", "negative dim"])])
def test_bad_shape_flags_are_one_line(same_upper, capsys, flags, words):
    assert main(["check", str(same_upper), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err


def test_check_for_a_device_this_machine_lacks(same_upper, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert main(["check", str(same_upper), "--shapes", "x:1x2x11x10", "--device", "cuda"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"{same_upper}: a build at the given shapes would fail:", lines
    assert "has no CUDA GPU" in lines[1] and "--device cpu" in lines[1], lines
    assert main(["check", str(same_upper), "--shapes", "x:1x2x11x10", "--device", "cpu"]) == 0
