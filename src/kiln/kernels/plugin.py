"""The Plugin layer: hands tensors to a user's plugin implementation."""
from __future__ import annotations

import torch

from kiln.ir.dtypes import dtype_name
from kiln.kernels._util import torch_dtype
from kiln.plugins.base import TensorDesc
from kiln.kernels.registry import tactic


@tactic("Plugin")
def make_plugin(attrs, ctx):
    plugin = attrs["plugin"]
    chosen = attrs.get("plugin_tactic") or plugin.tactics.get(ctx.device, ("torch",))[0]
    ws_bytes = int(attrs.get("workspace", 0) or 0)
    workspace = {}

    def run(*xs):
        if plugin.data_dependent_shapes:
            return tuple(plugin.forward(list(xs), None, None, chosen))
        dev = next((x.device for x in xs if x is not None), torch.device("cpu"))
        descs = plugin.output_descs([TensorDesc(tuple(x.shape), dtype_name(x.dtype)) if x is not None else None
                                     for x in xs])
        shapes = [tuple(int(d) for d in dsc.shape) for dsc in descs]
        outs = [torch.empty(s, dtype=torch_dtype(d.dtype), device=dev) for s, d in zip(shapes, descs)]
        if dev.type == "meta":
            return tuple(outs)
        ws = None
        if ws_bytes:
            ws = workspace.get(dev)
            if ws is None:
                ws = workspace[dev] = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
        plugin.forward(list(xs), outs, ws, chosen)
        return tuple(outs)
    return run
