"""What a build must fit in memory, checked before anything that large is allocated.

A network input at the profiles' largest shape, the live activations at those shapes (layers run in
order, each output dies after its last reader) and, on the GPU, the weights are compared with the
memory the target device has free. Shape inference runs shape arithmetic for real on the host, so a
host layer whose output size comes from values (ConstantOfShape, Range, Expand, Tile, ...) is sized
from those values before it runs. Each refusal is one line naming the input or the layer.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from kiln.errors import BuildError
from kiln.ir.dtypes import np_dtype
from kiln.ir.network import Layer, Network, Tensor
from kiln.ir.verify import fmt_bytes, host_memory, nbytes
from kiln.passes.constant_fold import predicted_elements


# Sizes up to this many bytes fit on any machine that runs Kiln: the checks ask the device only above it.
DEVICE_QUERY_BYTES = 1 << 30


def available(device: str) -> int:
    """Bytes free on ``device`` ("cpu" or "cuda") for this build's engine."""
    if device == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    return host_memory()


def _itemsize(dtype: str) -> int:
    try:
        return max(1, np_dtype(dtype).itemsize)
    except Exception:          # sequences, strings: counted as one byte per element
        return 1


def who(layer: Layer) -> str:
    """A layer as messages name it: its name, kind and the ONNX node it came from."""
    node = f", ONNX node {layer.origin[0]!r}" if layer.origin and layer.origin[0] != layer.name else ""
    return f"{layer.name!r} ({layer.kind}{node})"


def layer_error(layer: Layer, message: str) -> BuildError:
    """A BuildError about ``layer``; ``.node`` holds the ONNX node it came from (kiln check reports it)."""
    err = BuildError(message)
    err.node = layer.origin[0] if layer.origin else layer.name
    return err


def check_inputs(net: Network, shapes: dict[str, tuple[int, ...]], device: str) -> None:
    """Refuse an input whose largest profile shape (or static shape) cannot fit on ``device``."""
    free = None
    for t in net.inputs:
        dims = shapes.get(t.name)
        if dims is None or t.dtype.startswith(("sequence(", "optional(")):
            continue
        size = nbytes(dims, _itemsize(t.dtype))
        if size <= DEVICE_QUERY_BYTES:
            continue
        free = available(device) if free is None else free
        if size > free:
            raise BuildError(f"Input {t.name!r} of shape {list(dims)} ({t.dtype}) needs {fmt_bytes(size)}, more than the "
                             f"{fmt_bytes(free)} free on {device}; give it smaller dims (--shapes / profiles) or check "
                             f"the model's input shape.")


class Activations(NamedTuple):
    peak: int                    # bytes of live activations at the worst point
    largest: int                 # bytes of the largest single activation
    tensor: Tensor | None        # that activation


def activations(net: Network, shapes: dict[str, tuple[int, ...]]) -> Activations:
    """Peak bytes of live activations when layers run in order and die after their last use, and the
    largest one."""
    from kiln.builder.shapes import UNKNOWN, evaluate
    vals = evaluate(net, shapes)
    last: dict[str, int] = {}
    for i, layer in enumerate(net.layers):
        for t in layer.inputs:
            if t is not None and not t.is_constant:
                last[t.name] = i
    outs = {t.name for t in net.outputs}

    def size(name: str) -> int:
        v = vals.get(name, UNKNOWN)
        if v is UNKNOWN or not isinstance(v, torch.Tensor):
            return 0
        return int(v.numel()) * v.element_size()
    live = sum(size(t.name) for t in net.inputs)
    peak, largest, which = live, 0, None
    for i, layer in enumerate(net.layers):
        for o in layer.outputs:
            s = size(o.name)
            live += s
            if s > largest:
                largest, which = s, o
        peak = max(peak, live)
        for t in layer.inputs:
            if t is not None and not t.is_constant and last.get(t.name) == i and t.name not in outs:
                live -= size(t.name)
    return Activations(peak, largest, which)


def check_fits(net: Network, shapes: dict[str, tuple[int, ...]], device: str, weights: int) -> int:
    """The activation peak at ``shapes``; refuses a network whose activations (and, on the GPU, weights)
    cannot fit in the memory ``device`` has free."""
    act = activations(net, shapes)
    need = act.peak + (weights if device == "cuda" else 0)
    if need <= DEVICE_QUERY_BYTES:
        return act.peak            # no machine that runs Kiln lacks a gigabyte: skip asking the device
    free = available(device)
    if need > free:
        big = ""
        if act.tensor is not None and act.tensor.producer is not None:
            big = f"; the largest is {act.tensor.name!r} ({fmt_bytes(act.largest)}) from layer {who(act.tensor.producer)}"
        what = "activations and weights" if device == "cuda" else "activations"
        raise _at(act.tensor, f"The network needs {fmt_bytes(need)} of {what} at the largest profile shapes but {device} has "
                         f"{fmt_bytes(free)} free{big}; lower the profile's max shapes or check the shapes the "
                         f"model computes.")
    return act.peak


def _at(t: Tensor | None, message: str) -> BuildError:
    return layer_error(t.producer, message) if t is not None and t.producer is not None else BuildError(message)


def check_host_output(layer: Layer, args: list) -> None:
    """Refuse to run a host layer whose output, sized from its input values, cannot fit in memory."""
    n = predicted_elements(layer.kind, args)
    if n is None:
        return
    size = n * _itemsize(layer.outputs[0].dtype if layer.outputs else "float32")
    if size <= DEVICE_QUERY_BYTES:
        return
    free = host_memory()
    if size > free:
        raise layer_error(layer, f"Layer {who(layer)} would make a tensor of {n} elements ({fmt_bytes(size)}) from the shape "
                         f"values it reads, more than the {fmt_bytes(free)} this machine has free; check the sizes "
                         f"the model computes (or the profile's shapes).")
