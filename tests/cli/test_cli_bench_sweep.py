"""`kiln bench` with several shape sets: one row per set (median, p90, items/s), in one run."""
from __future__ import annotations

import json

import pytest
from _cli import assert_user_error, kiln

from kiln.cli.bench import shape_sets
from kiln.errors import KilnError


def test_shape_sets_split_on_semicolons_and_repeated_inputs():
    assert shape_sets(None) == [{}]
    assert shape_sets(["a:1x8", "b:2x1x4"]) == [{"a": (1, 8), "b": (2, 1, 4)}]             # one set, as today
    assert shape_sets(["a:1x8", "a:4x8"]) == [{"a": (1, 8)}, {"a": (4, 8)}]
    assert shape_sets(["a:1x8;a:2x8", "a:3x8,b:2x1x4"]) == [{"a": (1, 8)}, {"a": (2, 8)},
                                                             {"a": (3, 8), "b": (2, 1, 4)}]
    assert shape_sets(["a:1x8", "b:2x1x4;a:2x8"]) == [{"a": (1, 8), "b": (2, 1, 4)}, {"a": (2, 8)}]
    with pytest.raises(KilnError, match="two shapes"):
        shape_sets(["a:1x8,a:2x8"])


def test_sweep_prints_one_row_per_shape_set(engine):
    r = kiln("bench", engine, "--shapes", "a:1x8", "--shapes", "a:4x8", "--shapes", "a:2x8;a:3x8",
             "--iterations", "5", "--warmup", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("shapes")))
    assert lines[head].split() == ["shapes", "median", "ms", "p90", "ms", "items/s"]
    rows = lines[head + 1:]
    assert [row.split(",")[0] for row in rows] == ["a=1x8", "a=4x8", "a=2x8", "a=3x8"], r.stdout
    for row, batch in zip(rows, (1, 4, 2, 3)):
        assert "b=2x1x4" in row                          # the input no set names runs at its opt shape
        median, p90, items = map(float, row.split()[-3:])
        assert 0 < median <= p90
        # the median is printed to 4 decimals: items/s from it is off by up to 0.5e-4 / median, relatively
        assert items == pytest.approx(batch * 1e3 / median, rel=0.5e-4 / median + 1e-4, abs=0.1)


def test_sweep_as_json(engine):
    r = kiln("bench", engine, "--shapes", "a:1x8;a:4x8", "--iterations", "3", "--warmup", "0", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    sweep = json.loads(r.stdout)["sweep"]
    assert [s["shapes"] for s in sweep] == [{"a": [1, 8], "b": [2, 1, 4]}, {"a": [4, 8], "b": [2, 1, 4]}]
    assert all(s["iterations"] == 3 and s["latency_ms"]["median"] > 0 for s in sweep)


def test_sweep_refusals_are_one_line(engine):
    assert_user_error(kiln("bench", engine, "--shapes", "a:1x8;a:2x8", "--profile"), "--profile", "2")
    assert_user_error(kiln("bench", engine, "--shapes", "a:1x8;a:9x8", "--iterations", "1"), "'a'", "(9, 8)",
                      "profile")
    assert_user_error(kiln("bench", engine, "--shapes", "a:1x8;c:2x8", "--iterations", "1"), "'c'",
                      "not an input", "['a', 'b']")
