"""Common-subexpression elimination and constant-index gathers as views.

Cases:
- two layers of the same kind with the same attrs reading the same inputs → the second's
  outputs are replaced by the first's (exporters repeat mask and shape computations per block);
- Gather with a constant scalar index → Select (a view: no kernel, no copy);
- equal small constants → one constant (so the layers reading them can merge).
Layers with subgraphs, plugins and data-dependent layers are never merged.
"""
from __future__ import annotations

import json

import numpy as np

from kiln.ir.network import Network, subgraphs
from kiln.passes._match import remove_dead, replace_output
from kiln.passes.base import Pass, PassResult

_NEVER = {"Plugin", "If", "Loop", "Scan", "NonZero", "Unique", "Compress"}


def _key(layer) -> str | None:
    if layer.kind in _NEVER or subgraphs(layer) or layer.kind.startswith(("Sequence", "Optional", "Random")):
        return None
    try:
        attrs = json.dumps(layer.attrs, sort_keys=True, default=_enc)
    except (TypeError, ValueError):
        return None
    ins = ",".join("-" if t is None else str(id(t)) for t in layer.inputs)
    return f"{layer.kind}|{attrs}|{ins}"


def _enc(v):
    if isinstance(v, np.ndarray):
        return {"a": v.tolist(), "d": str(v.dtype)}
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(type(v).__name__)


class EliminateCommonSubexpressions(Pass):
    name = "common-subexpression elimination"

    @staticmethod
    def _dedupe_constants(net: Network) -> bool:
        """Equal small constants become one tensor, so the layers reading them can merge."""
        import hashlib
        first: dict[tuple, object] = {}
        changed = False
        for t in list(net.tensors.values()):
            if not t.is_constant or t.value.size > 4096 or t.dtype == "string" or t in net.outputs or not t.uses:
                continue
            key = (t.dtype, t.value.shape, hashlib.sha1(np.ascontiguousarray(t.value).tobytes()).hexdigest())
            keep = first.setdefault(key, t)
            if keep is not t:
                net.replace_all_uses(t, keep)
                changed = True
        if changed:
            net.remove_unused_constants()
        return changed

    def call(self, net: Network) -> PassResult:
        modified = self._dedupe_constants(net)
        seen: dict[str, object] = {}
        for layer in list(net.layers):
            if layer not in net.layers:
                continue
            if layer.kind == "Gather" and len(layer.inputs) == 2 and layer.inputs[1] is not None \
                    and layer.inputs[1].is_constant and layer.inputs[1].value.ndim == 0:
                idx = int(layer.inputs[1].value)
                layer.set_input(1, None)
                layer.inputs.pop()
                layer.kind = "Select"
                layer.attrs = {"axis": layer.attrs.get("axis", 0), "index": idx}
                modified = True
            key = _key(layer)
            if key is None:
                continue
            first = seen.get(key)
            if first is None:
                seen[key] = layer
                continue
            for a, b in zip(layer.outputs, first.outputs):
                replace_output(net, a, b)
            remove_dead(net, [layer])
            modified = True
        return PassResult(net, modified)
