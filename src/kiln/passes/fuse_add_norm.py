"""Residual add + normalization fusion: a transformer block's ``x + f(x)`` folds into the norm after it.

Cases:
- ElementWise(sum) of two non-constant tensors of the same shape and float dtype, read by a
  Normalization (type layer or rms, over the last axis, no residual yet) → one Normalization with
  the second operand as its residual input (post-LN blocks, e.g. BERT: ``LN(x + attn(x))``);
- the same where other layers also read the sum (pre-LN blocks, e.g. ViT: the sum is the residual
  stream carried to the next block) → the fused layer also outputs the sum (attrs sum_output) and
  those readers read that second output;
- the sum is a network output → it becomes the fused layer's second output, keeping its name.
Not fused: broadcasting sums (a bias, a position embedding), norms over more than the last axis,
a norm whose scale or bias is computed after the add.
On the GPU the fused layer runs as one Triton kernel (kernels/norm_triton.py) that reads both
operands once and writes the sum only when it is read again; elsewhere it adds, then normalizes.
"""
from __future__ import annotations

from kiln.passes._match import remove_dead, replace_output
from kiln.passes.rewrite import Match, Op, Rule, RulePass, Var
from kiln.passes.symbolic import sym_shape

FLOATS = ("float32", "float16", "bfloat16")


def _static_equal(*tensors) -> bool:
    """The tensors' shapes are known and equal at every shape of the profile (passes/symbolic.py)."""
    first = sym_shape(tensors[0])
    return first is not None and all(sym_shape(t) == first for t in tensors[1:])


def _fits(m: Match) -> str | None:
    net, norm, add, a, b = m.net, m.root, m["add"], m["a"], m["b"]
    attrs = norm.attrs
    x = norm.inputs[0]
    if attrs.get("type", "layer") not in ("layer", "rms") or len(norm.outputs) != 1 or len(norm.inputs) > 3:
        return "not a layer or RMS norm with one output, or it already has a residual"
    if x.rank is None or x.rank == 0 or attrs.get("axis", -1) % x.rank != x.rank - 1:
        return "the norm is not over the last axis"
    if a.is_constant or b.is_constant:
        return "an operand of the sum is a constant (a bias)"
    if not _static_equal(a, b, x) or not (a.dtype == b.dtype == x.dtype) or x.dtype not in FLOATS:
        return "the operands' shapes differ (a broadcast) or are not static, or they are not floating point"
    where = net.layers.index(add)
    params = list(norm.inputs[1:3])
    if any(p is not None and p.producer is not None and net.layers.index(p.producer) > where for p in params):
        return "the norm's scale or bias is computed after the sum"
    return None


def _fuse(m: Match) -> None:
    net, norm, add, a, b = m.net, m.root, m["add"], m["a"], m["b"]
    x = norm.inputs[0]
    params = list(norm.inputs[1:3]) + [None] * (3 - len(norm.inputs))
    where = net.layers.index(add)
    readers = [layer for layer, _ in x.uses if layer is not norm]
    keep_sum = bool(readers) or x in net.outputs
    fused_attrs = dict(norm.attrs, sum_output=keep_sum)
    fused = net.add_layer("Normalization", [a, params[0], params[1], None, None, b], fused_attrs,
                          num_outputs=2 if keep_sum else 1, name=net.unique_name(norm.name + "/add"),
                          origin=list(dict.fromkeys(add.origin + norm.origin)))
    net.layers.remove(fused)
    net.layers.insert(where, fused)
    y = norm.outputs[0]
    fused.outputs[0].shape, fused.outputs[0].dtype = y.shape, y.dtype
    replace_output(net, y, fused.outputs[0])
    if keep_sum:
        fused.outputs[1].shape, fused.outputs[1].dtype = x.shape, x.dtype
        replace_output(net, x, fused.outputs[1])
    remove_dead(net, [norm, add])


class FuseAddNorm(RulePass):
    name = "residual add + norm fusion"
    rules = [Rule("norm(a + b) -> norm with residual b",
                  Op("Normalization", Op("ElementWise", Var("a"), Var("b"), op="sum", name="add", shared=True), ...),
                  _fits, _fuse)]
