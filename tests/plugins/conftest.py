"""Plugin tests: both tactics against independent references (ONNX Runtime, torch, numpy).

Without a GPU the Triton tactic runs on CPU tensors through Triton's interpreter. Triton
fixes interpreted-vs-compiled when a kernel is defined (the plugin modules define theirs
at import) and, for its own standard library (tl.max, tl.sigmoid, ...), when
``triton.language`` is first imported; so TRITON_INTERPRET is set here, before anything
imports Triton or the built-in plugins. With a GPU the same tests run the compiled
kernels on CUDA tensors.
"""
from __future__ import annotations

import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
_TRITON_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from types import SimpleNamespace  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kiln.plugins  # noqa: E402

kiln.plugins.load_builtins()
DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _triton_mode_is_usable(request: pytest.FixtureRequest) -> None:
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("tactic", "").startswith("triton") and not HAS_CUDA and _TRITON_PREIMPORTED:
        pytest.fail("Triton was imported before tests/plugins/conftest.py could set TRITON_INTERPRET=1, so its "
                    "kernels cannot run on CPU; export TRITON_INTERPRET=1 or run tests/plugins on its own.")


def run_onnx_node(op: str, opset: int, inputs: Sequence[tuple[str, Any]], outputs: Sequence[str],
                  **attrs: Any) -> list[np.ndarray]:
    """Build a one-node ONNX model and run it in ONNX Runtime (the independent reference).

    ``inputs`` is a list of (name, array); a name of "" marks an omitted optional input.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper

    feeds = {n: a for n, a in inputs if n}
    vis = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
           for n, a in feeds.items()]
    outs = [onnx.ValueInfoProto(name=o) for o in outputs]
    node = helper.make_node(op, [n for n, _ in inputs], list(outputs), **attrs)
    graph = helper.make_graph([node], f"{op.lower()}_ref", vis, outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(list(outputs), feeds)


def desc_of(t: Any) -> Any:
    from kiln.plugins import TensorDesc

    if t is None:
        return None
    return TensorDesc(tuple(t.shape), str(t.dtype).replace("torch.", ""))


def make_workspace(plugin: Any, descs: list, device: Any = "cpu") -> Any:
    """A uint8 workspace of the plugin's declared size, as the runtime hands it over (None for 0)."""
    n = plugin.workspace_size(descs)
    return torch.empty(n, dtype=torch.uint8, device=device) if n else None


def run_plugin(plugin: Any, inputs: list, tactic: str) -> list:
    """Allocate outputs from output_descs (filled with junk) and call forward, as the runtime does."""
    descs = [desc_of(t) for t in inputs]
    device = next(t.device for t in inputs if t is not None)
    ws = make_workspace(plugin, descs, device)
    if plugin.data_dependent_shapes:
        return list(plugin.forward(inputs, None, ws, tactic))
    outs = [torch.full(tuple(d.shape), 7.0, device=device).to(getattr(torch, d.dtype))
            for d in plugin.output_descs(descs)]
    ret = plugin.forward(inputs, outs, ws, tactic)
    assert ret is None or all(a is b for a, b in zip(ret, outs))
    return outs


def to_dev(*arrays: Any) -> list:
    """numpy arrays -> torch tensors on the test device (None stays None)."""
    return [None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE) for a in arrays]


@pytest.fixture
def ref() -> SimpleNamespace:
    return SimpleNamespace(onnx=run_onnx_node, run=run_plugin, workspace=make_workspace, desc=desc_of,
                           dev=to_dev, device=DEVICE)
