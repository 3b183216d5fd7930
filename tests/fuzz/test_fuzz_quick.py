"""The fuzzing harness in CI: a fixed-seed quick run over every target, plus checks that its judges can fail.

The quick run is a few hundred cases (engines, ONNX models, every viewer format with a seed)
on two workers; it must report no failure at all. ``scripts/fuzz.py`` is the long run.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fuzz import oracle, runner, seeds

QUICK = {"engine": 120, "onnx": 80, "view": 8}      # 8 per viewer format
QUICK_SEED = 20240601


def test_quick_fuzz(tmp_path: Path) -> None:
    report = runner.run(QUICK, tmp_path, seed=QUICK_SEED, workers=2, timeout=20.0)
    expected = QUICK["engine"] + QUICK["onnx"] + QUICK["view"] * len(seeds.viewer_formats())   # every format seeded
    assert len(report.results) == expected, report.summary()
    if report.seed_failures or report.failed():
        pytest.fail(f"\n{report.summary()}\n(failing cases are kept under {tmp_path / 'cases'}; rerun one with: "
                    f"python scripts/fuzz.py --seed {QUICK_SEED} --case TARGET:INDEX -v)", pytrace=False)


def test_runner_reports_hangs_and_crashes(tmp_path: Path) -> None:
    """A worker that stops answering is a hang, one that dies is a crash; the next case still runs."""
    runner._layout(tmp_path)
    env = runner._env(tmp_path)

    def new() -> runner._Proc:
        return runner._Proc(tmp_path, 0, False, 0, env)
    procs = [new()]
    report = runner.Report()
    try:
        runner.dispatch([("probe", 0), ("probe", 1), ("probe", 2)], procs, report, new, timeout=5.0, warm=False)
    finally:
        for p in procs:
            p.kill()
    kinds = {r.index: [f["kind"] for f in r.failures] for r in report.results}
    assert kinds == {0: ["hang"], 1: ["crash"], 2: []}


_WATCHES: list[oracle.Watch] = []     # audit hooks cannot be removed: one per process, reading the latest watch


@pytest.fixture
def watch() -> oracle.Watch:
    if not _WATCHES:
        sys.addaudithook(lambda event, args: _WATCHES[-1].hook(event, args) if _WATCHES else None)
    _WATCHES.append(oracle.Watch(oracle.allowed_roots(Path("/nonexistent-run"))))
    return _WATCHES[-1]


def _judge(monkeypatch, tmp_path: Path, watch: oracle.Watch, fake, argv=("run", "x.kiln")) -> list[str]:
    import kiln.cli
    monkeypatch.setattr(kiln.cli, "main", fake)
    return [f.kind for f in oracle.run_call(list(argv), tmp_path, watch, "SECRET-123")[1]]


def test_oracle_passes_a_clean_refusal(monkeypatch, tmp_path, watch) -> None:
    def refuse(argv):
        (tmp_path / "inside.txt").write_text("ok")
        print("kiln: error: 'x.kiln' is damaged; rebuild it.", file=sys.stderr)
        return 2
    assert _judge(monkeypatch, tmp_path, watch, refuse) == []


@pytest.mark.parametrize("kind", ["traceback", "exit", "stderr", "escape", "secret", "html"])
def test_oracle_catches(kind, monkeypatch, tmp_path, watch) -> None:
    outside = tmp_path.parent / f"outside-{kind}.txt"
    outside.write_text("SECRET-123")
    case = tmp_path / "case"
    case.mkdir()

    def bad(argv):
        if kind == "traceback":
            raise KeyError("name")
        if kind == "exit":
            return 1
        if kind == "stderr":
            print("kiln: error: one\nand two", file=sys.stderr)
            return 2
        if kind == "escape":
            with open(outside, "rb"):
                return 0
        if kind == "secret":
            print(outside.read_text())
            return 0
        (case / "v.html").write_text('<script id="kiln-data" type="application/json">{"n": "<!--<script>"}</script>')
        return 0
    argv = ("view", "m.onnx", "--export", str(case / "v.html")) if kind == "html" else ("run", "x.kiln")
    assert kind in _judge(monkeypatch, case, watch, bad, argv)
