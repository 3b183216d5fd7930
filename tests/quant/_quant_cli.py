"""Running the kiln command line for the quantization tests: in this process (tests/_kiln_cli.py), with what a
subprocess would give back."""
from __future__ import annotations

import subprocess

from _kiln_cli import run_cli


def kiln_cli(*args: object, cwd: object) -> subprocess.CompletedProcess:
    """``kiln ARGS`` run in ``cwd``: its exit code, stdout and stderr."""
    return run_cli(*args, cwd=cwd)
