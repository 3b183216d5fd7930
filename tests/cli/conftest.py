"""CLI tests run `kiln` as a user types it (in-process through kiln.cli.main; as a subprocess where start-up or
a closed pipe is tested) and check exit codes, stderr and the files left behind."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from _cli import lstm_model, scalar_input_model, two_inputs_model


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``models("two")`` → the path of that small ONNX model, written once per session."""
    root = tmp_path_factory.mktemp("cli_models")
    makers = {"two": two_inputs_model, "scalar": scalar_input_model, "lstm": lstm_model}
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = makers[name](root / f"{name}.onnx")
        return made[name]
    return get


@pytest.fixture(scope="session")
def engine(models: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CPU engine of the two-input model (profile a:1..4x8, b:2x1x4), built in-process once."""
    import kiln
    path = tmp_path_factory.mktemp("cli_engines") / "two.kiln"
    config = kiln.BuildConfig(device="cpu", profiles={"a": ((1, 8), (2, 8), (4, 8)), "b": (2, 1, 4)})
    kiln.build(kiln.onnx.parse(str(models("two"))), config).save(str(path))
    return path
