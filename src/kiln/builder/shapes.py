"""Shape and dtype inference by abstract evaluation.

Device layers run on torch's ``meta`` device (shapes without data), or through a closed-form rule of
``kiln.builder.shape_rules`` for the common kinds; host layers
(shape arithmetic) run for real on tiny CPU tensors, so Reshape targets computed
from ``Shape`` are known. Symbolic dimensions are recovered by evaluating at two
bindings of the input symbols: a dim that moves with a symbol is that symbol, a
dim that moves otherwise is unknown (None), a dim that stays is static.
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from kiln.builder import shape_rules
from kiln.builder.autopad import padded_attrs
from kiln.builder.lazy_dynamo import dynamo_deferred
from kiln.builder.memory import check_host_output
from kiln.builder.placement import host_layers, is_host_constant
from kiln.errors import ShapeError
from kiln.ir.dtypes import dtype_name, from_numpy, is_container, torch_dtype
from kiln.ir.layers import LAYER_KINDS
from kiln.ir.network import Network, outer_reads, subgraphs
from kiln.kernels import KernelContext, plain_first, tactics_for

Binding = dict[str, int]


class _Unknown:
    pass


UNKNOWN = _Unknown()


def evaluate(net: Network, input_shapes: dict[str, tuple[int, ...]], strict: bool = False,
             env: dict[str, Any] | None = None) -> dict[str, Any]:
    """Abstractly run ``net``; returns tensor name → meta/host torch tensor, or UNKNOWN."""
    with contextlib.ExitStack() as stack:
        return _evaluate(net, input_shapes, strict, env, _Deferral(stack))


class _Deferral:
    """Enters ``dynamo_deferred`` the first time a layer runs its kernel; layers a shape rule or the memo
    answers need no torch kernel, and setting the deferral up walks torch's functions."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack, self.entered = stack, False

    def __call__(self) -> None:
        if not self.entered:
            self.stack.enter_context(dynamo_deferred())
            self.entered = True


