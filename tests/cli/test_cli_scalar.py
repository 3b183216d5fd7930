"""Rank-0 (scalar) inputs, like an audio model's sample rate, through run, bench and compare."""
from __future__ import annotations

import json

import numpy as np
import pytest
from _cli import kiln


@pytest.fixture(scope="module")
def scalar_engine(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("scalar") / "scalar.kiln"
    r = kiln("build", models("scalar"), "-o", out, "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    return out


def test_run_and_bench_feed_a_scalar(scalar_engine, tmp_path):
    np.save(tmp_path / "x.npy", np.arange(16, dtype=np.float32).reshape(2, 8))
    np.save(tmp_path / "sr.npy", np.array(0.5, np.float32))
    r = kiln("run", scalar_engine, "--input", "x=x.npy", "--input", "sr=sr.npy", "--output-dir", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "y.npy"), np.arange(16).reshape(2, 8) * 0.5)
    r = kiln("bench", scalar_engine, "--iterations", "3", "--warmup", "1", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["shapes"] == {"x": [2, 8], "sr": []} and res["iterations"] == 3


def test_compare_takes_a_0d_npy(models, tmp_path):
    np.save(tmp_path / "sr.npy", np.array(16000.0, np.float32))
    r = kiln("compare", models("scalar"), "--device", "cpu", "--input", "sr=sr.npy", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "PASS" in r.stdout
