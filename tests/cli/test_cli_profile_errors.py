"""`kiln build` with a profile whose min > max or whose opt lies outside it: exit 2, one line, no file."""
from __future__ import annotations

from _cli import assert_user_error, kiln


def test_build_refuses_min_above_max_and_opt_outside(models, tmp_path):
    out = tmp_path / "two.kiln"
    r = kiln("build", models("two"), "-o", out, "--device", "cpu", "--min-shapes", "a:4x8,b:2x1x4",
             "--max-shapes", "a:2x8,b:2x1x4")
    assert_user_error(r, "'a'", "min 4 > max 2 in dim 0")
    r = kiln("build", models("two"), "-o", out, "--device", "cpu", "--min-shapes", "a:1x8,b:2x1x4",
             "--opt-shapes", "a:1x8,b:3x1x4", "--max-shapes", "a:2x8,b:2x1x4")
    assert_user_error(r, "'b'", "opt 3 outside [min 2, max 2] in dim 0")
    assert not out.exists()
