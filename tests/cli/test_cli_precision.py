"""--fp16/--bf16/--tf32 on a CPU build: one warning line that says what the CPU does with them."""
from __future__ import annotations

import json

import pytest
from _cli import kiln


@pytest.mark.parametrize("flag,words", [("--tf32", ("no effect", "plain FP32")),
                                        ("--fp16", ("FP16 rounding", "slower than FP32"))])
def test_reduced_precision_on_cpu_warns_once(models, tmp_path, flag, words):
    out = tmp_path / "m.kiln"
    r = kiln("build", models("two"), "-o", out, "--device", "cpu", "-q", flag, "--shapes", "a:1x8,b:2x1x4")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kiln: warning: {flag}: "), r.stderr
    assert all(w in lines[0] for w in words), lines[0]
    header = json.loads(kiln("inspect", out, "--json").stdout)
    assert header["precision"] == flag[2:]


def test_fp32_on_cpu_says_nothing(models, tmp_path):
    r = kiln("build", models("two"), "-o", tmp_path / "m.kiln", "--device", "cpu", "-q", "--shapes", "a:1x8,b:2x1x4")
    assert r.returncode == 0 and r.stderr == "", r.stderr
