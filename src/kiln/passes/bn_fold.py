"""BatchNorm folding.

Cases:
- Convolution (constant weight, optional constant bias) → batch Normalization with
  constant statistics, the conv output used nowhere else →
  one Convolution with w' = w·γ/√(σ²+ε) per output channel and b' = (b−μ)·γ/√(σ²+ε)+β, whose
  output takes the BN output's name (it now holds the BN's values);
- the same after Deconvolution (per output channel on axis 1 of w, grouped);
- a batch Normalization left alone with constant statistics → Scale (y = x·s + t), one
  pass over memory instead of four.
"""
from __future__ import annotations

import numpy as np

from kiln.passes._match import remove_dead, replace_output
from kiln.passes.rewrite import ANY, ConstTensor, Match, Op, Rule, RulePass


def _bn(x) -> Op:
    """Batch normalization of ``x`` with constant statistics."""
    return Op("Normalization", x, ConstTensor("gamma"), ConstTensor("beta"), ConstTensor("mean"), ConstTensor("var"),
              ..., type="batch")


def _scale_shift(m: Match):
    eps = float(m.root.attrs.get("epsilon", 1e-5))
    g = m["gamma"].value.astype(np.float64)
    s = g / np.sqrt(m["var"].value.astype(np.float64) + eps)
    t = m["beta"].value.astype(np.float64) - m["mean"].value.astype(np.float64) * s
    return s, t


def _foldable(m: Match) -> str | None:
    conv = m["conv"]
    if not conv.inputs[1].is_constant:
        return "the convolution's weight is not a constant"
    if conv.attrs.get("activation"):
        return "the convolution already has a fused activation"
    if len(conv.inputs) > 2 and conv.inputs[2] is not None and not conv.inputs[2].is_constant:
        return "the convolution's bias is not a constant"
    return None


def _fold_into_conv(m: Match) -> None:
    net, bn, conv = m.net, m.root, m["conv"]
    s, t = _scale_shift(m)
    x = conv.outputs[0]
    w = conv.inputs[1].value
    dt = w.dtype
    b = conv.inputs[2].value.astype(np.float64) if len(conv.inputs) > 2 and conv.inputs[2] is not None \
        else np.zeros(s.shape[0])
    if conv.kind == "Convolution":
        w2 = w.astype(np.float64) * s.reshape([-1] + [1] * (w.ndim - 1))
    else:
        g = conv.attrs.get("groups", 1)
        cin, cout_g = w.shape[0], w.shape[1]
        wg = w.astype(np.float64).reshape([g, cin // g, cout_g] + list(w.shape[2:]))
        wg = wg * s.reshape([g, 1, cout_g] + [1] * (w.ndim - 2))
        w2 = wg.reshape(w.shape)
    b2 = b * s + t
    wt = net.add_constant(w2.astype(dt), name=net.unique_name(conv.inputs[1].name + "_bn"))
    bt = net.add_constant(b2.astype(dt), name=net.unique_name(conv.name + "_bias_bn"))
    conv.set_input(1, wt)
    if len(conv.inputs) <= 2:
        conv.inputs.append(None)
    conv.set_input(2, bt)
    conv.origin = list(dict.fromkeys(conv.origin + bn.origin))
    replace_output(net, bn.outputs[0], x)   # x now holds the BN's values: it takes the BN's name
    remove_dead(net, [bn])


def _to_scale(m: Match) -> None:
    net, bn = m.net, m.root
    s, t = _scale_shift(m)
    dt = bn.inputs[1].value.dtype
    sc = net.add_constant(s.astype(dt), name=net.unique_name(bn.name + "_scale"))
    sh = net.add_constant(t.astype(dt), name=net.unique_name(bn.name + "_shift"))
    for i in range(len(bn.inputs) - 1, 0, -1):
        bn.set_input(i, None)
    bn.inputs = [bn.inputs[0]]
    bn.inputs += [None, None, None]
    bn.set_input(1, sc)
    bn.set_input(2, sh)
    bn.kind = "Scale"
    bn.attrs = {"mode": "channel", "channel_axis": 1}


class FoldBatchNorm(RulePass):
    name = "batchnorm folding"
    rules = [
        Rule("bn(conv(x)) -> conv'(x)", _bn(Op(("Convolution", "Deconvolution"), ..., name="conv")), _foldable,
             _fold_into_conv),
        Rule("bn(x) -> x·s + t", _bn(ANY), None, _to_scale),
    ]
