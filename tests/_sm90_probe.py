"""Run an sm_90 compile probe (tests/plugins/sm90_compile.py) in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PLUGINS = str(Path(__file__).resolve().parent / "plugins")


def run_probe(source: str) -> Any:
    """Run ``source`` (Python that prints one JSON line last; tests/plugins is its argv[1]) without
    TRITON_INTERPRET, so Triton compiles for real; returns that JSON. Skips where Triton's bundled ptxas is
    missing; a failing probe fails the test with its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", source, PLUGINS], capture_output=True, text=True, env=env,
                         timeout=600)
    if res.returncode != 0 and "ptxas" in res.stderr and "No such file" in res.stderr:
        pytest.skip("Triton's bundled ptxas is unavailable here")
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
