"""Attention-family ops of recent opsets: Attention (23, 24, 25), RotaryEmbedding (23), LinearAttention (27)."""
from __future__ import annotations

from kiln.onnx.registry import converter


def _attention(ctx, node, windows: bool):
    """One shared conversion; opset 24 adds nonpad_kv_seqlen (an input), 25 the sliding window."""
    q = node.input(0)
    attrs = {"scale": node.attr("scale"), "is_causal": node.attr("is_causal", 0),
             "q_num_heads": node.attr("q_num_heads"), "kv_num_heads": node.attr("kv_num_heads"),
             "softcap": node.attr("softcap", 0.0), "qk_matmul_output_mode": node.attr("qk_matmul_output_mode", 0)}
    if windows:
        attrs["left_window_size"] = node.attr("left_window_size", -1)
        attrs["right_window_size"] = node.attr("right_window_size", -1)
    ins = list(node.inputs[:7])
    while ins and ins[-1] is None:
        ins.pop()
    k_dtype = node.input(1).dtype
    v_dtype = node.input(2).dtype
    return ctx.add("MultiHeadAttention", ins, attrs, num_outputs=4,
                   output_dtypes=[q.dtype, k_dtype, v_dtype, q.dtype]).outputs[:max(1, node.num_outputs)]


@converter("Attention", since=23)
def attention_v23(ctx, node):
    return _attention(ctx, node, windows=False)


@converter("Attention", since=25)
def attention_v25(ctx, node):
    return _attention(ctx, node, windows=True)


@converter("RotaryEmbedding", since=23)
def rotary_embedding(ctx, node):
    x = node.input(0)
    ins = list(node.inputs[:4])
    while ins and ins[-1] is None:
        ins.pop()
    return ctx.add1("RotaryEmbedding", ins, {"interleaved": node.attr("interleaved", 0),
                                             "num_heads": node.attr("num_heads", 0),
                                             "rotary_embedding_dim": node.attr("rotary_embedding_dim", 0)},
                    dtype=x.dtype)


@converter("LinearAttention", since=27)
def linear_attention(ctx, node):
    q = node.input(0)
    past = node.input(3)
    ins = list(node.inputs[:6]) + [None] * (6 - len(node.inputs[:6]))
    while ins and ins[-1] is None:
        ins.pop()
    attrs = {"update_rule": node.attr("update_rule", "gated_delta"), "q_num_heads": node.attr("q_num_heads"),
             "kv_num_heads": node.attr("kv_num_heads"), "scale": node.attr("scale", 0.0)}
    return ctx.add("LinearAttention", ins, attrs, num_outputs=2,
                   output_dtypes=[q.dtype, past.dtype if past is not None else q.dtype]).outputs
