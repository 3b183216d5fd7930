"""Running the kiln command line in a subprocess, for the quantization tests."""
from __future__ import annotations

import os
import subprocess
import sys


def kiln_cli(*args: object, cwd: object) -> subprocess.CompletedProcess:
    """``kiln ARGS`` run in ``cwd``: its exit code, stdout and stderr."""
    return subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
