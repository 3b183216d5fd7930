"""Loss layers of the ONNX training-adjacent ops (NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss).

Inference engines meet them in exported evaluation graphs; they are small gathers
and reductions, computed in FP32 for FP16/BF16 inputs.
"""
from __future__ import annotations

import torch

from kiln.kernels.registry import tactic

_LOW = (torch.float16, torch.bfloat16)


@tactic("NLLLoss")
def make_nll(attrs, ctx):
    reduction = attrs.get("reduction", "mean")
    ignore = attrs.get("ignore_index")

    def run(x, target, weight=None):
        xf = x.float() if x.dtype in _LOW else x
        t = target.to(torch.int64)
        valid = torch.ones_like(t, dtype=torch.bool) if ignore is None else t != int(ignore)
        safe = torch.where(valid, t, torch.zeros_like(t))
        picked = -torch.gather(xf, 1, safe.unsqueeze(1)).squeeze(1)
        w = weight.to(xf.dtype)[safe] if weight is not None else torch.ones_like(picked)
        w = torch.where(valid, w, torch.zeros_like(w))
        loss = picked * w
        if reduction == "none":
            out = loss
        elif reduction == "sum":
            out = loss.sum()
        else:
            out = loss.sum() / w.sum()
        return (out.to(x.dtype),)
    return run
