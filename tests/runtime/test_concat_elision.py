"""Concatenation elision: a producer registered with ``writes_into`` writes its output straight
into its slice of the concatenation's buffer, the concatenation copies only the rest, and the
result equals torch.cat whatever the producers did."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kiln.kernels.registry import KernelContext, get_tactic  # noqa: E402
from kiln.runtime.concat_elision import elide_concats  # noqa: E402
from kiln.runtime.program import Step  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
UP = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}


def _program(up_uses: int = 1, axis: int = 1, channels=(6, 4)):
    """up = Resize(x) [writes_into]; conv = Convolution(y) [torch]; cat = Concatenation(up, conv)."""
    ctx = KernelContext(device=DEV)
    up = Step("up", "Resize", get_tactic("Resize", "triton_nearest_nhwc").make(UP, ctx), ["x", None, "s"], ["up"],
              [None] * 3, False, "triton_nearest_nhwc", "fp32")
    conv_attrs = {"stride": [1, 1], "pads": [0, 0, 0, 0], "dilation": [1, 1], "groups": 1}
    conv = Step("conv", "Convolution", get_tactic("Convolution", "torch").make(conv_attrs, ctx), ["y", "w"], ["conv"],
                [None] * 2, False, "torch", "fp32")
    cat = Step("cat", "Concatenation", get_tactic("Concatenation", "torch").make({"axis": axis}, ctx),
               ["up", "conv"], ["cat"], [None] * 2, False, "torch", "fp32")
    steps = [up, conv, cat]
    outputs = ["cat"] + (["up"] if up_uses > 1 else [])
    layers = [{"name": s.name, "kind": s.kind, "attrs": {"axis": axis} if s.kind == "Concatenation" else {}}
              for s in steps]
    tensors = {"up": {"shape": ["B", channels[0], 8, 6]}, "conv": {"shape": ["B", channels[1], 8, 6]},
               "cat": {"shape": ["B", sum(channels), 8, 6]}}
    prog = SimpleNamespace(steps=steps, outputs=outputs, constants={})
    return prog, {"layers": layers, "tensors": tensors}


def _run(prog, feeds):
    values = dict(feeds)
    for s in prog.steps:
        outs = s.fn(*[values[n] if n else None for n in s.ins])
        values.update(zip(s.outs, outs))
    return values


def _feeds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 4, 3, generator=g).to(DEV).contiguous(memory_format=torch.channels_last)
    y = torch.randn(2, 5, 8, 6, generator=g).to(DEV).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 5, 1, 1, generator=g).to(DEV)
    return {"x": x, "y": y, "w": w, "s": torch.tensor([1.0, 1.0, 2.0, 2.0])}


def test_producer_writes_into_the_buffer_and_the_result_is_the_concatenation() -> None:
    prog, plan = _program()
    bufs = elide_concats(prog, plan, "cuda")
    assert len(bufs) == 1
    feeds = _feeds()
    for _ in range(2):                           # a second run gets a fresh buffer
        values = _run(prog, feeds)
        want = torch.cat([torch.nn.functional.interpolate(feeds["x"], scale_factor=2.0, mode="nearest"),
                          torch.nn.functional.conv2d(feeds["y"], feeds["w"])], 1)
        cat = values["cat"]
        torch.testing.assert_close(cat, want)
        assert cat.is_contiguous(memory_format=torch.channels_last)
        assert values["up"].data_ptr() == cat.data_ptr()          # written in place, not copied
        assert bufs[0].current is None


@pytest.mark.parametrize("why", ["two consumers", "axis 2", "dynamic channels"])
def test_left_alone_when_it_does_not_qualify(why) -> None:
    prog, plan = _program(up_uses=2 if why == "two consumers" else 1, axis=2 if why == "axis 2" else 1)
    if why == "dynamic channels":
        plan["tensors"]["conv"]["shape"][1] = "C"
    before = [s.fn for s in prog.steps]
    assert elide_concats(prog, plan, "cuda") == []
    assert [s.fn for s in prog.steps] == before


def test_cpu_engines_are_left_alone() -> None:
    prog, plan = _program()
    assert elide_concats(prog, plan, "cpu") == []


def test_a_producer_that_did_not_write_in_place_is_copied() -> None:
    prog, plan = _program()
    elide_concats(prog, plan, "cuda")
    feeds = _feeds()
    feeds["x"] = feeds["x"].contiguous()         # NCHW: the Resize tactic takes its general path
    values = _run(prog, feeds)
    want = torch.cat([torch.nn.functional.interpolate(feeds["x"], scale_factor=2.0, mode="nearest"),
                      torch.nn.functional.conv2d(feeds["y"], feeds["w"])], 1)
    torch.testing.assert_close(values["cat"], want)


def test_every_writes_into_tactic_takes_out() -> None:
    """The runtime calls such producers with out=alloc: each must accept it (the contract in registry.py)."""
    import inspect

    from kiln.kernels.registry import TACTICS, _load_all
    _load_all()
    attrs = {"Convolution": {"stride": [2, 2], "pads": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1,
                             "activation": "silu"},
             "Resize": UP, "Conv1x1Sum": {"stride1": [1, 1], "stride2": [2, 2], "activation": "relu"}}
    found = [(kind, t) for kind, ts in TACTICS.items() for t in ts if t.writes_into]
    assert {t.name for _, t in found} >= {"triton_epilogue", "triton_igemm", "space_to_depth", "triton_nearest_nhwc",
                                          "triton_sum"}
    for kind, t in found:
        run = t.make(attrs[kind], KernelContext(device="cuda", precision="fp16"))
        assert "out" in inspect.signature(run).parameters, (kind, t.name)
