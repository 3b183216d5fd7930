"""`kiln … | head -1`: when the reader has gone, the command stops quietly (no BrokenPipeError traceback)."""
from __future__ import annotations

import os
import subprocess

import pytest
from _kiln_cli import KILN


def _into_closed_pipe(*args: object) -> subprocess.CompletedProcess:
    """Run kiln with stdout on a pipe whose reader is already closed: every write fails with EPIPE,
    as when `head -1` has exited."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([*KILN, *map(str, args)], stdout=write, stderr=subprocess.PIPE, text=True, timeout=600)
    finally:
        os.close(write)


@pytest.mark.parametrize("command", [["plugins"], ["plugins", "--json"], ["--help"], ["inspect", "ENGINE"],
                                     ["check", "MODEL"]], ids=" ".join)
def test_closed_stdout_is_no_traceback(command, engine, models):
    args = [{"ENGINE": engine, "MODEL": models("two")}.get(a, a) for a in command]
    r = _into_closed_pipe(*args)
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr
    assert r.stderr == ""
    assert r.returncode in (0, 1)
