"""Stem pooling: a network stem's max pool runs inside its convolution.

Case: Convolution (2-D, one group, a constant weight over at most 4 input channels, no residual)
whose output is read only by a 3×3 stride-2 pad-1 max pool (ResNet, and every network that took
its stem) → the Convolution with attrs ``pool`` = that geometry. The stem kernel
(kernels/conv_stem.py) then writes the pooled map only, instead of writing the 4× larger
convolution output and reading it back; other tactics pool as a second step.

Runs after epilogue fusion, so the stem's ReLU is already inside the convolution (the pool comes
after the activation, as in the graph); epilogue fusion leaves a pooled convolution alone.
"""
from __future__ import annotations

from kiln.kernels.conv_stem import MAX_CHANNELS as STEM_CHANNELS
from kiln.kernels.conv_stem import POOL
from kiln.passes._match import remove_dead, replace_output
from kiln.passes.rewrite import Match, Op, Rule, RulePass


def is_stem(conv) -> bool:
    w = conv.inputs[1]
    return (len(conv.attrs.get("stride", ())) == 2 and conv.attrs.get("groups", 1) == 1
            and w is not None and w.is_constant and w.value.ndim == 4 and w.value.shape[1] <= STEM_CHANNELS
            and (len(conv.inputs) < 4 or conv.inputs[3] is None))


def _is_pool(layer) -> bool:
    a = layer.attrs
    return (layer.kind == "Pooling" and a.get("type") == "max" and list(a.get("kernel") or ()) == POOL["kernel"]
            and list(a.get("stride") or ()) == POOL["stride"] and list(a.get("pads") or ()) == POOL["pads"]
            and list(a.get("dilation") or [1, 1]) == [1, 1] and not a.get("ceil_mode")
            and not a.get("return_indices") and len(layer.outputs) == 1)


def _fits(m: Match) -> str | None:
    conv = m["conv"]
    if conv.attrs.get("pool"):
        return f"{conv.name!r} already has a pool"
    if not is_stem(conv):
        return f"{conv.name!r} is not a stem convolution (2-D, one group, at most {STEM_CHANNELS} input channels)"
    if not _is_pool(m.root):
        return "not a 3x3 stride-2 pad-1 max pool"
    return None


def _fuse(m: Match) -> None:
    net, conv, pool = m.net, m["conv"], m.root
    conv.attrs["pool"] = {k: list(v) for k, v in POOL.items()}
    conv.origin = list(dict.fromkeys(conv.origin + pool.origin))
    replace_output(net, pool.outputs[0], conv.outputs[0])
    remove_dead(net, [pool])


class FuseStemPool(RulePass):
    name = "stem pooling"
    devices = ("cuda",)                # its fused kernels are GPU kernels
    rules = [Rule("maxpool(stem conv(x)) -> conv with pool", Op("Pooling", Op("Convolution", ..., name="conv")),
                  _fits, _fuse)]
