"""The Plugin layer: hands tensors to a user's plugin implementation."""
from __future__ import annotations

import torch

from kiln.ir.dtypes import dtype_name, torch_dtype
from kiln.plugins.base import TensorDesc
from kiln.kernels.registry import tactic


@tactic("Plugin")
def make_plugin(attrs, ctx):
    plugin = attrs["plugin"]
    chosen = attrs.get("plugin_tactic") or plugin.tactics.get(ctx.device, ("torch",))[0]
    plans: dict[tuple, tuple] = {}         # input signature → (output shapes, dtypes, workspace bytes)
    workspace: dict = {}                   # device → scratch buffer, grown when a shape needs more

    def plan(xs):
        meta = any(x is not None and x.is_meta for x in xs)        # shape inference, not a run
        key = (meta, *((tuple(x.shape), x.dtype) if x is not None else None for x in xs))
        if key not in plans:
            descs_in = [TensorDesc(tuple(x.shape), dtype_name(x.dtype)) if x is not None else None for x in xs]
            descs = plugin.output_descs(descs_in)
            if not meta:                               # a new input shape is about to run: the plugin sees it first
                plugin.ensure_initialized()
                plugin.configure(descs_in, descs)
            plans[key] = None if plugin.data_dependent_shapes else (
                [tuple(int(d) for d in dsc.shape) for dsc in descs], [torch_dtype(d.dtype) for d in descs],
                int(plugin.workspace_size([d for d in descs_in if d is not None]) or 0))
        return plans[key]

    def run(*xs):
        if plugin.data_dependent_shapes:
            plan(xs)
            return tuple(plugin.forward(list(xs), None, None, chosen))
        dev = next((x.device for x in xs if x is not None), torch.device("cpu"))
        shapes, dtypes, ws_bytes = plan(xs)
        outs = [torch.empty(s, dtype=dt, device=dev) for s, dt in zip(shapes, dtypes)]
        if dev.type == "meta":
            return tuple(outs)
        ws = None
        if ws_bytes:
            ws = workspace.get(dev)
            if ws is None or ws.numel() < ws_bytes:
                ws = workspace[dev] = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
        plugin.forward(list(xs), outs, ws, chosen)
        return tuple(outs)
    return run
