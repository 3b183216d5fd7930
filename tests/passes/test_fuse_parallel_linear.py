"""Parallel linear layers over one input merge into one GEMM + a Split (passes/fuse_parallel_linear.py):
the engines compute what ONNX Runtime computes on the unmerged models, the split outputs keep the
ONNX names, and only layers that can share one GEMM are merged."""
from __future__ import annotations

import mini_transformers as mt
import numpy as np
import torch

import kiln


def _kinds(engine, kind):
    return [layer for layer in engine.layers if layer["kind"] == kind]


def test_bert_query_key_value_become_one_gemm():
    model, feeds = mt.bert(layers=2)
    engine = mt.build(model, feeds)
    fcs = _kinds(engine, "FullyConnected")
    splits = [s for s in _kinds(engine, "Split") if s["inputs"][0] in {fc["outputs"][0] for fc in fcs}]
    assert len(splits) == 2 and len(fcs) == 2 * 4     # per layer: one q/k/v GEMM, output, two MLP GEMMs
    assert all(s["attrs"]["split"] == [64, 64, 64] for s in splits)
    names = {o for s in splits for o in s["outputs"]}
    assert any("query" in n for n in names) and any("value" in n for n in names)
    mt.check(model, engine, feeds)


class _Heads(torch.nn.Module):
    """Four linear layers over x: a, b (no bias) and c merge; d (ReLU) keeps its own GEMM."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(16, 8), torch.nn.Linear(16, 12, bias=False), torch.nn.Linear(16, 4)
        self.d = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.a(x) * 2.0, self.b(x), self.c(x) - 1.0, torch.relu(self.d(x))


def test_merges_what_shares_a_gemm_and_keeps_outputs():
    x = np.random.default_rng(1).standard_normal((3, 5, 16)).astype(np.float32)
    model = mt.export(_Heads(), (torch.from_numpy(x),), ["x"], ["a", "b", "c", "d"])
    engine = mt.build(model, {"x": x})
    fcs = _kinds(engine, "FullyConnected")
    assert len(fcs) == 2
    merged = [fc for fc in fcs if not fc["attrs"].get("activation")]
    assert len(merged) == 1
    (split,) = [s for s in _kinds(engine, "Split") if s["inputs"][0] == merged[0]["outputs"][0]]
    assert split["attrs"]["split"] == [8, 12, 4]
    assert "b" in split["outputs"]                         # a network output keeps its name
    mt.check(model, engine, {"x": x})


def test_fp16_cpu_engine_still_matches():
    model, feeds = mt.bert(layers=1)
    engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu", precision="fp16",
                                                                  profiles={n: v.shape for n, v in feeds.items()}))
    assert _kinds(engine, "Split")
    mt.check(model, engine, feeds, tol=3e-2)
