"""Residual add + LayerNorm fusion (passes/fuse_add_norm.py): the fused engines compute what ONNX
Runtime computes on the unfused models; the sum becomes a second output only where it is read again."""
from __future__ import annotations

import io
import warnings

import mini_transformers as mt
import numpy as np
import pytest
import torch

import kiln


def _norms(engine) -> list[dict]:
    return [layer for layer in engine.layers if layer["kind"] == "Normalization"]


def _fed_by_sum(engine) -> list[str]:
    """Normalization layers still reading an ElementWise sum of two activations of its own shape."""
    sums = {layer["outputs"][0] for layer in engine.layers if layer["kind"] == "ElementWise"
            and layer["attrs"].get("op") == "sum"}
    return [n["name"] for n in _norms(engine) if n["inputs"][0] in sums]


def test_bert_post_ln_fuses_without_sum_output():
    model, feeds = mt.bert()
    engine = mt.build(model, feeds)
    fused = [n for n in _norms(engine) if len(n["inputs"]) == 6 and n["inputs"][5]]
    assert len(fused) == 4                                   # two per layer; the embedding sum broadcasts
    assert all(not n["attrs"]["sum_output"] and len(n["outputs"]) == 1 for n in fused)
    assert not _fed_by_sum(engine)
    assert not any(layer["kind"] == "ElementWise" and layer["attrs"].get("op") == "sum" for layer in engine.layers)
    mt.check(model, engine, feeds)


def test_vit_pre_ln_keeps_the_sum_as_second_output():
    model, feeds = mt.mha(blocks=2)
    engine = mt.build(model, feeds)
    fused = [n for n in _norms(engine) if len(n["inputs"]) == 6 and n["inputs"][5]]
    # block 0: +attn → ln_2, +mlp → block 1's ln_1; block 1: +attn → ln_2, +mlp → final ln
    assert len(fused) == 4
    assert [n["attrs"]["sum_output"] for n in fused] == [True, True, True, False]
    assert all(len(n["outputs"]) == (2 if n["attrs"]["sum_output"] else 1) for n in fused)
    assert not _fed_by_sum(engine)
    mt.check(model, engine, feeds)


def test_unfused_build_matches_too():
    model, feeds = mt.mha(blocks=1)
    engine = mt.build(model, feeds, level=0)
    assert not any(len(n["inputs"]) == 6 for n in _norms(engine))
    mt.check(model, engine, feeds)


class _SumOut(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = torch.nn.LayerNorm(24)
        self.ln.weight.data.uniform_(0.5, 1.5)
        self.ln.bias.data.normal_()

    def forward(self, a, b, c):
        s = a * 2.0 + b
        return s, self.ln(s), self.ln(a + c[0])      # the last sum broadcasts c over the batch


def test_sum_as_network_output_keeps_its_name_and_broadcast_sums_stay():
    torch.manual_seed(0)
    a, b, c = torch.randn(3, 5, 24), torch.randn(3, 5, 24), torch.randn(1, 5, 24)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_SumOut(), (a, b, c), f, input_names=["a", "b", "c"], output_names=["s", "y", "z"],
                          opset_version=17, dynamo=False)
    model = f.getvalue()
    feeds = {"a": a.numpy(), "b": b.numpy(), "c": c.numpy()}
    engine = mt.build(model, feeds)
    fused = [n for n in _norms(engine) if len(n["inputs"]) == 6]
    assert len(fused) == 1 and fused[0]["attrs"]["sum_output"] and fused[0]["outputs"][1] == "s"
    assert [o["name"] for o in engine.outputs] == ["s", "y", "z"]
    mt.check(model, engine, feeds)


def test_fused_engine_round_trips_through_a_file(tmp_path):
    model, feeds = mt.mha(blocks=1)
    engine = mt.build(model, feeds)
    path = tmp_path / "mha.kiln"
    engine.save(str(path))
    mt.check(model, kiln.load(str(path)), feeds)


def test_fp16_engine_stays_close_to_fp32():
    model, feeds = mt.mha(blocks=2)
    ref = mt.build(model, feeds).context().run(feeds)["y"]
    got = mt.build(model, feeds, precision="fp16").context().run(feeds)["y"]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-3


@pytest.mark.gpu
def test_gpu_build_times_the_triton_kernel_and_matches():
    model, feeds = mt.mha(batch=4, seq=33, d=96, heads=4, blocks=2)
    profiles = {n: tuple(v.shape) for n, v in feeds.items()}
    engine = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cuda", profiles=profiles, precision="fp16"))
    ref = mt.build(model, feeds).context().run(feeds)["y"]
    got = engine.context().run(feeds)["y"]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-3
    for tac in ("triton", "triton_row"):
        e = kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cuda", profiles=profiles, precision="fp16"))
        for layer in e.header["plan"]["layers"]:
            if layer["kind"] == "Normalization":
                layer["tactic"] = tac
        got = e.context().run(feeds)["y"]
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-3, tac
