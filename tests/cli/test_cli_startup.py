"""Start-up: commands that only read files or list things do not import torch (seconds of start-up);
`kiln inspect` reads an engine header with the standard library and numpy; `kiln plugins` imports the
built-in plugins' Triton kernels, and Triton's interpreter (TRITON_INTERPRET=1, as on CI) imports numpy."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

_PROBE = ("import sys, io, json, contextlib, kiln.cli\n"
          "with contextlib.redirect_stdout(io.StringIO()):\n"
          "    code = kiln.cli.main(sys.argv[1:])\n"
          "print(json.dumps([code, sorted(m for m in ('torch', 'onnx', 'numpy') if m in sys.modules)]))\n")


def _imported(*args: object) -> tuple[int, list[str]]:
    r = subprocess.run([sys.executable, "-c", _PROBE, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    code, mods = json.loads(r.stdout)
    return code, mods


@pytest.mark.parametrize("command,allowed", [(["inspect", "ENGINE"], {"numpy"}), (["inspect", "ENGINE", "--json"],
                                             {"numpy"}), (["plugins"], {"numpy"}), (["check", "MODEL"], {"onnx", "numpy"})],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_reading_commands_do_not_import_torch(command, allowed, engine, models):
    code, mods = _imported(*[{"ENGINE": engine, "MODEL": models("two")}.get(a, a) for a in command])
    assert code == 0 and set(mods) <= allowed, mods


def test_parser_imports_nothing_heavy():
    r = subprocess.run([sys.executable, "-c", "import sys, kiln.cli; kiln.cli.make_parser(); "
                        "print(sorted(m for m in ('torch', 'onnx', 'numpy') if m in sys.modules))"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
