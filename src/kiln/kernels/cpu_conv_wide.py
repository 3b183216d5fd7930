"""2-D convolution on the CPU through oneDNN, a one-column image turned on its side.

Tactic ``onednn_wide`` runs a convolution of an [N, C, H, 1] input with an [kh, 1] kernel (a 1-D convolution
written as 2-D, as jax2tf/tf2onnx export Conv1D) as the same oneDNN convolution of the [N, C, 1, H] view with
the [1, kh] kernel, and turns the result back: the views share memory, so no data moves, and oneDNN's direct
kernels block along the width, where a height-only problem leaves them a single column per step. The weight's
view is made once per weight tensor, so the inner tactic's packed weights are kept. The inner tactic is
``onednn_cached`` where it runs the layer (kernels/cpu_dnnl.py), else ``onednn``; any other input shape runs it
as it is (``into`` passed on where it takes it: runtime/residual_in_place.py); the builder times both.
"""
from __future__ import annotations

from typing import Any, Callable

from kiln.kernels import cpu_conv, cpu_dnnl
from kiln.kernels.registry import KernelContext, tactic


def _turned(attrs: dict[str, Any]) -> dict[str, Any]:
    """The layer's attrs for the [N, C, W, H] view: height and width swapped in stride, dilation and pads."""
    (sh, sw), (dh, dw) = attrs["stride"], attrs["dilation"]
    bh, bw, eh, ew = attrs["pads"]
    return {**attrs, "stride": [sw, sh], "dilation": [dw, dh], "pads": [bw, bh, ew, eh]}


def _wide_ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    return (cpu_conv.fp32_2d_cpu(attrs, ctx) and attrs["stride"][1] == 1 and attrs["dilation"][1] == 1
            and attrs["pads"][1] == attrs["pads"][3] == 0 and not attrs.get("pool") and cpu_conv.onednn_available())


@tactic("Convolution", "onednn_wide", devices=("cpu",), supports=_wide_ok, priority=1)
def make_convolution_onednn_wide(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    """The oneDNN convolution of the H↔W-transposed views where the input and kernel are one column wide."""
    make = (cpu_dnnl.make_convolution_onednn_cached if cpu_dnnl.cached_ok(attrs, ctx)
            else cpu_conv.make_convolution_onednn)
    plain, turned = make(attrs, ctx), make(_turned(attrs), ctx)
    kept: dict[str, Any] = {"w": None, "view": None}

    def run(x, w, b=None, residual=None, into=False):
        if (x.dim() != 4 or x.shape[3] != 1 or w.shape[3] != 1 or x.shape[2] == 1
                or (residual is not None and residual.dim() != 4)):
            return plain(x, w, b, residual, into=True) if into else plain(x, w, b, residual)
        if kept["w"] is not w:
            kept["w"], kept["view"] = w, w.transpose(2, 3)
        r = residual.transpose(2, 3) if residual is not None else None
        (y,) = turned(x.transpose(2, 3), kept["view"], b, r)
        return (y.transpose(2, 3),)
    run.sums_into_residual = getattr(plain, "sums_into_residual", False)       # type: ignore[attr-defined]
    return run
