"""docs/contributing.md's "Adding a fusion rule" example, run as written: its module is executed, its
pass applied to ``x · clip(x + 3, 0, 6) / 6`` written in both operand orders, and the fused network's
values compared with numpy's HardSwish."""
from __future__ import annotations

import re
import types
from pathlib import Path

import numpy as np
import pytest

import kiln

DOC = Path(__file__).resolve().parents[2] / "docs" / "contributing.md"


def _example() -> types.ModuleType:
    text = DOC.read_text()
    section = text[text.index("### Worked example: HardSwish"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    mod = types.ModuleType("fuse_hard_swish")
    exec(compile(code, "docs/contributing.md (fuse_hard_swish.py)", "exec"), mod.__dict__)
    return mod


def _decomposed(swap: bool, hi: float = 6.0) -> kiln.Network:
    net = kiln.Network()
    x = net.add_input("x", "float32", (9,))
    shifted = net.add_elementwise(np.float32(3), x, "sum") if swap else net.add_elementwise(x, np.float32(3), "sum")
    clip = net.add_activation(shifted.output, "clip", alpha=0.0, beta=hi)
    prod = net.add_elementwise(clip.output, x, "prod") if swap else net.add_elementwise(x, clip.output, "prod")
    net.mark_output(net.add_elementwise(prod.output, np.float32(6), "div", name="div").output, "y")
    return net


@pytest.mark.parametrize("swap", [False, True])
def test_the_documented_rule_fuses_hard_swish(swap: bool) -> None:
    net = _decomposed(swap)
    assert _example().FuseHardSwish()(net).modified
    assert [(layer.kind, layer.attrs.get("type")) for layer in net.layers] == [("Activation", "hard_swish")]
    xv = np.linspace(-5, 5, 9, dtype=np.float32)
    y = kiln.build(net, kiln.BuildConfig(device="cpu")).context().run({"x": xv})["y"]
    ref = xv.astype(np.float64) * np.clip(xv.astype(np.float64) + 3, 0, 6) / 6
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


def test_the_documented_rule_declines_other_bounds(monkeypatch, capsys) -> None:
    monkeypatch.setenv("KILN_LOG", "passes")
    net = _decomposed(False, hi=5.0)
    assert not _example().FuseHardSwish()(net).modified
    assert "declined 1x: the clip is not to [0, 6]" in capsys.readouterr().err
    assert len(net.layers) == 4
