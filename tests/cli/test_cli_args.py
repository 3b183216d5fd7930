"""Flags as users type them: repeated shape and input flags accumulate, a name given twice with
different values is refused, and impossible numbers or shapes get one line on stderr (exit 2)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from _cli import assert_user_error, kiln, snapshot

import kiln as kiln_api
from kiln.builder import Profile
from kiln.cli import make_parser
from kiln.cli.base.args import parse_shapes, profiles_from_args
from kiln.errors import BuildError, KilnError

_POSITIONAL = {"build": ["m.onnx", "-o", "m.kiln"], "run": ["m.kiln"], "compare": ["m.onnx"], "bench": ["m.kiln"]}


@pytest.mark.parametrize("command", sorted(_POSITIONAL))
def test_repeated_shapes_accumulate(command):
    args = make_parser().parse_args([command, *_POSITIONAL[command], "--shapes", "a:1x512", "--shapes", "b:2x1x128",
                                     "--shapes", "a:1x512"])        # the same shape again is no conflict
    assert parse_shapes(args.shapes, "--shapes") == {"a": (1, 512), "b": (2, 1, 128)}


def test_repeated_profile_flags_accumulate():
    args = make_parser().parse_args(["build", "m.onnx", "-o", "m.kiln", "--min-shapes", "a:1x8", "--min-shapes",
                                     "b:1x1x4", "--opt-shapes", "a:2x8", "--max-shapes", "a:4x8",
                                     "--max-shapes", "b:3x1x4", "--shapes", "c:5", "--shapes", "s:"])
    assert profiles_from_args(args) == {"a": ((1, 8), (2, 8), (4, 8)), "b": ((1, 1, 4), (3, 1, 4), (3, 1, 4)),
                                        "c": (5,), "s": ()}


def test_conflicting_values_are_refused_in_the_parser():
    with pytest.raises(KilnError, match=r"gives input 'a' two shapes, 1x8 and 2x8"):
        parse_shapes(["a:1x8", "b:2,a:2x8"], "--shapes")
    args = make_parser().parse_args(["build", "m.onnx", "-o", "m.kiln", "--shapes", "a:1x8", "--min-shapes", "a:1x8",
                                     "--max-shapes", "a:2x8"])
    with pytest.raises(KilnError, match=r"'a' is given both --shapes and --min"):
        profiles_from_args(args)


def test_build_keeps_every_repeated_shape(models, tmp_path):
    out = tmp_path / "two.kiln"
    r = kiln("build", models("two"), "-o", out, "--device", "cpu", "-q", "--shapes", "a:3x8", "--shapes", "b:2x1x4")
    assert r.returncode == 0, r.stderr
    header = json.loads(kiln("inspect", out, "--json").stdout)
    assert header["profiles"] == [{"a": {"min": [3, 8], "opt": [3, 8], "max": [3, 8]},
                                   "b": {"min": [2, 1, 4], "opt": [2, 1, 4], "max": [2, 1, 4]}}]


def test_same_name_twice_is_one_line(models, engine, tmp_path):
    before = snapshot(tmp_path)
    r = kiln("build", models("two"), "-o", tmp_path / "o.kiln", "--device", "cpu", "--shapes", "a:1x8",
             "--shapes", "a:2x8,b:2x1x4", cwd=tmp_path)
    assert_user_error(r, "'a'", "1x8", "2x8")
    np.save(tmp_path / "a1.npy", np.ones((2, 8), np.float32))
    np.save(tmp_path / "a2.npy", np.zeros((2, 8), np.float32))
    before = snapshot(tmp_path)
    r = kiln("run", engine, "--input", "a=a1.npy", "--input", "a=a2.npy", cwd=tmp_path)
    assert_user_error(r, "--input", "'a'", "a1.npy", "a2.npy")
    r = kiln("compare", models("two"), "--device", "cpu", "--shapes", "b:2x1x4", "--input", "a=a1.npy",
             "--input", "a=a2.npy", cwd=tmp_path)
    assert_user_error(r, "--input", "'a'")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("dims,suggested", [("-1x8", "a:1x8"), ("-2x8", "a:1x8"), ("1x-8", "a:1x1")])
def test_negative_dims_are_one_line(models, tmp_path, dims, suggested):
    r = kiln("build", models("two"), "-o", tmp_path / "o.kiln", "--device", "cpu", "--shapes", f"a:{dims}",
             "--shapes", "b:2x1x4", cwd=tmp_path)
    assert_user_error(r, f"--shapes a:{dims} has a negative dim", f"e.g. --shapes {suggested}")
    assert snapshot(tmp_path) == {}


def test_profile_dims_are_sizes():
    with pytest.raises(BuildError, match=r"'x' .*-1, 3\]"):
        Profile.make({"x": (-1, 3)})
    with pytest.raises(BuildError, match=r"'x' .*-4, 3\]"):
        Profile.make({"x": ((1, 3), (1, 3), (-4, 3))})


def test_zero_size_dims_build_and_run(models):
    """TensorRT and ONNX Runtime take zero-size dims; so does a Kiln profile."""
    config = kiln_api.BuildConfig(device="cpu", profiles={"a": ((0, 8), (0, 8), (2, 8)), "b": (2, 1, 4)})
    engine = kiln_api.build(kiln_api.onnx.parse(str(models("two"))), config)
    b = np.arange(8, dtype=np.float32).reshape(2, 1, 4) - 4
    out = engine.context().run({"a": np.zeros((0, 8), np.float32), "b": b})
    assert out["ya"].shape == (0, 8)
    np.testing.assert_array_equal(out["yb"], np.maximum(b, 0))


def test_build_config_refuses_impossible_values():
    with pytest.raises(BuildError, match="workspace"):
        kiln_api.BuildConfig(workspace=-5)
    with pytest.raises(BuildError, match="optimization_level"):
        kiln_api.BuildConfig(optimization_level=9)
    with pytest.raises(BuildError, match="optimization_level"):
        kiln_api.BuildConfig(optimization_level=2.5)


_BAD_NUMBERS = [
    ("build", ["--workspace", "-5"], "--workspace"), ("build", ["--workspace", "0"], "--workspace"),
    ("build", ["--workspace", "nan"], "--workspace"), ("build", ["--opt-level", "9"], "--opt-level"),
    ("build", ["--opt-level", "-1"], "--opt-level"), ("build", ["--opt-level", "two"], "--opt-level"),
    ("bench", ["--duration", "-1"], "--duration"), ("bench", ["--duration", "0"], "--duration"),
    ("bench", ["--iterations", "0"], "--iterations"), ("bench", ["--warmup", "-1"], "--warmup"),
    ("run", ["--seed", "-1"], "--seed"), ("compare", ["--atol", "-1"], "--atol"),
    ("compare", ["--rtol", "inf"], "--rtol"), ("compare", ["--growth", "0"], "--growth"),
]


@pytest.mark.parametrize("command,flag,name", _BAD_NUMBERS, ids=[f"{c}{' '.join(f)}" for c, f, _ in _BAD_NUMBERS])
def test_impossible_numbers_are_one_line(models, engine, tmp_path, command, flag, name):
    target = {"build": [models("two"), "-o", tmp_path / "o.kiln", "--device", "cpu", "--shapes", "a:1x8,b:2x1x4"],
              "compare": [models("two"), "--device", "cpu", "--shapes", "a:1x8,b:2x1x4"]}.get(command, [engine])
    r = kiln(command, *target, *flag, cwd=tmp_path)
    assert_user_error(r, name, "kiln " + command)
    assert snapshot(tmp_path) == {}
