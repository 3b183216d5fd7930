"""ONNX-semantics attention (opset 23+) and rotary embeddings on torch.

``MultiHeadAttention`` follows the ONNX Attention op exactly (3-D or 4-D inputs,
GQA/MQA head repetition, KV-cache concat, bool or additive masks, bottom-right
causal alignment, softcap, sliding windows, fully-masked rows giving zeros);
the plain ``Attention`` kind stays the lean fused form the passes produce.
Scores and softmax run in FP32 for FP16/BF16 inputs.
"""
from __future__ import annotations

import math

import torch

from kiln.kernels.registry import tactic

_LOW = (torch.float16, torch.bfloat16)


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, S, n*H] → [B, n, S, H]."""
    b, s, hidden = x.shape
    return x.reshape(b, s, n, hidden // n).transpose(1, 2)


def _bias_from_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.full((), float("-inf"), dtype=dtype, device=mask.device))
    return mask.to(dtype)


@tactic("MultiHeadAttention")
def make_mha(attrs, ctx):
    scale_attr = attrs.get("scale")
    causal = bool(attrs.get("is_causal", 0))
    qh, kvh = attrs.get("q_num_heads"), attrs.get("kv_num_heads")
    softcap = float(attrs.get("softcap", 0.0) or 0.0)
    mode = int(attrs.get("qk_matmul_output_mode", 0))
    left, right = int(attrs.get("left_window_size", -1)), int(attrs.get("right_window_size", -1))

    def run(q, k, v, mask=None, past_k=None, past_v=None, nonpad=None):
        three_d = q.dim() == 3
        out_dtype = q.dtype
        if three_d:
            q, k, v = _heads(q, qh), _heads(k, kvh), _heads(v, kvh)
        if past_k is not None:
            k = torch.cat([past_k, k], 2)
        if past_v is not None:
            v = torch.cat([past_v, v], 2)
        present_k, present_v = k, v
        work = torch.float32 if out_dtype in _LOW else out_dtype
        qf, kf, vf = q.to(work), k.to(work), v.to(work)
        scale = scale_attr if scale_attr is not None else 1.0 / math.sqrt(q.shape[-1])
        s = math.sqrt(scale)
        sq, skv = q.shape[2], k.shape[2]
        if qf.shape[1] != kf.shape[1]:
            rep = qf.shape[1] // kf.shape[1]
            kf, vf = kf.repeat_interleave(rep, 1), vf.repeat_interleave(rep, 1)
        scores = torch.matmul(qf * s, (kf * s).transpose(-1, -2))
        if softcap > 0:
            scores = torch.tanh(scores / softcap) * softcap
        raw = scores
        dev = q.device
        bias = torch.zeros((sq, skv), dtype=work, device=dev)
        if mask is not None:
            mb = _bias_from_mask(mask, work)
            if mb.shape[-1] < skv:
                pad = torch.full(list(mb.shape[:-1]) + [skv - mb.shape[-1]], float("-inf"), dtype=work, device=dev)
                mb = torch.cat([mb, pad], -1)
            bias = bias + mb
        if past_k is None and nonpad is not None:       # per batch: [B, 1, 1, 1]
            offset = nonpad.to(dev).reshape(-1, 1, 1, 1) - sq
        else:                                           # a Python int: no host-to-device copy
            offset = past_k.shape[2] if past_k is not None else 0
        i = torch.arange(sq, device=dev).reshape(sq, 1)
        j = torch.arange(skv, device=dev).reshape(1, skv)
        ninf = torch.full((), float("-inf"), dtype=work, device=dev)
        zero = torch.zeros((), dtype=work, device=dev)
        if causal:
            bias = bias + torch.where(j <= i + offset, zero, ninf)
        if left >= 0 or right >= 0:
            diff = (i + offset) - j
            ok = torch.ones_like(diff, dtype=torch.bool)
            if left >= 0:
                ok = ok & (diff <= left)
            if right >= 0:
                ok = ok & (-diff <= right)
            bias = bias + torch.where(ok, zero, ninf)
        if nonpad is not None:
            keep = j.reshape(1, 1, 1, skv) < nonpad.to(dev).reshape(-1, 1, 1, 1)
            bias = bias + torch.where(keep, zero, ninf)
        with_bias = scores + bias
        probs = torch.softmax(with_bias, -1)
        dead = torch.isneginf(bias.amax(-1, keepdim=True))
        probs = torch.where(dead, zero, probs)
        y = torch.matmul(probs.to(out_dtype).to(work), vf)
        if three_d:
            y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
        qk = {0: raw, 1: raw, 2: with_bias, 3: probs}.get(mode, raw)
        return (y.to(out_dtype), present_k, present_v, qk.to(out_dtype))
    return run


@tactic("RotaryEmbedding")
def make_rotary(attrs, ctx):
    interleaved = bool(attrs.get("interleaved", 0))
    num_heads = int(attrs.get("num_heads", 0) or 0)
    rot_dim = int(attrs.get("rotary_embedding_dim", 0) or 0)

    def run(x, cos, sin, pos=None):
        three_d = x.dim() == 3
        if three_d:                          # [B, S, N*H] → [B, S, N, H]
            b, s, hidden = x.shape
            x4 = x.reshape(b, s, num_heads, hidden // num_heads)
        else:                                # [B, N, S, H] → [B, S, N, H]
            x4 = x.transpose(1, 2)
        if pos is not None:
            cos, sin = cos[pos.to(torch.int64)], sin[pos.to(torch.int64)]
        # cos/sin: [B, S, rot/2] → broadcast over heads
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        head = x4.shape[-1]
        rd = rot_dim or head
        xr, rest = x4[..., :rd], x4[..., rd:]
        if interleaved:
            a, b_ = xr[..., 0::2], xr[..., 1::2]
        else:
            a, b_ = xr[..., :rd // 2], xr[..., rd // 2:]
        ra = a * cos - b_ * sin
        rb = b_ * cos + a * sin
        if interleaved:
            out = torch.stack([ra, rb], -1).reshape(xr.shape)
        else:
            out = torch.cat([ra, rb], -1)
        y = torch.cat([out, rest], -1)
        if three_d:
            return (y.reshape(x.shape),)
        return (y.transpose(1, 2),)
    return run


@tactic("LinearAttention")
def make_linear_attention(attrs, ctx):
    """The recurrence token by token in FP32 (prefill is a loop over T; chunked forms are a later tactic)."""
    rule = attrs.get("update_rule", "gated_delta")
    qh, kvh = int(attrs["q_num_heads"]), int(attrs["kv_num_heads"])
    scale_attr = float(attrs.get("scale", 0.0) or 0.0)
    gating, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")

    def run(q, k, v, past=None, decay=None, beta=None):
        b, t, _ = q.shape
        dk, dv = q.shape[-1] // qh, v.shape[-1] // kvh
        q4, k4, v4 = (_heads(x.float(), n) for x, n in ((q, qh), (k, kvh), (v, kvh)))     # [B, H, T, D]
        if gating:
            g4 = (decay.float().reshape(b, t, kvh, 1) if decay.shape[-1] == kvh
                  else decay.float().reshape(b, t, kvh, dk)).transpose(1, 2)
        if delta:
            beta4 = beta.float().reshape(b, t, beta.shape[-1], 1).transpose(1, 2)
        state = past.float().clone() if past is not None else q.new_zeros((b, kvh, dk, dv), dtype=torch.float32)
        scale = scale_attr or 1.0 / math.sqrt(dk)
        group = qh // kvh
        outs = []
        for i in range(t):
            kt, vt = k4[:, :, i], v4[:, :, i]
            if gating:
                state = state * torch.exp(g4[:, :, i]).unsqueeze(-1)
            if delta:
                vt = beta4[:, :, i] * (vt - torch.einsum("bhdm,bhd->bhm", state, kt))
            state = state + kt.unsqueeze(-1) * vt.unsqueeze(-2)
            read = state.repeat_interleave(group, 1) if group > 1 else state
            outs.append(scale * torch.einsum("bhd,bhdm->bhm", q4[:, :, i], read))
        y = torch.stack(outs, 2).transpose(1, 2).reshape(b, t, qh * dv)
        return (y.to(q.dtype), state.to(past.dtype if past is not None else q.dtype))
    return run
