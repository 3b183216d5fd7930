"""The README's examples run as written (Polygraphy's habit): a drifting README is a bug."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_has_exactly_two_commands():
    text = README.read_text()
    quick = text.split("## Quickstart", 1)[1].split("```", 2)[1]
    commands = [line for line in quick.strip().splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_hand_built_network_example_runs(capsys):
    block = next(b for b in _blocks() if "kiln.Network(" in b)
    exec(compile(block, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "(2, 8)"
