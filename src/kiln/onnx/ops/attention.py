"""Attention-family ops of recent opsets: Attention (23, 24, 25), RotaryEmbedding (23), LinearAttention (27), FlexAttention (ai.onnx.preview 1)."""
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


def _inline_graph(ctx, graph, inputs: list) -> list:
    """Convert a GraphProto's nodes into the current network with its inputs bound to ``inputs``
    (FlexAttention's score/prob modifiers are functions of one tensor, not control flow)."""
    from kiln.onnx.parser import ConvertContext, Node, _convert_node
    from kiln.onnx.validate import tensor_value
    values = {vi.name: t for vi, t in zip(graph.input, inputs)}
    for init in graph.initializer:
        values[init.name] = ctx.const(tensor_value(init, f"Initializer {init.name!r}"))
    sub = ConvertContext(ctx.net, ctx.opsets, values, parent=ctx)
    sub.counter = 1000 * (ctx.counter + 1)
    for proto in graph.node:
        sub.counter += 1
        ins = [sub.lookup_value(n) if n else None for n in proto.input]
        node = Node(proto, ins, sub)
        node.name = f"{ctx.node.name}/{node.name}"
        sub.node = node
        for name, t in zip(node.output_names, _convert_node(sub, node)):
            if name and t is not None:
                values[name] = t
    return [sub.lookup_value(vi.name) for vi in graph.output]


@converter("FlexAttention", since=1, domain="ai.onnx.preview")
def flex_attention(ctx, node):
    """softmax(mod_s(Q·Kᵀ·scale)) → mod_p → ·V, built from layers; heads repeat for GQA; softmax in
    float32 (float64 for double inputs) unless softmax_precision says otherwise."""
    from kiln.onnx.parser import onnx_dtype
    q, k, v = node.input(0), node.input(1), node.input(2)
    if q.shape is None or not all(isinstance(d, int) for d in (q.shape[1], q.shape[3], k.shape[1])):
        from kiln.errors import ParseError
        raise ParseError(f"Node {node.name!r} (FlexAttention) needs static head counts and head size; "
                         f"got Q {q.shape} and K {k.shape}.")
    hq, e, hkv = q.shape[1], q.shape[3], k.shape[1]
    if hq != hkv:                          # each KV head serves hq/hkv query heads, in order
        idx = ctx.const([h // (hq // hkv) for h in range(hq)], "int64")
        k = ctx.add1("Gather", [k, idx], {"axis": 1}, dtype=k.dtype)
        v = ctx.add1("Gather", [v, idx], {"axis": 1}, dtype=v.dtype)
    scale = node.attr("scale", 1.0 / e ** 0.5)
    s = ctx.const(scale ** 0.5, q.dtype)
    qs = ctx.add1("ElementWise", [q, s], {"op": "prod"}, dtype=q.dtype)
    ks = ctx.add1("ElementWise", [k, s], {"op": "prod"}, dtype=k.dtype)
    scores = ctx.add1("MatMul", [qs, ks], {"transpose_a": False, "transpose_b": True}, dtype=q.dtype)
    sp = node.attr("softmax_precision")
    work = onnx_dtype(sp) if sp is not None else ("float64" if q.dtype == "float64" else "float32")
    if work != q.dtype:
        scores = ctx.add1("Cast", [scores], {"to": work, "saturate": 1}, dtype=work)
    if node.attr("score_mod") is not None:
        scores = _inline_graph(ctx, node.attr("score_mod"), [scores])[0]
    probs = ctx.add1("SoftMax", [scores], {"axis": -1, "log": False}, dtype=work)
    if node.attr("prob_mod") is not None:
        probs = _inline_graph(ctx, node.attr("prob_mod"), [probs])[0]
    vw = ctx.add1("Cast", [v, ], {"to": work, "saturate": 1}, dtype=work) if v.dtype != work else v
    y = ctx.add1("MatMul", [probs, vw], {"transpose_a": False, "transpose_b": False}, dtype=work)
    return ctx.add1("Cast", [y], {"to": v.dtype, "saturate": 1}, dtype=v.dtype) if v.dtype != work else y