def _evaluate(net: Network, input_shapes: dict[str, tuple[int, ...]], strict: bool,
              env: dict[str, Any] | None, defer: _Deferral) -> dict[str, Any]:
    hosts = host_layers(net)
    vals: dict[str, Any] = dict(env or {})
    metas: dict[str, torch.Tensor] = {}          # meta copies of host values that device layers read
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
    host_positions = {name: frozenset(k.host_inputs) for name, k in LAYER_KINDS.items()}
    for layer in net.layers:
        args = []
        for t in layer.inputs:
            v = None if t is None else vals.get(t.name, UNKNOWN)
            if v is UNKNOWN:
                break
            args.append(v)
        if layer.kind == "ShapeConstant" and len(args) == len(layer.inputs):
            _shape_constant(layer, args, vals, strict, defer)
            continue
        if len(args) < len(layer.inputs) or LAYER_KINDS[layer.kind].control_flow or any(subgraphs(layer)):
            for o in layer.outputs:
                vals[o.name] = UNKNOWN
            continue
        host_pos = host_positions[layer.kind]
        on_host = id(layer) in hosts
        if not on_host:
            real = [a for a in args if isinstance(a, torch.Tensor)]
            on_host = bool(real) and not any(a.is_meta for a in real) and sum(a.numel() for a in real) <= 4096
        if not on_host:
            for i, a in enumerate(args):
                if i not in host_pos and isinstance(a, torch.Tensor) and not a.is_meta:
                    name = layer.inputs[i].name
                    m = metas.get(name)
                    if m is None:
                        m = metas[name] = _to_meta(a)
                    args[i] = m
        else:
            check_host_output(layer, args)
        attrs = padded_attrs(layer, args) if "auto_pad" in layer.attrs else layer.attrs
        key = _meta_key(layer, attrs, args)
        hit = _MEMO.get(key) if key is not None else None
        if hit is not None and (hit is not _FAILED or not strict):
            for o, v in zip(layer.outputs, hit if hit is not _FAILED else [UNKNOWN] * len(layer.outputs)):
                vals[o.name] = v if v is UNKNOWN else torch.empty_strided(v[0], v[1], dtype=v[2], device="meta")
            continue
        ctx = KernelContext(device="cpu", layer_name=layer.name,
                            input_dtypes=tuple(t.dtype if t is not None else None for t in layer.inputs),
                            output_dtypes=tuple(o.dtype for o in layer.outputs))
        try:
            if any(a is not None and a.is_meta for i, a in enumerate(args) if i in host_pos):
                raise RuntimeError("host value unknown")
            tac = plain_first(tactics_for(layer.kind, attrs, ctx))
            if not tac:
                raise RuntimeError(f"no tactic for {layer.kind}")
            run = tac[0].make(attrs, ctx)            # refuses attributes the kernel does not know
            outs = shape_rules.outputs(layer.kind, attrs, args) if tac[0].name == "torch" else None
            if outs is None or len(outs) != len(layer.outputs):
                defer()
                outs = run(*args)
        except Exception as exc:   # data-dependent or not meta-capable: shape unknown here
            if strict:
                raise ShapeError(f"Layer {layer.name!r} ({layer.kind}) cannot take its inputs "
                                 f"{[tuple(a.shape) if a is not None else None for a in args]}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
            outs = [UNKNOWN] * len(layer.outputs)
            if key is not None:
                _remember(key, _FAILED)
        else:
            if key is not None and all(isinstance(v, torch.Tensor) and v.is_meta for v in outs):
                _remember(key, [(tuple(v.shape), v.stride(), v.dtype) for v in outs])
        for o, v in zip(layer.outputs, outs):
            vals[o.name] = v
    return vals


def _shape_constant(layer, args: list, vals: dict[str, Any], strict: bool, defer: _Deferral) -> None:
    """A ShapeConstant's outputs: its body evaluated at its inputs' shapes (all the body reads of them)."""
    body = layer.attrs["body"]
    sub = _evaluate(body, {t.name: tuple(a.shape) for t, a in zip(body.inputs, args)}, strict,
                    {t.name: vals.get(t.name, UNKNOWN) for t in outer_reads(body)}, defer)
    for o, b in zip(layer.outputs, body.outputs):
        vals[o.name] = sub.get(b.name, UNKNOWN)


# Output shapes of device layers, keyed by kind, attributes and input shapes: on meta tensors a layer's
# outputs depend on nothing else, and networks repeat the same layer on the same shapes many times.
_MEMO: dict[tuple, Any] = {}
_MEMO_SIZE = 1 << 16
_FAILED = object()


def _remember(key: tuple, value: Any) -> None:
    if len(_MEMO) >= _MEMO_SIZE:
        _MEMO.clear()
    _MEMO[key] = value


def _meta_key(layer, attrs: dict[str, Any], args: list) -> tuple | None:
    """The memo key of a layer whose inputs are all meta tensors, or None when it may not be memoized
    (host values among the inputs, plugins, attributes that are not plain data)."""
    if layer.kind == "Plugin":
        return None
    ins = []
    for a in args:
        if a is None:
            ins.append(None)
        elif isinstance(a, torch.Tensor) and a.is_meta:
            ins.append((tuple(a.shape), a.stride(), a.dtype))
        else:
            return None
    frozen = _frozen(attrs)
    if frozen is None:
        return None
    return (layer.kind, frozen, tuple(ins), tuple(t.dtype if t is not None else None for t in layer.inputs),
            tuple(o.dtype for o in layer.outputs))


def _frozen(v: Any) -> Any:
    """A hashable copy of a plain attribute value, or None when it holds something else."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return (type(v).__name__, v)
    if isinstance(v, dict):
        items = []
        for k, x in v.items():          # insertion order: another order is only a miss
            f = _frozen(x)
            if f is None:
                return None
            items.append((k, f))
        return ("dict", tuple(items))
    if isinstance(v, (list, tuple)):
        items = []
        for x in v:
            f = _frozen(x)
            if f is None:
                return None
            items.append(f)
        return (type(v).__name__, tuple(items))
    if isinstance(v, np.ndarray) and v.dtype != object:
        return ("ndarray", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, np.generic):
        return ("npscalar", v.dtype.str, v.tobytes())
    return None


def _to_meta(a: torch.Tensor) -> torch.Tensor:
    if not isinstance(a, torch.Tensor):      # a sequence (list of tensors) or an empty optional
        return a
    return a if a.is_meta else torch.empty(a.shape, dtype=a.dtype, device="meta")


SYMBOL_RANGES = "symbol_ranges"      # Network.metadata: {symbol: [lo, hi]} of a range build's profile


def profile_bindings(ranges: dict[str, list[int]], symbols: list[str]) -> list[Binding] | None:
    """Bindings at the corners of the symbols' profile ranges: all low, all high, and mixed corners so that
    no two symbols take the same values at every binding; None when the ranges cannot tell them apart."""
    if not symbols or any(s not in ranges or ranges[s][0] == ranges[s][1] for s in symbols):
        return None
    bits = max(1, (len(symbols) - 1).bit_length())
    out = [{s: ranges[s][0] for s in symbols}, {s: ranges[s][1] for s in symbols}]
    out += [{s: ranges[s][0 if (i >> j) & 1 else 1] for i, s in enumerate(symbols)} for j in range(bits)]
    seen = {tuple(b[s] for b in out) for s in symbols}
    return out if len(seen) == len(symbols) else None


def _runs(net: Network, bindings: list[Binding]) -> list[dict[str, Any]]:
    runs = []
    for b in bindings:
        shapes = {t.name: tuple(b.get(d, 1) if isinstance(d, str) else (1 if d is None else d)
                                for d in (t.shape or ())) for t in net.inputs}
        runs.append(evaluate(net, shapes))
    return runs


def _unknowns(net: Network, runs: list[dict[str, Any]]) -> int:
    """Layer outputs whose shape some run could not find."""
    return sum(any(not isinstance(r.get(o.name, UNKNOWN), torch.Tensor) for r in runs)
               for layer in net.layers for o in layer.outputs)


def infer_shapes(net: Network, bindings: list[Binding] | None = None) -> None:
    """Fill every tensor's shape (symbolic where dynamic) and dtype in place."""
    symbols = sorted({d for t in net.inputs for d in (t.shape or ()) if isinstance(d, str)})
    if bindings is None and not symbols:
        bindings = [{}]
    fallback = None
    if bindings is None:
        bindings = [{s: 7 + 2 * i for i, s in enumerate(symbols)}, {s: 11 + 2 * i for i, s in enumerate(symbols)}]
        fallback = profile_bindings(net.metadata.get(SYMBOL_RANGES) or {}, symbols)
    runs = _runs(net, bindings)
    if fallback is not None and _unknowns(net, runs):
        # a network that cannot run at the generic sizes (strides that need multiples of 32): the profile's corners
        alt = _runs(net, fallback)
        if _unknowns(net, alt) < _unknowns(net, runs):
            bindings, runs = fallback, alt
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
