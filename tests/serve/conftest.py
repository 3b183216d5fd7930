"""Serving tests: one repository of tiny CPU engines per session, and one shared server over it."""
from __future__ import annotations

from pathlib import Path

import pytest
from _serve import Mlp, ServerProcess, build, make_mlp, make_scale

MLP_PROFILE = {"x": ((1, 8), (4, 8), (16, 8))}
SCALE_PROFILE = {"x": ((1, 1), (2, 4), (8, 16)), "k": ((1, 1), (2, 4), (8, 16))}


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Mlp]:
    """A folder with mlp.kiln (x [N,8] -> y [N,4], N 1..16) and scale.kiln (x, k [N,L] -> out, N 1..8, L 1..16)."""
    root = tmp_path_factory.mktemp("serve_repo")
    src = tmp_path_factory.mktemp("serve_onnx")
    mlp = make_mlp(src / "mlp.onnx")
    build(src / "mlp.onnx", root / "mlp.kiln", MLP_PROFILE)
    make_scale(src / "scale.onnx")
    build(src / "scale.onnx", root / "scale.kiln", SCALE_PROFILE)
    return root, mlp


@pytest.fixture(scope="session")
def server(repo: tuple[Path, Mlp]):
    """`kiln serve` on the repository (HTTP and gRPC, batching with a 2 ms queue delay)."""
    proc = ServerProcess(repo[0], "--max-queue-delay-us", "20000", "--max-request-mb", "1")   # 20 ms: concurrent requests merge even on a busy machine
    yield proc
    proc.stop()
