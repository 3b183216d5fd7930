"""Normalizations that also return their statistics (LayerNormalization's Mean/InvStdDev,
BatchNormalization in training mode). Statistics are computed in FP32 (or FP64 for FP64 input),
as the ONNX reference does with stash_type=1.
"""
from __future__ import annotations

import torch

from kiln.kernels._util import norm_axis
from kiln.kernels.registry import tactic


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@tactic("LayerNormStats")
def make_layer_norm_stats(attrs, ctx):
    axis0 = attrs.get("axis", -1)
    eps = attrs.get("epsilon", 1e-5)
    stash = attrs.get("stash_type", 1)

    def run(x, scale=None, bias=None):
        axis = norm_axis(axis0, x.dim())
        dims = tuple(range(axis, x.dim()))
        work = x.to(_stat_dtype(x)) if stash == 1 else x
        mean = work.mean(dims, keepdim=True)
        diff = work - mean
        inv = torch.rsqrt((diff * diff).mean(dims, keepdim=True) + eps)
        y = diff * inv
        if scale is not None:
            y = y * scale
        if bias is not None:
            y = y + bias
        return (y.to(x.dtype), mean, inv)
    return run


@tactic("BatchNormTraining")
def make_batch_norm_training(attrs, ctx):
    eps = attrs.get("epsilon", 1e-5)
    momentum = attrs.get("momentum", 0.9)

    def run(x, scale, bias, running_mean, running_var):
        dims = tuple(d for d in range(x.dim()) if d != 1)
        work = x.to(_stat_dtype(x))
        mean = work.mean(dims)
        var = work.var(dims, unbiased=False)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (work - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps) * scale.reshape(shape) \
            + bias.reshape(shape)
        new_mean = running_mean * momentum + mean.to(running_mean.dtype) * (1 - momentum)
        new_var = running_var * momentum + var.to(running_var.dtype) * (1 - momentum)
        return (y.to(x.dtype), new_mean, new_var)
    return run
