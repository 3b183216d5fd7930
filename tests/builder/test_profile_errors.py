"""A profile whose min > max, or whose opt lies outside [min, max], in any dim: one line at build naming the
input, the dim and the three values."""
from __future__ import annotations

import pytest

import kiln
from kiln.errors import BuildError


def _net() -> "kiln.Network":
    net = kiln.Network("p")
    x = net.add_input("x", "float32", ("b", 3, "n"))
    net.mark_output(net.add_activation(x, "relu").output, "y")
    return net


@pytest.mark.parametrize("mn, opt, mx, words", [
    ((8, 3, 4), (4, 3, 4), (2, 3, 4), ["min 8 > max 2 in dim 0", "(min 8, opt 4, max 2)"]),
    ((1, 3, 5), (1, 3, 5), (1, 3, 4), ["min 5 > max 4 in dim 2", "(min 5, opt 5, max 4)"]),
    ((1, 3, 4), (9, 3, 4), (8, 3, 4), ["opt 9 outside [min 1, max 8] in dim 0", "(min 1, opt 9, max 8)"]),
    ((1, 3, 2), (1, 3, 1), (1, 3, 4), ["opt 1 outside [min 2, max 4] in dim 2", "(min 2, opt 1, max 4)"]),
])
def test_bad_profile_is_one_line_naming_input_dim_and_values(mn, opt, mx, words) -> None:
    with pytest.raises(BuildError) as info:
        kiln.build(_net(), kiln.BuildConfig(device="cpu", profiles={"x": (mn, opt, mx)}))
    msg = str(info.value)
    assert "\n" not in msg and "'x'" in msg and all(w in msg for w in words), msg


def test_a_good_profile_builds() -> None:
    engine = kiln.build(_net(), kiln.BuildConfig(device="cpu", profiles={"x": ((1, 3, 2), (2, 3, 2), (4, 3, 8))}))
    assert engine.profiles == [{"x": {"min": [1, 3, 2], "opt": [2, 3, 2], "max": [4, 3, 8]}}]
