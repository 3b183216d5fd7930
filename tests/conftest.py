"""Suite-wide test setup: skip GPU tests where torch sees no CUDA device; tests marked serial only in the
Makefile's SERIAL_TESTS files; shared model cache."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))      # tests/_models.py for every test directory


def _serial_files() -> set[str]:
    """The test files the Makefile runs alone after the parallel run (its SERIAL_TESTS line)."""
    makefile = Path(__file__).parent.parent / "Makefile"
    for line in makefile.read_text().splitlines() if makefile.is_file() else []:
        if line.startswith("SERIAL_TESTS"):
            return set(line.split("=", 1)[1].split())
    return set()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent.parent
    listed = _serial_files()
    stray = sorted({str(Path(item.fspath).relative_to(root)) for item in items if "serial" in item.keywords
                    and Path(item.fspath).is_relative_to(root)} - listed) if listed else []
    if stray:       # `make test` would deselect them in the parallel run and never collect them in the serial one
        raise pytest.UsageError(f"tests marked serial in {', '.join(stray)}: add the file to SERIAL_TESTS in the Makefile")
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def model_case(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], object]:
    """Export each small test model once per session: ``model_case("mini_yolo")`` → ModelCase."""
    import _models
    root = tmp_path_factory.mktemp("models")
    cache: dict[str, object] = {}

    def get(name: str) -> object:
        if name not in cache:
            d = root / name
            d.mkdir()
            cache[name] = _models.BUILDERS[name](d)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def cpu_engine(model_case: Callable[[str], object]) -> Callable[[str], object]:
    """``cpu_engine("mini_yolo")`` → that model's FP32 CPU engine over its profile, built once per session
    (tests read, save and run it; none changes it)."""
    import kiln
    import kiln.onnx
    cache: dict[str, object] = {}

    def get(name: str) -> object:
        if name not in cache:
            case = model_case(name)
            config = kiln.BuildConfig(device="cpu", profiles=case.profiles())
            cache[name] = kiln.build(kiln.onnx.parse(case.path), config)
        return cache[name]
    return get


@pytest.fixture
def gpu_fusions(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU builds in this test run the fusions made for GPU kernels too (1×1 chains, projection sums, stem pooling:
    ``Pass.devices``), so that their rules, their layers' reference tactics and the engine file are tested here."""
    import importlib

    from kiln.passes import fusion_passes
    build = importlib.import_module("kiln.builder.build")      # the module: kiln.builder.build is also the function
    monkeypatch.setattr(build, "fusion_passes", lambda device=None: fusion_passes())
