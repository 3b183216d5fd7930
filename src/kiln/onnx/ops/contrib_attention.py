"""ONNX Runtime's attention contrib ops (com.microsoft): Attention, MultiHeadAttention, RotaryEmbedding and
GroupQueryAttention, each as projections/reshapes around one ``MultiHeadAttention`` layer.

Masks become an additive bias as ONNX Runtime applies them: ``mask_filter_value`` (default -10000)
where a key is masked, so a fully masked row averages its keys as it does there. Past key/value
inputs are concatenated (no shared buffers); GroupQueryAttention covers prefill and decoding with
equal lengths across the batch. Features Kiln does not run are refused with a one-line error.
"""
from __future__ import annotations

import numpy as np

from kiln.onnx.ops._common import const_value
from kiln.onnx.ops.contrib import MS, dim_of, ew, last_dim, refuse
from kiln.onnx.registry import converter

_FILTER = -10000.0


def _rank(t) -> int | None:
    """The rank of ``t`` from its shape, or through producers that keep it (casts, unary ops), broadcast
    it (element-wise ops) or drop a known number of axes (reductions without keepdims)."""
    if t is None:
        return None
    if t.shape is not None:
        return len(t.shape)
    p = t.producer
    if p is None:
        return None
    if p.kind in ("Cast", "Identity", "Unary", "Activation"):
        return _rank(p.inputs[0])
    if p.kind == "ElementWise":
        ranks = [_rank(i) for i in p.inputs]
        return None if None in ranks else max(ranks)
    if p.kind == "Reduce" and not p.attrs.get("keepdims", True) and p.attrs.get("axes") and len(p.inputs) == 1:
        r = _rank(p.inputs[0])
        return None if r is None else r - len(p.attrs["axes"])
    return None


def _unsqueeze(ctx, t, axes: list[int]):
    return ctx.add1("Unsqueeze", [t], {"axes": axes}, dtype=t.dtype)


def _reshape(ctx, t, dims: list[int], first=None, second=None):
    return ctx.add1("Shuffle", [t], {"first_transpose": first, "reshape": dims, "second_transpose": second,
                                     "allowzero": False}, dtype=t.dtype)


def _total(ctx, kv, kv_axis: int, past, past_axis: int = 2):
    """Keys after the past: kv's length along kv_axis plus the past's, as a one-element int64 tensor
    (a function, called only where a mask needs it)."""
    def total():
        n = dim_of(ctx, kv, kv_axis)
        return n if past is None else ew(ctx, "sum", n, dim_of(ctx, past, past_axis))
    return total


def _where_bias(ctx, masked, filter_value: float, dtype: str):
    return ctx.add1("Where", [masked, ctx.const(np.asarray(filter_value, dtype)), ctx.const(np.zeros((), dtype))],
                    dtype=dtype)


def _mask_bias(ctx, node, mask, batch, total, filter_value: float, dtype: str):
    """An additive bias [B, 1, 1 or S, T] from ONNX Runtime's mask formats: a raw 0/1 mask [B, T] or
    [B, S, T], or per-batch key lengths [B] (right padding) or ends then starts [2B] (left padding).
    ``total()`` adds the layers that compute T; ``batch`` is the static batch size when known."""
    if mask is None:
        return None
    rank = _rank(mask)
    if rank in (2, 3):
        masked = ew(ctx, "equal", mask, ctx.const(np.zeros((), mask.dtype)), "bool")
        return _unsqueeze(ctx, _where_bias(ctx, masked, filter_value, dtype), [1, 2] if rank == 2 else [1])
    if rank != 1:
        raise refuse(node, f"a mask_index of rank {rank if rank is not None else 'unknown'}",
                     "give a raw mask [batch, total] or [batch, seq, total], or key lengths [batch]")
    pos = ctx.add1("Range", [ctx.const(np.int64(0)), total(), ctx.const(np.int64(1))], {}, dtype="int64")
    idx = ctx.add1("Cast", [mask], {"to": "int64"}, dtype="int64")
    n = mask.shape[0] if mask.shape else None
    if isinstance(n, int) and isinstance(batch, int) and n == 2 * batch:      # ends, then starts
        def part(lo):
            return ctx.add1("Slice", [idx, ctx.const([lo], "int64"), ctx.const([lo + batch], "int64")], {},
                            dtype="int64")
        masked = ctx.add1("ElementWise", [ew(ctx, "greater_equal", pos, _unsqueeze(ctx, part(0), [1]), "bool"),
                                          ew(ctx, "less", pos, _unsqueeze(ctx, part(batch), [1]), "bool")],
                          {"op": "or"}, dtype="bool")
    elif isinstance(n, int) and isinstance(batch, int) and n != batch:
        raise refuse(node, f"a 1-D mask_index of {n} values for batch {batch}",
                     "give key lengths [batch] or ends and starts [2 * batch]")
    else:
        masked = ew(ctx, "greater_equal", pos, _unsqueeze(ctx, idx, [1]), "bool")
    return _unsqueeze(ctx, _where_bias(ctx, masked, filter_value, dtype), [1, 2])


