"""The fused LSTM/GRU tactics against the ONNX step-by-step definition (the loop tactic, itself
checked by the ONNX conformance suite); on the GPU, cuDNN gets its weights as one flat buffer
(no per-call repacking)."""
from __future__ import annotations

import warnings

import pytest
import torch

from kiln.kernels.registry import KernelContext, get_tactic


def _inputs(cell, dirs, T=5, N=3, I=8, H=6, dev="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    k = 4 if cell == "lstm" else 3
    X = torch.randn(T, N, I, generator=g)
    W = torch.randn(dirs, k * H, I, generator=g) * 0.3
    R = torch.randn(dirs, k * H, H, generator=g) * 0.3
    B = torch.randn(dirs, 2 * k * H, generator=g) * 0.3
    return [t.to(dev) for t in (X, W, R, B)], H


def _attrs(cell, direction, H):
    a = {"cell": cell, "hidden_size": H, "direction": direction}
    return {**a, "linear_before_reset": 1} if cell == "gru" else a


def _loop_name():
    from kiln.kernels.registry import TACTICS, _load_all
    _load_all()
    return next(t.name for t in TACTICS["RNN"] if not t.name.startswith("fused"))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_fused_matches_the_loop(cell, direction):
    dirs = 2 if direction == "bidirectional" else 1
    (X, W, R, B), H = _inputs(cell, dirs)
    attrs = _attrs(cell, direction, H)
    got = get_tactic("RNN", f"fused_{cell}").make(attrs, KernelContext())(X, W, R, B)
    want = get_tactic("RNN", _loop_name()).make(attrs, KernelContext())(X, W, R, B)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gpu_weights_are_one_flat_buffer(cell):
    (X, W, R, B), H = _inputs(cell, 2, dev="cuda")
    attrs = _attrs(cell, "bidirectional", H)
    run = get_tactic("RNN", f"fused_{cell}").make(attrs, KernelContext(device="cuda"))
    with warnings.catch_warnings(record=True) as caught, torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        warnings.simplefilter("always")                   # exact FP32: cuDNN's RNNs default to TF32
        got = run(X, W, R, B)
        run(X, W, R, B)
    assert not [w for w in caught if "contiguous chunk" in str(w.message)], [str(w.message) for w in caught]
    want = get_tactic("RNN", f"fused_{cell}").make(attrs, KernelContext())(*[t.cpu() for t in (X, W, R, B)])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_weights_computed_per_run_are_not_kept(cell):
    """Weights that are new tensors on every run (computed inside the model, as in an If branch) are repacked
    each run and not kept: the tactic holds no reference to an earlier run's weights, so memory does not grow;
    the same weight tensors run after run still give the same results."""
    import gc
    import weakref
    (X, W, R, B), H = _inputs(cell, 1)
    run = get_tactic("RNN", f"fused_{cell}").make(_attrs(cell, "forward", H), KernelContext(device="cpu"))
    first = run(X, W, R, B)[0]
    refs = []
    for k in range(5):
        w, r, b = W.clone(), R.clone(), B.clone()
        refs.append(weakref.ref(w))
        torch.testing.assert_close(run(X, w, r, b)[0], first, rtol=0, atol=0)
        del w, r, b
    gc.collect()
    assert sum(ref() is not None for ref in refs) <= 1      # at most the last run's weights are held
