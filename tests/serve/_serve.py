"""Helpers for the serving tests: tiny CPU engines with numpy references, and `kiln serve` as a subprocess."""
from __future__ import annotations

import asyncio
import importlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

EPS32 = float(np.finfo(np.float32).eps)


def triton_client(module: str):
    """``tritonclient.http`` or ``tritonclient.grpc``, or skip the calling test module where it cannot load
    (tritonclient's HTTP package raises RuntimeError, not ImportError, without its geventhttpclient extra)."""
    try:
        return importlib.import_module(module)
    except (ImportError, RuntimeError) as e:
        extra = module.rsplit(".", 1)[-1]
        pytest.skip(f"needs tritonclient[{extra}] ({str(e).splitlines()[0][:120]})", allow_module_level=True)


def run_async(coro, timeout: float = 60):
    """``coro``'s result, run to completion within ``timeout`` seconds on a new event loop in its own thread (the
    test process may already run a loop in this thread: Playwright's session-wide sync API does)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, asyncio.wait_for(coro, timeout)).result()


@dataclass
class Mlp:
    """y = relu(x @ W + b): x [N, 8] float32, y [N, 4]; rows are independent, so batches can merge."""

    W: np.ndarray
    b: np.ndarray

    def reference(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The float64 answer and a bound on float32 rounding (every product and partial sum rounds once)."""
        x64 = x.astype(np.float64)
        y = np.maximum(x64 @ self.W + self.b, 0.0)
        bound = 4 * (self.W.shape[0] + 2) * EPS32 * (np.abs(x64) @ np.abs(self.W) + np.abs(self.b)) + 1e-30
        return y, bound

    def check(self, x: np.ndarray, y: np.ndarray) -> None:
        ref, bound = self.reference(x)
        assert y.shape == ref.shape and y.dtype == np.float32, (y.shape, y.dtype)
        assert np.all(np.abs(y - ref) <= bound), np.max(np.abs(y - ref) - bound)


def make_mlp(onnx_path: Path, seed: int = 0) -> Mlp:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((8, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["hb"]),
         helper.make_node("Relu", ["hb"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(onnx_path))
    return Mlp(W.astype(np.float64), b.astype(np.float64))


def make_scale(onnx_path: Path) -> None:
    """out = x * Cast(k): x [N, L] float32 and k [N, L] int64, L dynamic (two inputs, an integer one)."""
    g = helper.make_graph(
        [helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT), helper.make_node("Mul", ["x", "kf"], ["out"])],
        "scale", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L"]),
                  helper.make_tensor_value_info("k", TensorProto.INT64, ["N", "L"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", "L"])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(onnx_path))


def build(onnx_path: Path, engine_path: Path, profiles: dict) -> Path:
    import kiln
    config = kiln.BuildConfig(device="cpu", profiles=profiles)
    kiln.build(kiln.onnx.parse(str(onnx_path)), config).save(str(engine_path))
    return engine_path


LINE = re.compile(r"kiln serve: (?:HTTP on http://(?P<http>[^,;]+))?(?:, )?(?:gRPC on (?P<grpc>[^;]+))?; models")


class ServerProcess:
    """`python -m kiln.serve REPO --http-port 0 --grpc-port 0 FLAGS` with its ports, stopped with SIGINT."""

    def __init__(self, repo: Path, *flags: str, timeout: float = 180.0) -> None:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
        fd, name = tempfile.mkstemp(prefix="kiln-serve-", suffix=".err")
        self.stderr_path = Path(name)
        self._err = os.fdopen(fd, "w+b")
        args = [sys.executable, "-m", "kiln.serve", str(repo), "--http-port", "0", "--grpc-port", "0", *flags]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._err, env=env)
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line or LINE.search(line.decode()):
                break
        m = LINE.search(line.decode())
        if not m:
            self.stop()
            raise RuntimeError(f"kiln serve did not start: {line!r} {self.stderr()[-3000:]}")
        self.http = m.group("http")
        self.grpc = m.group("grpc")

    def stderr(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.stderr_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.interrupt()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        return self.proc.returncode
