"""CUDA-graph runner: importable everywhere, and it declines what cannot be captured."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.runtime.graphs import CaptureError, GraphRunner


def _engine():
    net = kiln.Network("g")
    x = net.add_input("x", "float32", (2, 3))
    net.mark_output(net.add_activation(x, "relu").output, "y")
    return kiln.build(net, kiln.BuildConfig(device="cpu"))


def test_runner_declines_sequence_inputs():
    runner = GraphRunner(_engine().context().program)
    assert runner.capturable
    with pytest.raises(CaptureError):
        runner.run([[torch.zeros(2, 3)]])


def _fc_relu_on_gpu():
    """y = relu(x @ W.T) with a dynamic batch, built for CUDA: (graph context, eager context)."""
    net = kiln.Network("g")
    x = net.add_input("x", "float32", ("b", 8))
    h = net.add_fully_connected(x, np.random.randn(16, 8).astype(np.float32), np.zeros(16, np.float32))
    net.mark_output(net.add_activation(h.output, "relu").output, "y")
    eng = kiln.build(net, kiln.BuildConfig(device="cuda", profiles={"x": ((1, 8), (4, 8), (8, 8))}))
    return eng.context(), eng.context(cuda_graph=False)


@pytest.mark.gpu
def test_replay_matches_eager_and_outputs_are_copied():
    ctx, eager = _fc_relu_on_gpu()
    a = torch.randn(4, 8, device="cuda")
    y1 = ctx.run({"x": a})["y"]
    assert ctx.graphs is not None and ctx.graph_error is None
    y2 = ctx.run({"x": a * 2})["y"]            # the first run was the eager warm-up; this one records
    y3 = ctx.run({"x": a * 3})["y"]            # and this one replays
    torch.testing.assert_close(y1, eager.run({"x": a})["y"])
    torch.testing.assert_close(y2, eager.run({"x": a * 2})["y"])
    torch.testing.assert_close(y3, eager.run({"x": a * 3})["y"])


@pytest.mark.gpu
def test_same_input_buffers_are_bound_without_a_copy():
    """A caller that refills one input tensor gets a graph reading it in place (no copy kernel);
    other tensors still go through the copying graph, and every result is the eager one."""
    ctx, eager = _fc_relu_on_gpu()
    buf = torch.randn(4, 8, device="cuda")

    def want(t):
        return eager.execute([t], copy=True)[0]

    for step in range(4):
        buf.copy_(torch.randn(4, 8, device="cuda"))          # the serving loop refills its buffer
        got = ctx.execute([buf], copy=True)[0]
        torch.testing.assert_close(got, want(buf))
    (entry,) = ctx.graphs.graphs.values()
    assert entry["bound"]["where"][0][0] == buf.data_ptr()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ctx.execute([buf])
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert not any("Memcpy" in n or "copy" in n.lower() for n in names), names
    other = torch.randn(4, 8, device="cuda")
    torch.testing.assert_close(ctx.execute([other], copy=True)[0], want(other))
    torch.testing.assert_close(ctx.execute([buf], copy=True)[0], want(buf))


def test_shape_of_a_device_tensor_copies_nothing() -> None:
    """A Shape layer runs on the host but reads only its input's dims: the device tensor stays where it is. A
    copy to the host there is a device-to-host transfer each run, and CUDA graph capture refuses it, so every
    range engine with a Shape of a device value (a dynamic-batch BERT) ran without graphs."""
    from kiln.runtime.program import Program
    plan = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["b", 3]}],
            "outputs": [{"name": "s", "dtype": "int64", "shape": [2]}],
            "tensors": {"s": {"dtype": "int64", "shape": [2], "host": True}},
            "layers": [{"name": "shape", "kind": "Shape", "inputs": ["x"], "outputs": ["s"], "attrs": {},
                        "tactic": "torch", "host": True}]}
    step = Program(plan, {}, "cuda").steps[0]          # setting the plan up touches no GPU
    assert step.targets == [None]
