"""Shape and dtype inference by abstract evaluation.

Device layers run on torch's ``meta`` device (shapes without data); host layers
(shape arithmetic) run for real on tiny CPU tensors, so Reshape targets computed
from ``Shape`` are known. Symbolic dimensions are recovered by evaluating at two
bindings of the input symbols: a dim that moves with a symbol is that symbol, a
dim that moves otherwise is unknown (None), a dim that stays is static.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.builder.placement import host_layers, is_host_constant
from kiln.errors import ShapeError
from kiln.ir.dtypes import dtype_name, is_container
from kiln.ir.layers import LAYER_KINDS
from kiln.ir.network import Network, outer_reads, subgraphs
from kiln.kernels import KernelContext, tactics_for
from kiln.kernels._util import from_numpy, torch_dtype

Binding = dict[str, int]


class _Unknown:
    pass


UNKNOWN = _Unknown()


def evaluate(net: Network, input_shapes: dict[str, tuple[int, ...]], strict: bool = False,
             env: dict[str, Any] | None = None) -> dict[str, Any]:
    """Abstractly run ``net``; returns tensor name → meta/host torch tensor, or UNKNOWN."""
    hosts = host_layers(net)
    vals: dict[str, Any] = dict(env or {})
    for t in net.tensors.values():
        if t.is_constant:
            if t.dtype == "string":
                vals[t.name] = UNKNOWN
                continue
            arr = t.value
            vals[t.name] = from_numpy(arr.copy()) if is_host_constant(t) else \
                torch.empty(arr.shape, dtype=torch_dtype(t.dtype), device="meta")
    for t in net.inputs:
        shape = input_shapes.get(t.name)
        if shape is None:
            shape = tuple(d if isinstance(d, int) else 1 for d in (t.shape or ()))
        if t.dtype == "string" or is_container(t.dtype):     # sequences/optionals: contents unknown here
            vals[t.name] = UNKNOWN
            continue
        vals[t.name] = torch.empty(shape, dtype=torch_dtype(t.dtype), device="meta")
    for layer in net.layers:
        args = []
        unknown = False
        for i, t in enumerate(layer.inputs):
            if t is None:
                args.append(None)
                continue
            v = vals.get(t.name, UNKNOWN)
            if v is UNKNOWN:
                unknown = True
                break
            args.append(v)
        if unknown or any(subgraphs(layer)) or layer.kind in ("If", "Loop", "Scan"):
            for o in layer.outputs:
                vals[o.name] = UNKNOWN
            continue
        real = [a for a in args if isinstance(a, torch.Tensor)]
        on_host = id(layer) in hosts or (bool(real) and all(not a.is_meta for a in real)
                                        and sum(a.numel() for a in real) <= 4096)
        host_pos = set(LAYER_KINDS[layer.kind].host_inputs)
        if not on_host:
            args = [_to_meta(a) if a is not None and i not in host_pos else a for i, a in enumerate(args)]
        else:
            args = [a if not isinstance(a, torch.Tensor) or not a.is_meta else a for a in args]
        ctx = KernelContext(device="cpu", layer_name=layer.name,
                            input_dtypes=tuple(t.dtype if t is not None else None for t in layer.inputs),
                            output_dtypes=tuple(o.dtype for o in layer.outputs))
        try:
            if any(a is not None and a.is_meta for i, a in enumerate(args) if i in host_pos):
                raise RuntimeError("host value unknown")
            tac = tactics_for(layer.kind, layer.attrs, ctx)
            if not tac:
                raise RuntimeError(f"no tactic for {layer.kind}")
            outs = tac[0].make(layer.attrs, ctx)(*args)
        except Exception as exc:   # data-dependent or not meta-capable: shape unknown here
            if strict:
                raise ShapeError(f"Layer {layer.name!r} ({layer.kind}) cannot take its inputs "
                                 f"{[tuple(a.shape) if a is not None else None for a in args]}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
            outs = [UNKNOWN] * len(layer.outputs)
        for o, v in zip(layer.outputs, outs):
            vals[o.name] = v
    return vals


def _to_meta(a: torch.Tensor) -> torch.Tensor:
    if not isinstance(a, torch.Tensor):      # a sequence (list of tensors) or an empty optional
        return a
    return a if a.is_meta else torch.empty(a.shape, dtype=a.dtype, device="meta")


def infer_shapes(net: Network, bindings: list[Binding] | None = None) -> None:
    """Fill every tensor's shape (symbolic where dynamic) and dtype in place."""
    symbols = sorted({d for t in net.inputs for d in (t.shape or ()) if isinstance(d, str)})
    if bindings is None and not symbols:
        bindings = [{}]
    if bindings is None:
        bindings = [{s: 7 + 2 * i for i, s in enumerate(symbols)}, {s: 11 + 2 * i for i, s in enumerate(symbols)}]
    runs = []
    for b in bindings:
        shapes = {t.name: tuple(b.get(d, 1) if isinstance(d, str) else (1 if d is None else d)
                                for d in (t.shape or ())) for t in net.inputs}
        runs.append(evaluate(net, shapes))
    sym_vals = {s: tuple(b[s] for b in bindings) for s in symbols}
    by_vals = {v: s for s, v in sym_vals.items()}
    for layer in net.layers:
        for o in layer.outputs:
            vs = [r.get(o.name, UNKNOWN) for r in runs]
            if any(v is UNKNOWN or not isinstance(v, torch.Tensor) for v in vs):
                continue
            o.dtype = dtype_name(vs[0].dtype)
            if len({v.dim() for v in vs}) != 1:
                o.shape = None
                continue
            dims = []
            for k in range(vs[0].dim()):
                col = tuple(int(v.shape[k]) for v in vs)
                if len(set(col)) == 1 and (not symbols or True):
                    dims.append(col[0])
                else:
                    dims.append(by_vals.get(col))
            o.shape = tuple(dims)
    for layer in net.layers:
        for g in subgraphs(layer):
            _ = outer_reads(g)
