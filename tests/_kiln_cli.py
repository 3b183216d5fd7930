"""``run_cli("build", ...)``: the `kiln` command run in this process, with what a subprocess would give back."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

KILN = [sys.executable, "-m", "kiln.cli"]


def run_cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``kiln ARGS`` in ``cwd`` through ``kiln.cli.main`` in this process, as ``python -m kiln.cli`` would
    with PYTHONWARNINGS=ignore: stdout/stderr as text; an exception that escapes main is printed as the
    interpreter would (its traceback, exit 1). The working folder and torch's thread count are restored."""
    from kiln.cli import main
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("ignore")
            try:
                code = main(argv)
            except SystemExit as stop:   # argparse's --help, --version and usage errors
                code = int(stop.code or 0)
            except Exception:            # a bug: the interpreter would print its traceback and exit 1
                traceback.print_exc(file=sys.stderr)
                code = 1
    finally:
        os.chdir(here)
        if threads is not None and sys.modules["torch"].get_num_threads() != threads:
            sys.modules["torch"].set_num_threads(threads)
    return subprocess.CompletedProcess([*KILN, *argv], code, out.getvalue(), err.getvalue())