def _add_bias(ctx, bias, extra):
    if extra is None:
        return bias
    return extra if bias is None else ew(ctx, "sum", bias, extra)


def _core(ctx, q, k, v, bias, past_k, past_v, *, heads: int, kv_heads: int, scale, causal: bool,
          softcap: float = 0.0, window: int = -1):
    """One MultiHeadAttention layer (3-D or 4-D q/k/v); returns y, present_key, present_value."""
    ins = [q, k, v, bias, past_k, past_v]
    while ins[-1] is None:
        ins.pop()
    attrs = {"scale": None if scale is None else float(scale), "is_causal": bool(causal), "q_num_heads": heads,
             "kv_num_heads": kv_heads, "softcap": float(softcap), "left_window_size": int(window)}
    return ctx.add("MultiHeadAttention", ins, attrs, num_outputs=4, output_dtypes=[q.dtype, k.dtype, v.dtype, q.dtype]
                   ).outputs[:3]


def _split_last(ctx, x, sizes: list[int]):
    return ctx.add("Split", [x], {"axis": -1, "split": list(sizes)}, num_outputs=len(sizes),
                   output_dtypes=[x.dtype] * len(sizes)).outputs


@converter("Attention", since=1, domain=MS)
def attention(ctx, node):
    """Self-attention over a packed QKV projection: input @ weights + bias → heads → attention."""
    x, w, b, mask, past, extra, past_len = (node.input(i) for i in range(7))
    if node.attr("do_rotary", 0):
        raise refuse(node, "do_rotary=1", "apply RotaryEmbedding before the attention")
    if node.attr("past_present_share_buffer", 0) or past_len is not None:
        raise refuse(node, "a shared past/present buffer", "export with separate past and present tensors")
    heads = int(node.attr("num_heads"))
    if w.shape is None or not isinstance(w.shape[-1], int):
        raise refuse(node, "weights of unknown width", "give the weights as an initializer")
    sizes = list(node.attr("qkv_hidden_sizes") or [w.shape[-1] // 3] * 3)
    wv, bv = const_value(w), const_value(b)
    if wv is not None and wv.ndim == 2 and (b is None or bv is not None):
        fc_in = [x, ctx.const(np.ascontiguousarray(wv.T))] + ([ctx.const(bv.reshape(-1))] if b is not None else [])
        qkv = ctx.add1("FullyConnected", fc_in, {}, dtype=x.dtype)
    else:
        qkv = ctx.add1("MatMul", [x, w], {"transpose_a": False, "transpose_b": False}, dtype=x.dtype)
        qkv = ew(ctx, "sum", qkv, b) if b is not None else qkv
    q, k, v = _split_last(ctx, qkv, sizes)
    past_k = past_v = None
    if past is not None:
        past_k, past_v = (ctx.add1("Gather", [past, ctx.const(np.int64(i))], {"axis": 0}, dtype=past.dtype)
                          for i in (0, 1))
    batch = x.shape[0] if x.shape else None
    bias = _mask_bias(ctx, node, mask, batch, _total(ctx, x, 1, past, 3),
                      float(node.attr("mask_filter_value", _FILTER)), x.dtype)
    y, pk, pv = _core(ctx, q, k, v, _add_bias(ctx, bias, extra), past_k, past_v, heads=heads, kv_heads=heads,
                      scale=node.attr("scale"), causal=bool(node.attr("unidirectional", 0)))
    if node.num_outputs < 2 or not node.output_names[1]:
        return [y]
    present = ctx.add1("Concatenation", [_unsqueeze(ctx, pk, [0]), _unsqueeze(ctx, pv, [0])], {"axis": 0},
                       dtype=x.dtype)
    return [y, present]


def _bnsh(ctx, x, heads: int):
    """[B, S, N·H] → [B, N, S, H]."""
    return _reshape(ctx, x, [0, 0, heads, -1], second=[0, 2, 1, 3])


def _unpack(ctx, packed, n: int):
    """[B, S, N, n, H] → n tensors [B, S, N·H]."""
    outs = []
    for i in range(n):
        part = ctx.add1("Gather", [packed, ctx.const(np.int64(i))], {"axis": 3}, dtype=packed.dtype)
        outs.append(_reshape(ctx, part, [0, 0, -1]))
    return outs


@converter("MultiHeadAttention", since=1, domain=MS)
def multi_head_attention(ctx, node):
    """Self or cross attention on projected q/k/v: separate [B, S, D] tensors, packed QKV/KV, or a key and
    value already in [B, N, T, H]; an optional projection bias, key padding mask, attention bias and past."""
    q, k, v, proj_bias, mask, extra, past_k, past_v = (node.input(i) for i in range(8))
    if node.input(8) is not None or node.input(9) is not None:
        raise refuse(node, "past_sequence_length or cache_indirection (shared buffers, beam search)",
                     "export with separate past and present tensors")
    if node.num_outputs > 3 and node.output_names[3]:
        raise refuse(node, "the qk output", "drop that output")
    heads = int(node.attr("num_heads"))
    if k is None:                                       # packed QKV [B, S, N, 3, H]
        if proj_bias is not None:
            raise refuse(node, "a bias with packed QKV", "add the bias to the projection")
        q, k, v = _unpack(ctx, q, 3)
    elif v is None:                                     # packed KV [B, T, N, 2, H]
        k, v = _unpack(ctx, k, 2)
    kv_4d = _rank(k) == 4
    if proj_bias is not None:
        if kv_4d:
            raise refuse(node, "a bias with key/value in [batch, heads, length, head size]", "add the bias earlier")
        n = proj_bias.shape[0] if proj_bias.shape and isinstance(proj_bias.shape[0], int) else None
        if n is None:
            raise refuse(node, "a bias of unknown length", "give the bias as an initializer")
        dv = last_dim(v) or n // 3
        dq = (n - dv) // 2
        bq, bk, bv = _split_last(ctx, proj_bias, [dq, dq, dv])
        q, k, v = ew(ctx, "sum", q, bq), ew(ctx, "sum", k, bk), ew(ctx, "sum", v, bv)
    if kv_4d:
        q = _bnsh(ctx, q, heads)
    batch = q.shape[0] if q.shape else None
    bias = _mask_bias(ctx, node, mask, batch, _total(ctx, k, 2 if kv_4d else 1, past_k),
                      float(node.attr("mask_filter_value", _FILTER)), q.dtype)
    y, pk, pv = _core(ctx, q, k, v, _add_bias(ctx, bias, extra), past_k, past_v, heads=heads, kv_heads=heads,
                      scale=node.attr("scale"), causal=bool(node.attr("unidirectional", 0)))
    if kv_4d:
        y = _reshape(ctx, y, [0, 0, -1], first=[0, 2, 1, 3])
    return [y, pk, pv][:node.num_outputs]


def _rotary(ctx, x, cos, sin, pos, *, heads: int, interleaved: bool, rot_dim: int = 0):
    return ctx.add1("RotaryEmbedding", [x, cos, sin, pos], {"interleaved": bool(interleaved), "num_heads": heads,
                                                            "rotary_embedding_dim": rot_dim}, dtype=x.dtype)


def _positions(ctx, start, length):
    """[[start, ..., start + length - 1]] as int64 [1, length]."""
    start = ctx.add1("Cast", [start], {"to": "int64"}, dtype="int64")
    limit = ew(ctx, "sum", start, length)
    return _unsqueeze(ctx, ctx.add1("Range", [start, limit, ctx.const(np.int64(1))], {}, dtype="int64"), [0])


@converter("RotaryEmbedding", since=1, domain=MS)
def rotary_embedding(ctx, node):
    """ONNX Runtime's RoPE: input, position_ids ([1]: the first position; or [B, S]), cos and sin caches.
    The scale attribute is ignored, as ONNX Runtime's CPU kernel ignores it."""
    x, pos, cos, sin = (node.input(i) for i in range(4))
    if node.attr("is_packed_batching", 0):
        raise refuse(node, "is_packed_batching=1", "run unpacked batches")
    heads, rot = int(node.attr("num_heads", 0)), int(node.attr("rotary_embedding_dim", 0))
    rank = _rank(x)
    if _rank(pos) == 1:
        if rank is None:
            raise refuse(node, "1-D position_ids with an input of unknown rank", "give position_ids as [batch, seq]")
        pos = _positions(ctx, pos, dim_of(ctx, x, 1 if rank == 3 else 2))
    if heads or rank == 4:
        return _rotary(ctx, x, cos, sin, pos, heads=heads, interleaved=node.attr("interleaved", 0), rot_dim=rot)
    if rank != 3 or last_dim(cos) is None:
        raise refuse(node, "num_heads=0 with an input of unknown rank or caches of unknown shape",
                     "set num_heads")
    head = rot or 2 * last_dim(cos)                    # heads from the caches' width, as ONNX Runtime infers them
    x4 = _reshape(ctx, x, [0, 0, -1, head], second=[0, 2, 1, 3])
    y = _rotary(ctx, x4, cos, sin, pos, heads=0, interleaved=node.attr("interleaved", 0), rot_dim=rot)
    return _reshape(ctx, y, [0, 0, -1], first=[0, 2, 1, 3])


_GQA_UNSUPPORTED = {11: "head_sink", 12: "k_scale", 13: "v_scale", 14: "q_norm_weight", 15: "k_norm_weight",
                    16: "query_seqlens"}


@converter("GroupQueryAttention", since=1, domain=MS)
def group_query_attention(ctx, node):
    """Grouped-query attention with an optional rotary embedding and past key/value (concatenated); keys
    past seqlens_k[b] are masked. Quantized caches, shared buffers and smooth softmax are refused."""
    for i, what in _GQA_UNSUPPORTED.items():
        if node.input(i) is not None:
            raise refuse(node, f"the {what} input", "export without it")
    if (int(node.attr("smooth_softmax", -1) or 0) > 0 or node.attr("qk_output", 0)
            or node.attr("sliding_window_cache", 0)):
        raise refuse(node, "smooth_softmax, qk_output or sliding_window_cache", "export without them")
    if node.attr("k_quant_type", "NONE") != "NONE" or node.attr("v_quant_type", "NONE") != "NONE":
        raise refuse(node, "a quantized KV cache", "keep the cache in floating point")
    q, k, v, past_k, past_v, seqlens = (node.input(i) for i in range(6))
    cos, sin, pos, extra = node.input(7), node.input(8), node.input(9), node.input(10)
    heads, kv_heads = int(node.attr("num_heads")), int(node.attr("kv_num_heads"))
    if k is None:                                       # packed [B, S, (N + 2·Nkv)·H]
        packed = _reshape(ctx, q, [0, 0, heads + 2 * kv_heads, -1])
        parts = ctx.add("Split", [packed], {"axis": 2, "split": [heads, kv_heads, kv_heads]}, num_outputs=3,
                        output_dtypes=[q.dtype] * 3).outputs
        q, k, v = (_reshape(ctx, p, [0, 0, -1]) for p in parts)
    if node.attr("do_rotary", 0):
        if pos is None:
            start = dim_of(ctx, past_k, 2) if past_k is not None else ctx.const(np.asarray([0], np.int64))
            pos = _positions(ctx, start, dim_of(ctx, q, 1))
        inter = node.attr("rotary_interleaved", 0)
        q = _rotary(ctx, q, cos, sin, pos, heads=heads, interleaved=inter)
        k = _rotary(ctx, k, cos, sin, pos, heads=kv_heads, interleaved=inter)
    pos_k = ctx.add1("Range", [ctx.const(np.int64(0)), _total(ctx, k, 1, past_k)(), ctx.const(np.int64(1))], {},
                     dtype="int64")
    valid = _unsqueeze(ctx, ctx.add1("Cast", [seqlens], {"to": "int64"}, dtype="int64"), [1])
    bias = _unsqueeze(ctx, _where_bias(ctx, ew(ctx, "greater", pos_k, valid, "bool"), float("-inf"), q.dtype), [1, 2])
    window = int(node.attr("local_window_size", -1))       # counts the query's own position
    y, pk, pv = _core(ctx, q, k, v, _add_bias(ctx, bias, extra), past_k, past_v, heads=heads, kv_heads=kv_heads,
                      scale=node.attr("scale"), causal=bool(node.attr("causal", 1)),
                      softcap=float(node.attr("softcap", 0.0) or 0.0), window=window - 1 if window > 0 else -1)
    return [y, pk, pv][:node.num_outputs]
