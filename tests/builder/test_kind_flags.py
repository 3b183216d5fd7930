"""The builder and the runtime read a kind's facts from its schema (kiln.ir.layers), not from lists of
their own: flipping a flag on the schema changes what they do."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import kiln
from kiln.ir.layers import LAYER_KINDS, VARIADIC


@pytest.fixture
def flip(monkeypatch):
    """flip(kind, **flags): the kind's schema entry with those flags changed, for this test only."""
    def set_flags(kind: str, **flags) -> None:
        monkeypatch.setitem(LAYER_KINDS, kind, dataclasses.replace(LAYER_KINDS[kind], **flags))
    return set_flags


def test_the_flagged_kinds() -> None:
    """The facts as TensorRT's layers have them: shape tensors on the host, statistics in FP32,
    subgraphs for control flow, channels-last outputs from convolution and pooling."""
    def having(test) -> set[str]:
        return {k for k, s in LAYER_KINDS.items() if test(s)}
    assert having(lambda s: s.control_flow) == {"If", "Loop", "Scan"}
    assert having(lambda s: s.host == "always") == {"Shape", "Size", "ShapeConstant"}
    assert having(lambda s: s.host == "capable") == {
        "ElementWise", "Unary", "Gather", "Concatenation", "Slice", "Squeeze", "Unsqueeze", "Shuffle", "Cast",
        "Reduce", "Identity", "Where", "Range", "Flatten", "ArgReduce", "Select"}
    assert having(lambda s: s.channels_last) == {"Convolution", "Pooling", "Conv1x1Chain", "Conv1x1Sum", "QConvolution"}
    assert having(lambda s: s.fp32_internal) == {"SoftMax", "Normalization", "Reduce", "LRN"}
    assert {k for k, s in LAYER_KINDS.items() if s.host not in ("device", "capable", "always")} == set()


def _shape_net() -> tuple[kiln.Network, object, object]:
    net = kiln.Network("host")
    x = net.add_input("x", "float32", (2, 3))
    shape = net.add_shape(x)
    ident = net.add_identity(shape.output)
    net.mark_output(ident.output, "s")
    return net, shape, ident


def test_placement_reads_the_host_flag(flip) -> None:
    from kiln.builder.placement import host_layers
    net, shape, ident = _shape_net()
    assert host_layers(net) == {id(shape), id(ident)}
    flip("Identity", host="device")
    assert host_layers(net) == {id(shape)}
    flip("Shape", host="capable")          # its one input is a device tensor: not on the host any more
    assert host_layers(net) == set()


def test_shape_arithmetic_of_a_range_engine_stays_on_the_host() -> None:
    """Shape -> Gather(constant index) -> Unsqueeze -> Concat -> Reshape, as exporters write a dynamic batch: CSE
    turns the Gather into a Select, and every shape layer must stay on the host, or the Reshape reads a device
    tensor (a sync each run, and no CUDA graph: a BERT range engine ran 20x slower at batch 1)."""
    import numpy as np

    from kiln.builder.placement import host_layers
    net = kiln.Network("range")
    x = net.add_input("x", "float32", ("batch", 8))
    shape = net.add_layer("Shape", [x])
    batch = net.add_layer("Select", [shape.outputs[0]], {"axis": 0, "index": 0})
    dim = net.add_layer("Unsqueeze", [batch.outputs[0]], {"axes": [0]})
    dims = net.add_layer("Concatenation", [dim.outputs[0], net.add_constant(np.array([2, 4], np.int64))], {"axis": 0})
    reshape = net.add_layer("Shuffle", [x, dims.outputs[0]])
    net.mark_output(reshape.outputs[0], "y")
    assert host_layers(net) == {id(shape), id(batch), id(dim), id(dims)}


def test_precision_reads_the_fp32_internal_flag(flip) -> None:
    from kiln.builder.precision import assign_precision

    def softmax_precision() -> str:
        net = kiln.Network("p")
        x = net.add_input("x", "float32", (2, 4))
        sm = net.add_softmax(x, -1)
        flat = net.add_layer("Flatten", [sm.output], {"axis": 1})    # a network output's maker would run in FP32
        net.mark_output(flat.outputs[0], "y")
        assign_precision(net, "fp16")
        return sm.precision
    assert softmax_precision() == "fp16 (fp32 accum)"
    flip("SoftMax", fp32_internal=False)
    assert softmax_precision() == "fp16"


class _CudaLike:
    """Stands for a 4-D FP16 CUDA tensor (the check reads only these facts)."""
    is_cuda = True
    dtype = torch.float16

    @staticmethod
    def dim() -> int:
        return 4


def test_tactic_timing_reads_the_channels_last_flag(flip) -> None:
    from kiln.builder.tactics import _channels_last_at_runtime
    net = kiln.Network("cl")
    x = net.add_input("x", "float32", (1, 2, 4, 4))
    pool = net.add_pooling(x, "max", (2, 2), stride=(2, 2))
    ident = net.add_identity(x)
    assert _channels_last_at_runtime(pool.output, _CudaLike())
    assert not _channels_last_at_runtime(ident.output, _CudaLike())
    flip("Pooling", channels_last=False)
    flip("Identity", channels_last=True)
    assert not _channels_last_at_runtime(pool.output, _CudaLike())
    assert _channels_last_at_runtime(ident.output, _CudaLike())


def test_plans_state_num_inputs_for_variadic_control_flow() -> None:
    """Loop and Scan kernels split their own inputs from the outer ones by num_inputs; If has one input."""
    from kiln.builder.build import _splits_outer
    assert {k for k in LAYER_KINDS if _splits_outer(k)} == {"Loop", "Scan"}
    assert all(LAYER_KINDS[k].max_inputs >= VARIADIC for k in ("Loop", "Scan"))


def test_shape_inference_leaves_control_flow_outputs_open(flip) -> None:
    """A control-flow layer's outputs are not found by running its kernel on meta tensors; with the
    flag off, shape inference runs the (then ordinary) layer and knows its output."""
    from kiln.builder.shapes import UNKNOWN, evaluate
    net = kiln.Network("cf")
    x = net.add_input("x", "float32", (2, 3))
    ident = net.add_identity(x)
    net.mark_output(ident.output, "y")
    assert evaluate(net, {"x": (2, 3)})[ident.output.name] is not UNKNOWN
    flip("Identity", control_flow=True)
    assert evaluate(net, {"x": (2, 3)})[ident.output.name] is UNKNOWN
