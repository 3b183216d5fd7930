"""No copies in the attention blocks: every step of the BERT and nn.MultiheadAttention engines either
computes something or is a view (tests/passes/view_copies.py counts, step by step). The only copying
steps left are the Casts at the network's edges (attention_mask to bool, FP16 output to FP32)."""
from __future__ import annotations

import mini_transformers as mt
import pytest
import torch
import torch.nn.functional as F
from view_copies import _CopyOps, count_copies


def _copying(engine, feeds) -> list[str]:
    return [f"{r.kind} {r.name} {r.copy_ops}" for r in count_copies(engine, feeds) if r.copies and r.kind != "Cast"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_bert_steps_copy_nothing(precision):
    model, feeds = mt.bert()
    engine = mt.build(model, feeds, precision=precision)
    assert _copying(engine, feeds) == []
    casts = [r.name for r in count_copies(engine, feeds) if r.copies]
    assert len(casts) == (1 if precision == "fp32" else 2)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_mha_steps_copy_nothing(precision):
    model, feeds = mt.mha(blocks=2)
    engine = mt.build(model, feeds, precision=precision)
    assert _copying(engine, feeds) == []
    kinds = [layer["kind"] for layer in engine.layers]
    # per block: LN, QKV projection, one Shuffle + 3 Selects (q, k, v as views), attention, one Shuffle
    # into the out-projection, add+LN, MLP (2 FC), add(+LN)
    assert kinds.count("Shuffle") == 4 and kinds.count("Select") == 6 and "Gemm" not in kinds
    if precision == "fp32":
        mt.check(model, engine, feeds)


def test_the_exported_chain_copies_without_the_view_rewrites(monkeypatch):
    """The counter sees what the rewrites remove: without sink_shuffles/collapse_views, each block
    copies q, k and v (a Reshape of a selected slice of the packed projection). The Reshape merging
    the attention output's S and B is a view here only because the CPU's SDPA lays its output out
    like q ([S, B] order); flash attention on a GPU returns [B, S] order and that Reshape copies too."""
    import importlib

    from kiln.passes import fusion_passes
    build = importlib.import_module("kiln.builder.build")
    keep = [p for p in fusion_passes() if p.name not in ("shuffles through linear layers", "view-chain collapse")]
    monkeypatch.setattr(build, "fusion_passes", lambda device=None: keep)
    model, feeds = mt.mha(blocks=2)
    engine = mt.build(model, feeds)
    rows = [r for r in count_copies(engine, feeds) if r.copies]
    assert len(rows) == 6 and all(r.kind == "Shuffle" and r.copy_ops == ["clone"] for r in rows)
    mt.check(model, engine, feeds)


def test_layer_norm_casts_neither_input_nor_weights_per_call():
    """The Normalization torch tactic: no FP32 copy of an FP16 input on the fused path (this was one
    direct_copy_kernel per LayerNorm on the GPU), and an FP32 weight is cast once, not per call."""
    from kiln.kernels import KernelContext
    from kiln.kernels.reduce import make_normalization
    run = make_normalization({"type": "layer", "axis": -1, "epsilon": 1e-5}, KernelContext())
    x = torch.randn(4, 6, 32).half()
    w16, b16 = (torch.rand(32) + 0.5).half(), torch.randn(32).half()
    with torch.no_grad(), _CopyOps() as mode:
        (y,) = run(x, w16, b16)
    assert mode.ops == []
    torch.testing.assert_close(y.float(), F.layer_norm(x.float(), (32,), w16.float(), b16.float(), 1e-5),
                               rtol=2e-3, atol=2e-3)
    w32, b32 = w16.float(), b16.float()
    run(x, w32, b32)
    with torch.no_grad(), _CopyOps() as mode:
        (y2,) = run(x, w32, b32)
    assert mode.ops == []
    torch.testing.assert_close(y2, y)


def test_kernel_attribution_runs_step_by_step():
    """``kernels=True`` profiles one run and gives each step the CUDA kernels it launched (none on a CPU)."""
    model, feeds = mt.mha(blocks=1)
    engine = mt.build(model, feeds)
    rows = count_copies(engine, feeds, kernels=True)
    assert [r.name for r in rows] == [layer["name"] for layer in engine.layers]
    if not torch.cuda.is_available():
        assert all(r.kernels == [] for r in rows)
