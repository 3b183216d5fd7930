"""The calibration cache (a rebuild skips calibration; a cache from another model, made with other settings,
damaged or not a cache is refused in one line and left as it is) and bad input to a quantized build, through
the Python API and the CLI (exit 2, one stderr line)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

import kiln
import kiln.onnx
from kiln.errors import BuildError, KilnError
from kiln.builder.quant import check_device, quantize

from _quant_models import blobs, cnn, trained_mlp


@pytest.fixture(scope="module")
def mlp_net():
    return kiln.onnx.parse(trained_mlp(steps=5))


def _config(**kw) -> kiln.BuildConfig:
    base = {"device": "cpu", "quantize": "int8", "calibrator": "max", "profiles": {"x": (8, 16)}}
    return kiln.BuildConfig(**{**base, **kw})


def _one_line(exc: pytest.ExceptionInfo, *words: str) -> None:
    text = str(exc.value)
    assert "\n" not in text and isinstance(exc.value, KilnError)
    for w in words:
        assert w in text, (w, text)


def _scales(net) -> dict[str, float]:
    return {layer.inputs[0].name: float(layer.inputs[1].value) for layer in net.layers
            if layer.kind == "QuantizeLinear"}


def test_cache_skips_calibration(mlp_net, tmp_path):
    calib, _ = blobs(16, seed=1)
    cache = tmp_path / "calib.json"
    first = quantize(mlp_net, _config(calibration=[{"x": calib}], calib_cache=cache))
    doc = json.loads(cache.read_text())
    assert doc["calibrator"] == "max" and set(doc["amax"]) == {"x", "h"}
    assert doc["amax"]["x"] == float(np.abs(calib).max())
    again = quantize(mlp_net, _config(calib_cache=cache))            # no calibration data: the cache is enough
    assert _scales(again) == _scales(first)
    doc["amax"]["x"] = 2 * 127.0                                      # the cache, not the data, gives the scales
    cache.write_text(json.dumps(doc))
    assert _scales(quantize(mlp_net, _config(calibration=[{"x": calib}], calib_cache=cache)))["x"] == 2.0


def test_cache_refusals_leave_the_file(mlp_net, tmp_path):
    calib, _ = blobs(16, seed=1)
    cache = tmp_path / "calib.json"
    quantize(mlp_net, _config(calibration=[{"x": calib}], calib_cache=cache))
    before = cache.read_bytes()
    other = kiln.onnx.parse(trained_mlp(steps=6))                    # same graph, other weights
    with pytest.raises(BuildError) as e:
        quantize(other, _config(calibration=[{"x": calib}], calib_cache=cache))
    _one_line(e, "another model")
    with pytest.raises(BuildError) as e:
        quantize(mlp_net, _config(calibrator="percentile", calib_cache=cache))
    _one_line(e, "calibrator max", "calibrator percentile")
    assert cache.read_bytes() == before
    for text, word in [("not json", "not a readable JSON"), ('{"format": "x"}', "not a Kiln calibration cache"),
                       (before.decode().replace('"x": ', '"x": -'), "damaged")]:
        cache.write_text(text)
        with pytest.raises(BuildError) as e:
            quantize(mlp_net, _config(calibration=[{"x": calib}], calib_cache=cache))
        _one_line(e, word)
        assert cache.read_text() == text


def test_bad_calibration_data(mlp_net, tmp_path):
    good, _ = blobs(16, seed=1)
    cases = [
        ([{"x": np.zeros((4, 15), np.float32)}], ["'x'", "[4, 15]", "16"]),
        ([{"y": good}], ["names inputs", "'x'"]),
        ([{"x": good.astype(np.int32)}], ["int32", "float32"]),
        (str(tmp_path / "missing"), ["does not exist"]),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    cases.append((str(empty), ["holds no .npy, .npz or image files"]))
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    cases.append((str(bad), ["not a readable numpy file"]))
    for source, words in cases:
        with pytest.raises(BuildError) as e:
            quantize(mlp_net, _config(calibration=source))
        _one_line(e, *words)
    with pytest.raises(BuildError) as e:
        quantize(mlp_net, _config())
    _one_line(e, "needs calibration data")


def test_folder_and_npz_sources(mlp_net, tmp_path):
    """A folder of .npy/.npz files gives the same ranges as the arrays themselves."""
    a, _ = blobs(12, seed=1)
    b, _ = blobs(20, seed=2)
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "b.npz", x=b)
    from kiln.builder.quant.calibrate import load_batches
    batches = load_batches(str(tmp_path), mlp_net)
    np.testing.assert_array_equal(np.concatenate([bt["x"] for bt in batches]), np.concatenate([a, b]))
    want = _scales(quantize(mlp_net, _config(calibration=[{"x": a}, {"x": b}])))
    assert _scales(quantize(mlp_net, _config(calibration=str(tmp_path)))) == want


def test_device_and_model_refusals(mlp_net):
    with pytest.raises(BuildError) as e:
        check_device("fp8", "cpu")
    _one_line(e, "--fp8", "compute capability 8.9")
    with pytest.raises(BuildError) as e:
        check_device("fp8", "cuda", (8, 6))
    _one_line(e, "8.6", "--int8")
    check_device("fp8", "cuda", (9, 0))
    check_device("fp8", "cuda", (8, 9))
    check_device("int8", "cpu")
    with pytest.raises(BuildError) as e:
        quantize(mlp_net, _config(calibration=[{"x": blobs(8, 1)[0]}], fp16_layers=("nothing*",)))
    _one_line(e, "--fp16-layers", "'nothing*'")
    qnet = quantize(mlp_net, _config(calibration=[{"x": blobs(8, 1)[0]}]))
    with pytest.raises(BuildError) as e:
        quantize(qnet, _config(calibration=[{"x": blobs(8, 1)[0]}]))
    _one_line(e, "already quantized")
    with pytest.raises(BuildError) as e:
        kiln.BuildConfig(calibration="x.npz")
    _one_line(e, "--int8")


def _kiln(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_build_int8_and_foreign_cache(tmp_path):
    onnx.save(cnn(seed=1), tmp_path / "cnn.onnx")
    onnx.save(cnn(seed=2), tmp_path / "other.onnx")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    r = _kiln("build", "cnn.onnx", "--int8", "--calib", "calib.npy", "--calib-cache", "c.json", "--device", "cpu",
              "--shapes", "x:4x3x8x8", "-o", "cnn.kiln", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "8-bit kernels are GPU-only" in lines[0]
    assert "int8" in r.stdout and (tmp_path / "c.json").exists()
    engine = kiln.load(str(tmp_path / "cnn.kiln"))
    q = engine.header["build"]["quantization"]
    assert {k: q[k] for k in ("mode", "calibrator", "fp16_layers")} == {"mode": "int8", "calibrator": "mse",
                                                                         "fp16_layers": []}
    assert sorted(q["layers"]) == ["conv2", "fc"] and "accuracy" not in q        # conv1: a 3-channel stem
    assert sum(layer["kind"] == "QuantizeLinear" for layer in engine.layers) == 2
    before = (tmp_path / "c.json").read_bytes()
    r = _kiln("build", "other.onnx", "--int8", "--calib-cache", "c.json", "--device", "cpu", "--shapes",
              "x:4x3x8x8", "-o", "other.kiln", "-q", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "another model" in lines[0], r.stderr[-2000:]
    assert (tmp_path / "c.json").read_bytes() == before and not (tmp_path / "other.kiln").exists()


def test_calibration_images(tmp_path):
    """A folder of images, preprocessed by the flags' Preprocess, gives the arrays numpy computes from the same
    pixels; an image of another size is refused in one line naming the resize flag."""
    Image = pytest.importorskip("PIL.Image")
    from kiln.builder.quant.calibrate import load_batches
    from kiln.builder.quant.images import Preprocess
    net = kiln.onnx.parse(cnn(seed=1))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"{i}.png")
    prep = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    got = np.concatenate([b["x"] for b in load_batches(str(tmp_path), net, prep)])
    want = ((pixels / 255.0 - np.array(prep.mean)) / np.array(prep.std)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(BuildError) as e:
        load_batches(str(tmp_path), net, prep)
    _one_line(e, "big.png", "10x12", "--calib-resize 8x8")
    resized = load_batches(str(tmp_path), net, Preprocess(size=(8, 8)))
    assert sum(len(b["x"]) for b in resized) == 4


def test_cli_compare_int8(tmp_path):
    """kiln compare --int8 builds the quantized engine and checks it against FP32 ONNX Runtime (the per-output
    line and its verdict); --engine with --int8 is refused in one line."""
    onnx.save(cnn(seed=1), tmp_path / "cnn.onnx")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    r = _kiln("compare", "cnn.onnx", "--int8", "--calib", "calib.npy", "--calibrator", "max", "--device", "cpu",
              "--shapes", "x:4x3x8x8", "--no-histogram", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "y: float32 [4, 10]" in r.stdout and "PASSED" in r.stdout
    r = _kiln("compare", "cnn.onnx", "--int8", "--calib", "calib.npy", "--device", "cpu", "--shapes", "x:4x3x8x8",
              "--atol", "1e-7", "--rtol", "1e-7", "--no-histogram", cwd=tmp_path)
    assert r.returncode == 1 and "FAIL" in r.stdout                  # quantized: not equal to FP32
    r = _kiln("compare", "cnn.onnx", "--int8", "--calib", "calib.npy", "--engine", "x.kiln", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--engine" in lines[0], r.stderr[-2000:]
