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

from kiln.ir.network import Network
from kiln.passes._match import remove_dead, replace_output
from kiln.passes.base import Pass, PassResult


def _bn_params(bn):
    x, scale, bias, mean, var = (bn.inputs + [None] * 5)[:5]
    if not all(t is not None and t.is_constant for t in (scale, bias, mean, var)):
        return None
    eps = float(bn.attrs.get("epsilon", 1e-5))
    g = scale.value.astype(np.float64)
    s = g / np.sqrt(var.value.astype(np.float64) + eps)
    t = bias.value.astype(np.float64) - mean.value.astype(np.float64) * s
    return s, t


class FoldBatchNorm(Pass):
    name = "batchnorm folding"

    def call(self, net: Network) -> PassResult:
        modified = False
        for bn in list(net.layers):
            if bn not in net.layers or bn.kind != "Normalization" or bn.attrs.get("type") != "batch":
                continue
            params = _bn_params(bn)
            if params is None:
                continue
            s, t = params
            x = bn.inputs[0]
            conv = x.producer
            if (conv is not None and conv.kind in ("Convolution", "Deconvolution") and len(x.uses) == 1
                    and x not in net.outputs and conv.inputs[1].is_constant and not conv.attrs.get("activation")
                    and (len(conv.inputs) < 3 or conv.inputs[2] is None or conv.inputs[2].is_constant)):
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
                if len(conv.inputs) > 2:
                    conv.set_input(2, bt)
                else:
                    conv.inputs.append(None)
                    conv.set_input(2, bt)
                conv.origin = list(dict.fromkeys(conv.origin + bn.origin))
                replace_output(net, bn.outputs[0], x)   # x now holds the BN's values: it takes the BN's name
                remove_dead(net, [bn])
                modified = True
                continue
            # standalone BN → Scale with per-channel scale and shift
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
            modified = True
        return PassResult(net, modified)
