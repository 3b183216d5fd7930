"""Suite-wide test setup: skip GPU tests where torch sees no CUDA device; shared model cache."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))      # tests/_models.py for every test directory


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
