"""Small real-world-shaped models: Kiln's outputs against ONNX Runtime's on the same inputs.

CPU/FP32 must agree within float32 rounding at two batch sizes of one profile;
CUDA engines are checked by relative L2 error: FP32 ≤ 1e-4, FP16 ≤ 1e-2, BF16 ≤ 3e-2.
"""
from __future__ import annotations

import numpy as np
import pytest

import kiln
import kiln.onnx
from _models import BATCHES, BUILDERS, ModelCase, assert_close_fp32, ort_run, rel_l2

NAMES = list(BUILDERS)
BN_MODELS = ("conv_bn", "mini_yolo", "unet", "mobilenet_v3")
GPU_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}     # relative L2 error vs ORT CPU FP32


def _engine(case: ModelCase, device: str, precision: str = "fp32"):
    network = kiln.onnx.parse(case.path)
    return kiln.build(network, kiln.BuildConfig(precision=precision, device=device, profiles=case.profiles()))


def _shape_variants(case: ModelCase) -> list[dict[str, int]]:
    """Each batch size, and for sequence models the ends of the sequence range as well."""
    out: list[dict[str, int]] = [case.sizes(b) for b in BATCHES]
    if "S" in case.ranges:
        lo, _, hi = case.ranges["S"]
        out += [case.sizes(2, S=lo), case.sizes(2, S=hi)]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_cpu_fp32_matches_onnxruntime(name: str, model_case, cpu_engine) -> None:
    case = model_case(name)
    ctx = cpu_engine(name).context()
    for i, sizes in enumerate(_shape_variants(case)):
        batch = sizes.pop("B")
        feeds = case.feeds(batch, seed=i, **sizes)
        ref = ort_run(case.path, feeds)
        got = ctx.run(feeds)
        assert sorted(got) == sorted(ref), f"{name}: outputs {sorted(got)} != {sorted(ref)}"
        for out in ref:
            assert isinstance(got[out], np.ndarray)
            assert_close_fp32(got[out], ref[out], f"{name} output {out!r} at batch {batch} {sizes}")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_cpu_low_precision_within_tolerance(name: str, precision: str, model_case) -> None:
    """The FP16/BF16 rewrite (edge casts, narrowed weights, FP32 statistics) checked on the CPU, same limits as CUDA."""
    case = model_case(name)
    ctx = _engine(case, "cpu", precision).context()
    feeds = case.feeds(BATCHES[-1], seed=11)
    ref = ort_run(case.path, feeds)
    got = ctx.run(feeds)
    for out in ref:
        assert got[out].dtype == ref[out].dtype, f"{name} {precision} {out}: outputs keep their declared dtype"
        err = rel_l2(got[out], ref[out])
        assert err <= GPU_TOLERANCE[precision], f"{name} {precision} {out!r}: relative L2 {err:.3g}"


@pytest.mark.parametrize("name", BN_MODELS)
def test_batchnorm_is_folded_in_engine(name: str, model_case, cpu_engine) -> None:
    """The exported graphs keep BatchNormalization nodes; the engine must not run any."""
    import onnx
    case = model_case(name)
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(case.path)).graph.node)
    engine = cpu_engine(name)
    left = [l["name"] for l in engine.layers if l["kind"] == "Normalization" and l["attrs"].get("type") == "batch"]
    assert not left, f"{name}: BatchNorm layers survived the build: {left}"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_onnxruntime(name: str, precision: str, model_case) -> None:
    import torch
    case = model_case(name)
    engine = _engine(case, "cuda", precision)
    ctx = engine.context()
    tol = GPU_TOLERANCE[precision]
    for i, sizes in enumerate(_shape_variants(case)):
        batch = sizes.pop("B")
        feeds = case.feeds(batch, seed=i, **sizes)
        ref = ort_run(case.path, feeds)
        got = ctx.run(feeds)                                           # numpy in → numpy out
        dev = ctx.run({k: torch.from_numpy(v).cuda() for k, v in feeds.items()})   # torch in → torch out
        for out in ref:
            assert got[out].dtype == ref[out].dtype and got[out].shape == ref[out].shape
            assert np.isfinite(got[out]).all(), f"{name} {precision} {out}: non-finite values"
            err = rel_l2(got[out], ref[out])
            assert err <= tol, f"{name} {precision} {out!r} batch {batch}: relative L2 {err:.3g} > {tol}"
            assert dev[out].is_cuda
            assert rel_l2(dev[out].cpu().numpy(), got[out]) <= tol / 10, f"{name} {precision}: torch and numpy runs differ"
