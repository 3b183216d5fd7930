"""Recognize exported decompositions and replace them with one layer.

Cases:
- SiLU: ``x * Sigmoid(x)`` (either operand order) → Activation(silu)  (YOLO exports);
- GELU: ``x * 0.5 * (1 + Erf(x / √2))`` in its exported orders (Div by √2 or Mul by 1/√2;
  the 0.5 and x multiplied in any order) → Activation(gelu);
- LayerNorm: ``(x − mean(x)) / Sqrt(mean((x − mean(x))²) + ε)`` over trailing axes, then the
  optional ``· γ + β`` → Normalization(layer) with statistics in FP32  (opset < 17 exports).
"""
from __future__ import annotations

import math

from kiln.ir.network import Network
from kiln.passes._match import only_consumer, other_input, producer, scalar, single_use, substitute
from kiln.passes.base import Pass, PassResult


def _is(x, target, tol=1e-3):
    return x is not None and abs(x - target) <= tol * max(1.0, abs(target))


class FusePatterns(Pass):
    name = "pattern fusion (SiLU, GELU, LayerNorm)"

    def call(self, net: Network) -> PassResult:
        modified = False
        for layer in list(net.layers):
            if layer not in net.layers:
                continue
            if layer.kind == "Activation" and layer.attrs.get("type") == "sigmoid":
                modified |= self._silu(net, layer)
            elif layer.kind == "Unary" and layer.attrs.get("op") == "erf":
                modified |= self._gelu(net, layer)
            elif layer.kind == "Unary" and layer.attrs.get("op") == "sqrt":
                modified |= self._layernorm(net, layer)
        return PassResult(net, modified)

    def _silu(self, net, sig) -> bool:
        x = sig.inputs[0]
        s = sig.outputs[0]
        mul = only_consumer(s, net, "ElementWise")
        if mul is None or mul.attrs.get("op") != "prod" or other_input(mul, s) is not x:
            return False
        act = net.add_layer("Activation", [x], {"type": "silu", "alpha": 0.0, "beta": 0.0},
                            name=net.unique_name(mul.name + "/silu"), origin=sig.origin + mul.origin)
        substitute(net, act, mul, mul.outputs, [sig, mul])
        return True

    def _gelu(self, net, erf) -> bool:
        u = erf.inputs[0]
        scale = producer(u, "ElementWise")
        if scale is None or not single_use(u, net):
            return False
        op = scale.attrs.get("op")
        x = scale.inputs[0]
        c = scalar(scale.inputs[1])
        if not ((op == "div" and _is(c, math.sqrt(2))) or (op == "prod" and _is(c, 1 / math.sqrt(2)))):
            return False
        add = only_consumer(erf.outputs[0], net, "ElementWise")
        if add is None or add.attrs.get("op") != "sum" or not _is(scalar(other_input(add, erf.outputs[0])), 1.0):
            return False
        m1 = only_consumer(add.outputs[0], net, "ElementWise")
        if m1 is None or m1.attrs.get("op") != "prod":
            return False
        o1 = other_input(m1, add.outputs[0])
        chain = [scale, erf, add, m1]
        if o1 is x or _is(scalar(o1), 0.5):
            need = 0.5 if o1 is x else x
            m2 = only_consumer(m1.outputs[0], net, "ElementWise")
            if m2 is None or m2.attrs.get("op") != "prod":
                return False
            o2 = other_input(m2, m1.outputs[0])
            if not ((need is x and o2 is x) or (need == 0.5 and _is(scalar(o2), 0.5))):
                return False
            chain.append(m2)
        else:
            half = producer(o1, "ElementWise", op="prod")
            if half is None or not single_use(o1, net):
                return False
            a, b = half.inputs[0], half.inputs[1]
            if not ((a is x and _is(scalar(b), 0.5)) or (b is x and _is(scalar(a), 0.5))):
                return False
            chain.insert(0, half)
        last = chain[-1]
        act = net.add_layer("Activation", [x], {"type": "gelu", "alpha": 0.0, "beta": 0.0},
                            name=net.unique_name(last.name + "/gelu"),
                            origin=[o for layer in chain for o in layer.origin])
        substitute(net, act, last, last.outputs, chain)
        return True

    def _layernorm(self, net, sqrt) -> bool:
        add_eps = producer(sqrt.inputs[0], "ElementWise", op="sum")
        if add_eps is None:
            return False
        var = producer(add_eps.inputs[0], "Reduce", op="mean")
        eps = scalar(add_eps.inputs[1])
        if var is None or eps is None:
            return False
        sq = var.inputs[0].producer
        if sq is None or sq.kind != "ElementWise" or sq.attrs.get("op") not in ("pow", "prod"):
            return False
        d = sq.inputs[0]
        if sq.attrs["op"] == "pow" and not _is(scalar(sq.inputs[1]), 2.0):
            return False
        if sq.attrs["op"] == "prod" and sq.inputs[1] is not d:
            return False
        sub = producer(d, "ElementWise", op="sub")
        if sub is None:
            return False
        x = sub.inputs[0]
        mean = producer(sub.inputs[1], "Reduce", op="mean")
        if mean is None or mean.inputs[0] is not x:
            return False
        axes = mean.attrs.get("axes")
        if not axes or var.attrs.get("axes") != axes or x.rank is None or not mean.attrs.get("keepdims", True):
            return False
        r = x.rank
        norm_axes = sorted(a % r for a in axes)
        if norm_axes != list(range(r - len(norm_axes), r)):
            return False
        div = only_consumer(sqrt.outputs[0], net, "ElementWise")
        if div is None or div.attrs.get("op") != "div" or div.inputs[0] is not d:
            return False
        chain = [mean, sub, sq, var, add_eps, sqrt, div]
        out = div.outputs[0]
        gamma = beta = None
        mul = only_consumer(out, net, "ElementWise")
        if mul is not None and mul.attrs.get("op") == "prod":
            g = other_input(mul, out)
            if g is not None and g.is_constant:
                gamma, out = g, mul.outputs[0]
                chain.append(mul)
                add = only_consumer(out, net, "ElementWise")
                if add is not None and add.attrs.get("op") == "sum":
                    b = other_input(add, out)
                    if b is not None and b.is_constant:
                        beta, out = b, add.outputs[0]
                        chain.append(add)
        # d (x − mean) must feed only the square and the division
        if {id(layer) for layer, _ in d.uses} != {id(sq), id(div)} or d in net.outputs:
            return False
        last = chain[-1]
        ln = net.add_layer("Normalization", [x, gamma, beta],
                           {"type": "layer", "axis": norm_axes[0] - r, "epsilon": eps},
                           name=net.unique_name(last.name + "/layernorm"),
                           origin=[o for layer in chain for o in layer.origin])
        substitute(net, ln, last, [out], chain)
        return True
