"""1×1 chains: a ResNet block's last 1×1 convolution and the next block's first run as one layer.

Case: Convolution A (1×1, stride 1, no padding, one group, constant weight and bias, a fused
residual before its ReLU or no activation) whose output y is read by a Convolution B (1×1,
stride 1, no padding, one group, constant weight and bias, no residual, ReLU or no activation)
over y's channels, with B's output channels at most 128 and every channel count a power of two
≥ 16 → one Conv1x1Chain layer (x, W_A, b_A, r, W_B, b_B) → (y, z) whose fused kernel
(kernels/conv_chain.py) writes y once and never reads it back. y's other readers (the next
block's residual) still read it. A Conv1x1Sum (a stage's first block: expansion + projection
shortcut, passes/fuse_projection.py) leads a chain too: the projection's input x2 becomes a second
operand of the first product, y = act(x @ W_A + x2 @ W_P + b), where the two inputs have at most
128 channels together (ResNet-50's stage 1 at batch 256 on an H100: 0.32 ms fused against 0.49 for
the sum and the reduction apart; stage 2, 128 + 256 channels, 0.37 against 0.32).
ResNet-50's stages 1-2 fuse; in stage 3 (256 channels in B) the
fused kernel was slower than the two convolutions on an H100 (benchmarks/chain_bench.py), so
stages 3-4 stay apart. The layer also has tactics that run the two convolutions one after the
other with the engine's usual kernels, and the builder times them against the fused one.
"""
from __future__ import annotations

from kiln.kernels.conv_chain import MAX_CN, MAX_SUM_IN
from kiln.passes._match import substitute
from kiln.passes.fold_qdq import reads_dequantized
from kiln.passes.rewrite import Match, Op, Rule, RulePass

ACTS = (None, "relu")


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _pointwise(conv, residual: bool) -> bool:
    if conv.kind != "Convolution" or len(conv.inputs) < 3 or reads_dequantized(conv):    # fold_qdq's to take
        return False
    a = conv.attrs
    ins = conv.inputs
    w = ins[1]
    b = ins[2] if len(ins) > 2 else None
    r = ins[3] if len(ins) > 3 else None
    return (w is not None and w.is_constant and w.value.ndim == 4
            and w.value.shape[2:] == (1, 1) and list(a.get("stride", ())) == [1, 1] and not any(a.get("pads", ()))
            and list(a.get("dilation", [1, 1])) == [1, 1] and a.get("groups", 1) == 1 and not a.get("pool")
            and b is not None and b.is_constant and (r is not None) == residual
            and not a.get("residual_after_activation") and a.get("activation") in ACTS
            and _pow2(w.value.shape[0]) and _pow2(w.value.shape[1]))


def _second(y):
    return next((layer for layer, i in y.uses if i == 0 and _pointwise(layer, residual=False)
                 and layer.inputs[1].value.shape[0] <= MAX_CN), None)


def _sum_lead(a) -> bool:
    """A projection-shortcut sum (passes/fuse_projection.py) whose first operand is unstrided."""
    if a.kind != "Conv1x1Sum" or list(a.attrs.get("stride1", ())) != [1, 1] or a.attrs.get("activation") not in ACTS:
        return False
    w1, w2 = a.inputs[1].value, a.inputs[3].value
    return (_pow2(w1.shape[0]) and _pow2(w1.shape[1]) and _pow2(w2.shape[1])
            and w1.shape[1] + w2.shape[1] <= MAX_SUM_IN)


def _fits(m: Match) -> str | None:
    a, b = m["a"], m.root
    if not (_pointwise(a, residual=True) or _sum_lead(a)):
        return "A is not a 1x1 convolution with a fused residual, nor an unstrided projection sum"
    if _second(a.outputs[0]) is not b:
        return f"B is not a plain 1x1 convolution over at most {MAX_CN} channels, or another one reads A first"
    return None


def _fuse(m: Match) -> None:
    net, a, b = m.net, m["a"], m.root
    y = a.outputs[0]
    attrs = {"activation": a.attrs.get("activation"), "activation2": b.attrs.get("activation")}
    if a.kind == "Conv1x1Sum":
        x, wa, x2, w2, ba = a.inputs
        ins = [x, wa, ba, None, b.inputs[1], b.inputs[2], x2, w2]
        attrs["stride2"] = list(a.attrs["stride2"])
    else:
        ins = [*a.inputs[:4], b.inputs[1], b.inputs[2]]
    chain = net.add_layer("Conv1x1Chain", ins, attrs,
                          num_outputs=2, name=net.unique_name(a.name + "+" + b.name.rsplit("/", 1)[-1]),
                          origin=list(dict.fromkeys(a.origin + b.origin)))
    substitute(net, chain, a, [y, b.outputs[0]], [b, a])


class FuseConvChains(RulePass):
    name = "1x1 chain fusion"
    devices = ("cuda",)                # its fused kernels are GPU kernels
    rules = [Rule("conv1x1(conv1x1(x) + r) -> Conv1x1Chain",      # y = A's output, still read by others
                  Op("Convolution", Op(("Convolution", "Conv1x1Sum"), ..., name="a", shared=True), ...), _fits, _fuse)]
